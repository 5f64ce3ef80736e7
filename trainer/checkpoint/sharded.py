"""Sharded checkpoints with torch.distributed.checkpoint (DCP): what is in them, saving, loading.

One checkpoint, `run_dir/checkpoints/step_000100/`:
  *.distcp, .metadata   DCP shards: model weights, AdamW state (unsharded per parameter,
                        whether or not the optimizer ran ZeRO-sharded), each rank's RNG state.
                        Expert weights and their AdamW moments are one global tensor
                        [num_experts, ...] sharded on dim 0, so any (world, ep) can load them.
  manifest.json         step, samples consumed, config and its hash, world layout, plan,
                        every file with size and sha256.
Written into `.step_000100.tmp` by every rank; rank 0 publishes it (manifest,
rename, `latest`) only when all ranks are done. Nothing in it is pickled but DCP's
`.metadata`, which safe_read reads without running code; DCP holds tensors only, the rest is JSON.

A run that starts from checkpoint.init with frozen parameters writes only what
can differ from that base (the trainable parameters, their optimizer state,
buffers, RNG) and records the base's path and content hash in the manifest
(`base`); loading loads the base first, after checking both, then the rest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, Replicate, Shard

from moeyard.errors import CheckpointError
from moeyard.models import expert_parameter_ids
from moeyard.models.peft.adapters import is_adapter_parameter
from moeyard.parallel import ParallelMesh
from moeyard.parallel.agree import from_rank0
from moeyard.parallel.fsdp import global_expert_view, reshard
from moeyard.parallel.grads.sync import GradSync
from moeyard.parallel.plan import Plan
from moeyard.trainer.checkpoint import safe_read
from moeyard.trainer.checkpoint.disk_full import disk_full
from moeyard.trainer.checkpoint.store import (
    CheckpointStore,
    base_of,
    check_files,
    content_hash,
    misnamed,
    read_manifest,
    sha256,
    unlisted,
    verify,
)
from moeyard.trainer.config.sections import Config, to_dict

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def config_hash(cfg: Config) -> str:
    """What decides the trained model; run, log, checkpoint and schedule settings may change on resume."""
    relevant = {k: v for k, v in to_dict(cfg).items() if k not in ("run", "log", "checkpoint", "schedule")}
    relevant["parallel"].pop("layers_per_stage")  # places blocks on stages (and came after checkpoints did)
    relevant["seed"] = cfg.run.seed
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def persistent_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The model's saved state that is not a parameter, as live tensors DCP can load into in place."""
    saved = model.state_dict(keep_vars=True)  # persistent only; a tied weight is a parameter, not a buffer
    return {name: b for name, b in model.named_buffers() if name in saved}


@torch.no_grad()
def fill_model(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
    """Copy named tensors into the model (a tied weight once, under the name named_parameters gives it)."""
    for name, p in model.named_parameters():
        p.copy_(params[name])
    for name, b in persistent_buffers(model).items():
        b.copy_(buffers[name])


def _state_dict(model: nn.Module, optim_states: dict[int, dict[str, Tensor]], pmesh: ParallelMesh,
                with_rng: bool, names: Optional[set[str]] = None) -> dict[str, Any]:
    """The DCP state dict, over live tensors: DCP saves from them or loads into them in place.

    `names`: the parameters to include (default all)."""
    expert_ids = expert_parameter_ids(model)

    def globalize(t: Tensor, param: nn.Parameter) -> Tensor:
        if id(param) not in expert_ids:
            return t  # replicated, or (fsdp) already a DTensor of the global shape
        if isinstance(t, DTensor):  # fsdp: this rank's edp piece of its ep shard
            return global_expert_view(t, pmesh)
        # Replicated over edp, sharded over ep on dim 0: the global [E, ...] tensor.
        return DTensor.from_local(t, pmesh.mesh, [Replicate(), Shard(0)], run_check=False)

    state: dict[str, Any] = {"model": {n: globalize(p.detach(), p) for n, p in model.named_parameters()
                                       if names is None or n in names}, "optim": {}}
    buffers = persistent_buffers(model)
    if buffers:  # router state (sigmoid_bias's expert biases, dense_to_sparse's schedule): replicated
        state["buffers"] = buffers
    for name, p in model.named_parameters():
        if id(p) in optim_states:
            s = optim_states[id(p)]
            state["optim"][name] = {"step": s["step"], **{k: globalize(s[k], p) for k in ADAM_KEYS}}
    if with_rng:  # one key per rank: RNG streams are not replicated state
        state["rng"] = {f"cpu_rank{dist.get_rank()}": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["rng"][f"cuda_rank{dist.get_rank()}"] = torch.cuda.get_rng_state()
    return state


def _describe_files(folder: Path) -> list[dict[str, Any]]:
    """Sizes and sha256 of every file; each rank hashes a share, so no rank waits long on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    mine = {n: {"name": n, "bytes": (folder / n).stat().st_size, "sha256": sha256(folder / n)}
            for n in names[rank::world]}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (names, mine))
    for other_rank, (other_names, _) in enumerate(gathered):
        if other_names != names:  # every rank sees the same lists, so every rank raises together
            raise RuntimeError(f"rank {other_rank} sees different files in {folder} than rank {rank}: "
                               f"run.dir must be on storage that all ranks share")
    described = {n: d for _, part in gathered for n, d in part.items()}
    return [described[n] for n in names]


def _manifest_or_problem(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        manifest = read_manifest(path)
    except CheckpointError as err:
        return None, str(err)
    problem = misnamed(path, manifest) or unlisted(path, manifest)
    return (None, problem) if problem else (manifest, None)


@dataclasses.dataclass
class PendingSave:
    """An asynchronous save in flight: DCP writes in the background; `finish` publishes it."""

    step: int
    tmp: Path
    future: Future
    manifest: dict[str, Any]


class Checkpointer:
    """Saves and loads one run's checkpoints. Every method is collective."""

    def __init__(self, cfg: Config, pmesh: ParallelMesh, plan: Plan) -> None:
        self.cfg, self.pmesh, self.plan = cfg, pmesh, plan
        self.store = CheckpointStore(cfg.run_dir / "checkpoints")
        self.pending: Optional[PendingSave] = None
        self._state_bytes = 0
        """This rank's weights + AdamW moments: the size of a first checkpoint, about (disk-full message)."""
        # DCP's own collectives (plan and metadata exchange) go over a group of their own: an asynchronous
        # save runs them on a background thread while training uses the default group.
        # Its collectives wait for the slowest rank's writes (or reads): at least 30 minutes, however short
        # parallel.timeout_s is set to notice a lost node.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(cfg.parallel.timeout_s, 1800)))
        self._last_saved = 0
        self.base: Optional[dict[str, str]] = None
        """Saves hold only what can differ from this checkpoint (path, content_hash); None: every weight."""
        self.saved_besides_trainable: set[str] = set()
        """With a base: parameters saved even when frozen (absent from the base, or trained before)."""
        self.data_state: Optional[Callable[[int], dict[str, Any]]] = None
        """The data record of a checkpoint of step n (tokenizer, sources, position); None: none recorded."""

    def _on_rank0(self, action: Callable[[], Any]) -> Any:
        """Run `action` on rank 0 and share its result -- or its failure, so no rank waits for a dead peer."""
        return from_rank0(action, CheckpointError, "checkpoint step")

    def last_saved_step(self) -> int:
        """The newest step saved or being saved by this run's checkpointer (0 before the first)."""
        return self._last_saved

    def save(self, step: int, model: nn.Module, sync: GradSync, asynchronous: bool = False) -> None:
        self.finish()  # at most one save in flight
        reshard(model)  # the state dict reads the sharded parameters, not gathered copies
        tmp = self.store.tmp_path(step)

        def fresh_tmp() -> None:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash mid-save
            tmp.mkdir(parents=True)

        self._on_rank0(fresh_tmp)
        self._last_saved = step
        names = None
        if self.base is not None:
            names = {n for n, p in model.named_parameters() if p.requires_grad} | self.saved_besides_trainable
        self._state_bytes = sum(p.numel() * p.element_size() * 3 for p in model.parameters())
        state = _state_dict(model, sync.param_states(), self.pmesh, with_rng=True, names=names)
        manifest = {
            "step": step,
            "samples": step * self.cfg.global_batch_sequences,
            "config_hash": config_hash(self.cfg),
            "config": to_dict(self.cfg),
            "world_size": dist.get_world_size(),
            "ep": self.pmesh.ep,
            "plan": dataclasses.asdict(self.plan),
        }
        if self.base is not None:
            manifest["base"] = self.base
        if self.data_state is not None:
            manifest["data"] = self.data_state(step)
        try:
            if asynchronous:
                # DCP copies the tensors to CPU memory before returning, so training may change them at once.
                future = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group)
                self.pending = PendingSave(step, tmp, future, manifest)
            else:
                dcp.save(state, checkpoint_id=tmp, process_group=self.group)  # fsyncs its files
                self._publish(step, tmp, manifest)
        except (Exception, CheckpointException) as err:  # DCP's is a BaseException
            self._raise_if_disk_full(err, step, tmp)
            raise

    def after_step(self, step: int, last: int, stopping: bool, model: nn.Module, sync: GradSync) -> None:
        """Save on checkpoint.every, at the last step and when the run is stopping on a signal: asynchronously
        (checkpoint.async_save) unless the process is about to end."""
        every = self.cfg.checkpoint.every and step % self.cfg.checkpoint.every == 0
        if every or step == last or stopping:
            self.save(step, model, sync, asynchronous=self.cfg.checkpoint.async_save and not (step == last or stopping))

    def finish(self) -> None:
        """Wait for an asynchronous save and publish it."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            try:
                pending.future.result()
                self._publish(pending.step, pending.tmp, pending.manifest)
            except (Exception, CheckpointException) as err:
                self._raise_if_disk_full(err, pending.step, pending.tmp)
                raise

    def _raise_if_disk_full(self, err: BaseException, step: int, tmp: Path) -> None:
        """Every rank sees a failed save (DCP and from_rank0 share failures): on a full disk, remove the
        partial folder and raise one DiskFullError instead of each rank's traceback."""
        full = disk_full(err, tmp, step, self.store, self._state_bytes * dist.get_world_size())
        if full is not None:
            if dist.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise full from None

    def _publish(self, step: int, tmp: Path, manifest: dict[str, Any]) -> None:
        files = _describe_files(tmp)  # collective: every rank's shards are on disk once it returns

        def publish() -> None:
            self.store.publish(tmp, step, {**manifest, "files": files})
            self.store.prune(self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every, current=step)

        self._on_rank0(publish)

    def verify(self, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest, None) if intact, else (None, why). Every rank checks a share of the files."""
        manifest, problem = from_rank0(lambda: _manifest_or_problem(path), CheckpointError, f"reading {path}")
        if problem is not None:
            return None, problem
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = check_files(path, manifest.get("files", [])[rank::world])
        problems: list[Any] = [None] * world
        dist.all_gather_object(problems, mine)
        problem = next((p for p in problems if p), None)
        return (None, problem) if problem else (manifest, None)

    def find_resume_point(self) -> tuple[Path, dict[str, Any]] | None:
        """checkpoint.resume: auto (newest intact in this run), none, or a path. Collective.

        Damaged checkpoints are named and passed over; later checkpoints of this run are set aside when
        resuming from an earlier one, so that the new timeline never mixes with the old.
        """
        choice = self.cfg.checkpoint.resume
        if choice == "none":
            return None
        if choice != "auto":
            manifest, problem = self.verify(Path(choice))
            if problem:
                raise CheckpointError(problem)
            if manifest.get("kind") == "weights":
                raise CheckpointError(f"{choice} holds weights only (no optimizer state or step to resume): "
                                      f"start from it with --init instead of --resume")
            found = (Path(choice), manifest)
        else:
            found = None
            candidates = self._on_rank0(lambda: [str(p) for _, p in reversed(self.store.complete())])
            for candidate in map(Path, candidates):
                manifest, problem = self.verify(candidate)
                if manifest is not None:
                    found = (candidate, manifest)
                    break
                if dist.get_rank() == 0:
                    print(f"warning: skipping checkpoint: {problem}", flush=True)
            if found is None and candidates:
                raise CheckpointError(f"none of the {len(candidates)} checkpoints in {self.store.root} is intact "
                                      f"(see the warnings above); not starting over on top of them: move them "
                                      f"away or pass --resume PATH / --resume none with another run.dir")
        if found is not None:
            self._on_rank0(lambda: self.store.set_aside_newer_than(found[1]["step"]))
            self._last_saved = found[1]["step"]
        return found

    def refer_to_base(self, path: Path, model: nn.Module) -> None:
        """From now on save only what can differ from the weights of `path` (this run's checkpoint.init,
        which may itself be trainable-only over a base of its own)."""
        in_base: set[str] = set()
        chain: Optional[Path] = path
        while chain is not None:
            in_base |= set(safe_read.read_metadata(chain).state_dict_metadata)
            chain = base_of(read_manifest(chain), chain)
        self.base = {"path": str(path.resolve()), "content_hash": content_hash(read_manifest(path))}
        self.saved_besides_trainable = {n for n, _ in model.named_parameters() if f"model.{n}" not in in_base}

    def load_weights(self, path: Path, model: nn.Module) -> dict[str, Any]:
        """Load a checkpoint's weights (and router buffers) into the possibly EP-sharded model, its base's
        first when it has one; every file is checked first. Returns the manifest."""
        manifest, problem = self.verify(path)
        if problem:
            raise CheckpointError(problem)
        base = base_of(manifest, path)
        if base is not None:
            self.load_weights(base, model)
        load_weights_into(path, model, self.pmesh, self.group, partial=base is not None)
        return manifest

    def load(self, path: Path, manifest: dict[str, Any], model: nn.Module, sync: GradSync) -> None:
        """Load weights, optimizer state and (same world size) RNG streams of a verified checkpoint."""
        same_world = manifest["world_size"] == dist.get_world_size()
        moments = getattr(torch, self.cfg.optim.moment_dtype)  # a checkpoint's other dtype is cast on read
        optim_states = {id(p): {"step": torch.zeros((), dtype=torch.float32),
                                **{k: torch.zeros_like(p, dtype=moments, memory_format=torch.contiguous_format)
                                   for k in ADAM_KEYS}}
                        for p in model.parameters() if p.requires_grad}
        saved = safe_read.read_metadata(path).state_dict_metadata
        names = None
        base = base_of(manifest, path)
        if base is not None:  # the frozen weights come from the base; the rest from here
            self.load_weights(base, model)
            names = {n for n, _ in model.named_parameters() if f"model.{n}" in saved}
            if not self.cfg.checkpoint.save_frozen:  # else the next saves are whole again
                self.base, self.saved_besides_trainable = manifest["base"], names
        state = _state_dict(model, optim_states, self.pmesh, with_rng=same_world, names=names)
        untrained = [name for name in state["optim"] if f"optim.{name}.exp_avg" not in saved]
        if untrained:
            raise CheckpointError(f"{path} has no optimizer state for {len(untrained)} parameters that train now "
                                  f"(e.g. {untrained[0]}): they were frozen when it was saved. Resume with the "
                                  f"train.trainable/train.frozen it was saved with, or start a new run with "
                                  f"checkpoint.init={path}")
        safe_read.load(state, path, self.group)
        sync.load_param_states(optim_states)
        if same_world:
            torch.set_rng_state(state["rng"][f"cpu_rank{dist.get_rank()}"])
            if f"cuda_rank{dist.get_rank()}" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"][f"cuda_rank{dist.get_rank()}"])


def _provided(params: dict[str, Tensor], buffers: dict[str, Tensor], meta: dict[str, Any],
              partial: bool) -> dict[str, Any]:
    """The part of a weights state dict that one checkpoint (its DCP metadata `meta`) provides. `partial`
    (trainable-only over a base): only what it holds. Otherwise every parameter but the adapters it lacks,
    which start at their init (the base model's function). Buffers when it has them: a converted HF
    model has none, and its routers' state (e.g. a dense_to_sparse schedule) starts afresh."""
    state: dict[str, Any] = {"model": {n: t for n, t in params.items()
                                       if f"model.{n}" in meta or not (partial or is_adapter_parameter(n))}}
    if buffers and any(k.startswith("buffers.") for k in meta):
        state["buffers"] = buffers
    return state


def load_full_model(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load a checkpoint's weights into an unsharded model in this process (no process group needed).

    Returns the manifest. DCP reads each global expert tensor whole, whatever
    layout wrote it. A trainable-only checkpoint loads its base first (checked); adapters that the
    checkpoint lacks keep their initial values (the base model's function).
    """
    manifest = read_manifest(path)
    base = base_of(manifest, path)
    if base is not None:
        verify(base)
        load_full_model(base, model)
    meta = safe_read.read_metadata(path).state_dict_metadata
    state = _provided({n: p.detach() for n, p in model.named_parameters()}, persistent_buffers(model), meta,
                      partial=base is not None)
    safe_read.load(state, path)
    return manifest


def load_weights_into(path: Path, model: nn.Module, pmesh: ParallelMesh, group: Any, partial: bool = False) -> None:
    """Load one checkpoint's weights (and router buffers, when it has them) into a possibly EP-sharded model.

    Collective over `group`. Shapes are compared first, so a mismatch names the tensor. `partial`: load
    only the parameters the checkpoint holds (a trainable-only checkpoint over its base)."""
    meta = safe_read.read_metadata(path).state_dict_metadata
    full = _state_dict(model, {}, pmesh, with_rng=False)
    state = _provided(full["model"], full.get("buffers", {}), meta, partial)
    for name, tensor in state["model"].items():
        md = meta.get(f"model.{name}")
        full = tuple(tensor.shape)  # a DTensor's shape is the global one
        if md is None or tuple(md.size) != full:
            found = "missing" if md is None else f"shape {tuple(md.size)}"
            raise CheckpointError(f"{path}: model.{name} is {found}, the model needs {full}")
    safe_read.load(state, path, group)
