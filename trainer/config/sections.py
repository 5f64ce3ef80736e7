"""The whole run's configuration: YAML -> typed, validated dataclasses.

One tree (run, model, parallel, train, optim, data, log, checkpoint). Overrides
come as dotted keys (`--set optim.lr=3e-4`), parsed as YAML scalars. Unknown
keys, wrong types and impossible combinations raise `ConfigError` naming the
key before any worker starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from moeyard.errors import ConfigError, require
from moeyard.models import ModelConfig
from moeyard.models.recompute import RecomputeMode
from moeyard.parallel.plan import ReduceOnce
from moeyard.parallel.stages import SPLIT_BACKWARD, V_SHAPED
from moeyard.trainer.config.yaml_tree import build_dataclass, read_tree


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    """Names the run; `{name}` in run.dir is replaced by it."""
    dir: str = "runs/{name}"
    """Where the resolved config, metrics, TensorBoard events and checkpoints go."""
    seed: int = 0
    """Seeds model initialisation and data order; the same on every rank."""


@dataclass(kw_only=True)
class ParallelConfig:
    ep: int = 1
    """Expert-parallel degree: ranks that share one copy of all experts. Divides the ranks of a stage."""
    pp: int = 1
    """Pipeline stages (parallel/pipeline.py): stage s holds a contiguous run of decoder blocks (the first
    also the embedding, the last the output layer and loss) on ranks [s * world/pp, (s+1) * world/pp); inside
    a stage ep, fsdp and the exchange work as without stages, over dp = world / pp ranks."""
    layers_per_stage: Optional[list[int]] = None
    """Decoder blocks of each pipeline stage, in stage order: parallel.pp x schedule.stages_per_rank counts of
    at least one (the last: zero or more, a stage of its output layer, loss and MTP depths), adding up to
    model.n_layers (the MTP depths run on the last stage besides). null: as even
    as the count allows. schedule.mode=auto with schedule.hardware balances them with the cost and memory
    models (the first stage's embedding, the last's output layer, loss and MTP depths)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto: nccl when a GPU is present, gloo otherwise."""
    timeout_s: float = 600.0
    """A collective that waits longer than this fails the run instead of hanging it."""
    rendezvous_timeout_s: float = 300.0
    """How long workers wait for each other (and for the master's address) to start; then a clear error."""
    fsdp: bool = False
    """Shard parameters, gradients and AdamW state with torch's FSDP2: dense over dp, each rank's experts
    over its edp group, one unit per transformer block. Same updates as the replicated path."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """The dtype gradients travel in (all-reduce, reduce-scatter, FSDP2's reduce-scatter); bfloat16 halves
    the bytes and rounds each summand to 8 bits of mantissa. The gradients themselves stay float32."""
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """Older name of reduce_dtype, for fsdp only; bfloat16 here still applies when reduce_dtype is float32."""
    fsdp_reshard_after_forward: bool = True
    """fsdp: free each unit's gathered parameters after its forward (gather again in backward)."""
    fsdp_gather_once: bool = False
    """fsdp with gradient accumulation: gather each unit's parameters once per step and reduce-scatter its
    gradients once, keeping the unsharded weights and gradients through the micro-steps (accumulated in
    reduce_dtype): one gather and one reduction per unit a step instead of two gathers and one reduction
    per micro-step, at the memory of the unsharded model. schedule.mode=auto weighs it where the memory
    per rank is known (a GPU) and reduce_dtype is float32."""
    fsdp_reduce_once: bool | list[bool] = True
    """With fsdp_gather_once: reduce-scatter the gradients once per step, accumulated unsharded in reduce_dtype
    (the fastest; holds the unsharded gradients). false: reduce-scatter each micro-step's into float32
    shards, keeping only the weights gathered (resident weights in the compute dtype, a float32 master
    shard and AdamW state sharded, as Megatron's distributed optimizer): the unsharded gradients never
    accumulate, at one reduction per micro-step. Works with reduce_dtype=bfloat16. A list: one value per
    pipeline rank (parallel.pp of them), so that the ranks with memory to spare reduce once and the others
    every micro-step (DeepSeek-V3's first rank holds the embedding and three dense blocks, whose gradients
    reduced every micro-step cost more than the experts of the ranks after it); schedule.mode=auto with
    schedule.hardware chooses it rank by rank."""
    ranks_per_node: Optional[int] = None
    """Ranks that share a machine (consecutive ranks); null: the launcher's local world size. Set it to
    treat one machine as several nodes (tests, simulations)."""

    @property
    def reduce_once(self) -> ReduceOnce:
        """fsdp_reduce_once as plans and the memory model take it (a list as a tuple)."""
        once = self.fsdp_reduce_once
        return once if isinstance(once, bool) else tuple(once)

    @property
    def effective_reduce_dtype(self) -> str:
        """reduce_dtype, or under fsdp its older name fsdp_reduce_dtype when only that was set."""
        return self.fsdp_reduce_dtype if self.fsdp and self.reduce_dtype == "float32" else self.reduce_dtype

    @property
    def reduce_bytes(self) -> int:
        """Bytes per gradient element in the reduction (what the cost and memory models charge)."""
        return 2 if self.effective_reduce_dtype == "bfloat16" else 4


@dataclass(kw_only=True)
class ScheduleConfig:
    mode: Literal["off", "manual", "auto"] = "off"
    """off: the plain reference path (r=1, gradients reduced after backward); manual: the values
    below; auto: the planner picks r per layer and the buckets from measurements of this machine."""
    chunks: int = 2
    """manual: pipeline degree r of every MoE layer."""
    bucket_mb: float = 4.0
    """manual: gradient bucket size in MiB."""
    grad_sync: Literal["all_reduce", "reduce_scatter"] = "all_reduce"
    """reduce_scatter: ZeRO-style sharded optimizer state (dense over dp, experts over edp)."""
    hardware: Optional[str] = None
    """auto: plan from this hardware description (YAML file or shipped name) instead of profiling."""
    predict: bool = False
    """off/manual: also profile (cached) and log the predicted step time next to the measured one."""
    check_steps: int = 3
    """auto: after 2 warm-up steps, time this many steps with the plan and as many with every MoE layer at
    r=1, and keep r=1 if the plan was slower by more than 3% (trainer/scheduler/plan_check.py); 0: trust the plan."""
    dispatch: Literal["flat", "hierarchical", "auto"] = "flat"
    """How tokens reach experts on other machines. flat: one all-to-all over the ep group, a row per
    (token, expert). hierarchical: a row per (token, destination machine) over the network, fanned out to
    the experts inside that machine, partial sums combined there on the way back. auto: mode=auto lets
    the planner choose per MoE layer; otherwise hierarchical wherever the ep group spans machines."""
    pipeline: Literal["gpipe", "1f1b", "overlapped_1f1b", "interleaved_1f1b", "looped_bfs",
                      "interleaved_zero_bubble", "zbv_zero_bubble", "dualpipev"] = "1f1b"
    """parallel.pp > 1: torch's pipeline schedule. gpipe: every forward, then every backward; 1f1b: one
    forward, one backward in the steady state (at most pp micro-batches' activations held); overlapped_1f1b:
    1f1b whose steady-state forward and backward (of two micro-batches) run side by side, each one's
    all-to-alls hidden behind the other's compute (Megatron-Core's combined 1F1B, DualPipe's overlap; one
    micro-batch more in flight; parallel/lanes.py); interleaved_1f1b
    and looped_bfs: stages_per_rank stages on each rank, looped (a smaller bubble: (pp - 1) / stages_per_rank
    micro-steps); interleaved_zero_bubble: torch's ZB1P order of the same looped stages, its backward split
    into input and weight steps (defer_weight_gradients). zbv_zero_bubble and
    dualpipev (DeepSeek-V3's schedule; at least 2 x pp micro-batches): two stages a rank placed in a V, rank r
    holding stages r and 2 pp - 1 - r (the first rank both the embedding and the output layer, so no copy of
    the embedding), their backward split into input and weight steps as interleaved_zero_bubble's; dualpipev's
    paired forward and backward (of two micro-batches, on the rank's two stages) run side by side in two lanes
    with replicated stages, as overlapped_1f1b's, and one after the other under fsdp."""
    stages_per_rank: int = 2
    """interleaved_1f1b, looped_bfs, interleaved_zero_bubble: pipeline stages on each rank (virtual stages); the
    model is cut into parallel.pp x stages_per_rank stages, rank r holding stages r, r + pp, ...
    zbv_zero_bubble and dualpipev: 2, placed in a V."""
    defer_weight_gradients: bool = True
    """interleaved_zero_bubble, zbv_zero_bubble, dualpipev: their weight steps compute the weight gradients of the
    blocks' linear layers and experts (models/weight_steps.py; not the router's, the embedding's or the output
    layer's), filling the bubble, wherever the gradient sync can hold its reduction until they have run
    (replicated stages; fsdp gathered once, on a pipeline rank reducing once); each pending weight step holds
    its GEMMs' inputs and output gradients. false: the whole backward in the input step, the bubble
    interleaved_1f1b's, nothing held. mode=auto weighs both."""
    memory_check: bool = True
    """moeyard train refuses, before any worker starts, a run whose predicted peak per rank exceeds this
    machine's memory (a GPU's, or the host's available memory shared by the local workers); with
    mode=auto it picks the micro-batch size, recompute mode and sharding that fit. false: start anyway."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps of the whole run (the LR schedule spans them)."""
    global_batch_tokens: int = 8192
    """Tokens per optimizer step over all ranks; a multiple of train.seq_len."""
    seq_len: int = 256
    """Tokens per training sequence (at most model.max_seq_len)."""
    micro_batch_size: Optional[int] = None
    """Sequences per rank per forward/backward; null runs a rank's whole share at once.
    Smaller values accumulate gradients over several micro-steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    loss_chunk_tokens: int = 8192
    """The language-model loss projects this many tokens to logits at a time, and recomputes them in
    backward, so the float32 [tokens, vocab] logits never exist whole; 0: all of a micro-batch at once."""
    recompute: RecomputeMode = "none"
    """Activation checkpointing (models/recompute.py). selective: blocks keep their GEMM outputs and recompute
    norms, RoPE, attention's core and activations (no GEMM or all-to-all again); experts: the routed experts
    keep only their input rows (as model.moe.recompute_experts: true); full: every block keeps only its
    input and is recomputed in backward, all-to-alls included."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: float32 on CPU, bfloat16 autocast on GPU."""
    fp8: Literal["none", "rowwise"] = "none"
    """rowwise: the blocks' linear layers (attention and MLA projections, dense and shared FFNs, MTP
    projections) run their GEMMs in float8 e4m3, one power-of-two scale per row of each operand, and the
    routed experts their forward and input-gradient GEMMs (models/float8.py); the embedding, output layer,
    routers, norms, attention's core and the experts' weight gradients keep train.dtype. A GPU needs sm89
    or newer and bfloat16; CPU runs torch's reference kernel (tests)."""
    fp8_dispatch: bool = False
    """With fp8=rowwise, under expert parallelism: the routed experts' input rows travel to them as e4m3 bytes
    with one float32 scale a row (half of a bfloat16 row; DeepSeek-V3's recipe). Their FP8 GEMMs multiply the
    same values; the experts' weight gradients see the rounded rows; gradients travel back in train.dtype.
    The flat exchange only (schedule.dispatch=flat)."""
    stop_at: Optional[int] = None
    """Save a checkpoint at this step and exit cleanly; the LR schedule and data order still follow
    train.steps, so the next launch (auto-resume) continues the same run. Splits a run into jobs."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A NaN/inf loss or gradient: skip that step (counted in metrics), or stop with a checkpoint of the
    last good state."""
    max_skipped_steps: int = 10
    """nonfinite=skip: stop anyway after this many skipped steps in a row."""
    trainable: Optional[list[str]] = None
    """Only parameters whose name matches one of these shell-style patterns train (null: all of them),
    e.g. ["layers.*.attn.*"]. Names are the single-device model's, at any ep."""
    frozen: list[str] = field(default_factory=list)
    """Parameters matching these patterns do not train (applied after train.trainable), e.g.
    ["*.experts.*", "*.router.*"]: no gradient, no optimizer state, no gradient communication."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    """The cosine schedule ends here."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    """Applied to matrices only, not to norm gains."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    moment_dtype: Literal["float32", "bfloat16"] = "float32"
    """What AdamW's two moments are stored in. bfloat16 (as DeepSeek-V3 trained) halves their bytes (4
    instead of 8 a parameter); each update still runs in float32 and rounds them back. On the tiny demo over
    300 steps it moves the final loss by the amount README's "bf16 state" section states."""

    @property
    def moment_bytes(self) -> int:
        return 2 if self.moment_dtype == "bfloat16" else 4


@dataclass(kw_only=True)
class DataSourceConfig:
    dir: str
    """A prepared corpus (`moeyard prepare`)."""
    weight: float = 1.0
    """Its share of the samples (weights are normalised over data.sources)."""
    name: Optional[str] = None
    """How metrics and checkpoints name it; null: the folder's name."""

    @property
    def label(self) -> str:
        return self.name or Path(self.dir).name


@dataclass(kw_only=True)
class DataConfig:
    source: Optional[str] = None
    """A directory of text files to tokenize on first use, or `python-stdlib` for this Python's own .py
    files; null: data.dir must already hold a prepared corpus (`moeyard prepare`)."""
    dir: Optional[str] = None
    """Prepared token shards; null: a cache folder keyed by data.source."""
    glob: str = "*.py"
    """Which files of the source directory are read (recursively)."""
    sources: Optional[list[DataSourceConfig]] = None
    """A weighted blend of prepared corpora, [{dir, weight, name}]; instead of data.dir and data.source.
    Samples follow the weights exactly (deterministic from run.seed), at any world size."""
    document_mask: bool = False
    """Attention stays inside each document of a packed window and positions restart at each document
    (from the corpus's document index), through the per-document kernel: no T x T mask."""


@dataclass(kw_only=True)
class SFTConfig:
    """Instruction tuning (trainer/data/sft.py): replaces the pretraining corpus of `data`."""

    data: Optional[str] = None
    """A JSONL file of {"messages": [...]} or {"prompt", "completion"} lines, or `python-stdlib-defs` (the
    demo task built from this Python's standard library); null: pretraining, not SFT."""
    tokenizer: Optional[str] = None
    """A local Hugging Face tokenizer folder whose chat template renders the conversations; null: the
    built-in template over the byte tokenizer."""
    layout: Literal["pack", "pad"] = "pack"
    """pack: several examples per row, attention kept inside each; pad: one example per row."""
    heldout_fraction: float = 0.05
    """Conversations held out (a fixed random choice) for the eval loss."""
    eval_every: int = 50
    """Report the held-out loss every N steps and at the end (0: only at the end)."""
    skip_malformed: bool = False
    """Skip (and count) lines that are not valid conversations instead of stopping at the first."""


@dataclass(kw_only=True)
class LogConfig:
    every: int = 10
    """Write metrics.jsonl and TensorBoard at step 1, every N steps, and at the last step."""
    tensorboard: bool = True
    progress: bool = True
    """Progress bar with loss, tokens/s and ETA on rank 0."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0
    """Save a sharded checkpoint every N steps; 0 saves only at the end of the run (and on stop_at,
    preemption or a non-finite stop)."""
    resume: str = "auto"
    """auto: continue from the newest intact checkpoint of run.dir (if any); none: start fresh (refused
    if run.dir already holds a run); or the path of a checkpoint folder to start from."""
    keep_last: int = 3
    """Keep the newest N complete checkpoints (0: keep all)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    async_save: bool = False
    """Write checkpoints in the background while training continues (published before the next one)."""
    init: Optional[str] = None
    """Start a fresh run from these weights (a `moeyard convert` output, or any checkpoint folder, or a
    run's checkpoints folder for its latest); the model section comes from it. Resuming wins over it."""
    stop_grace_s: float = 300.0
    """After a stop (SIGTERM, Ctrl-C, the launcher gone) workers have this long to save before they are
    killed; size it to a checkpoint write."""
    save_frozen: bool = False
    """false: a run from `init` with frozen parameters saves only what can differ from init (trainable
    weights, their optimizer state), small adapter checkpoints that refer to init by path and content hash;
    true: every checkpoint holds every weight."""


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir.format(name=self.run.name))

    @property
    def global_batch_sequences(self) -> int:
        return self.train.global_batch_tokens // self.train.seq_len

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages on each rank: schedule.stages_per_rank for the looped schedules, two in a V, else 1."""
        if self.schedule.pipeline in V_SHAPED:
            return 2
        return self.schedule.stages_per_rank if self.schedule.pipeline in LOOPED else 1

    @property
    def lanes(self) -> bool:
        """Whether the pipeline runs a forward and a backward side by side in two threads (parallel/lanes.py):
        overlapped_1f1b, and dualpipev's pairs with replicated stages (FSDP2's hooks are not made for two
        threads: under fsdp dualpipev runs each pair one after the other)."""
        return self.parallel.pp > 1 and (self.schedule.pipeline == "overlapped_1f1b" or (
            self.schedule.pipeline == "dualpipev" and not self.parallel.fsdp))

    @property
    def defers_weight_gradients(self) -> bool:
        """Whether a split-backward schedule's weight steps get the weight gradients (schedule.defer_weight_gradients;
        where the gradient sync cannot hold its reduction, they stay empty)."""
        return (self.parallel.pp > 1 and self.schedule.pipeline in SPLIT_BACKWARD
                and self.schedule.defer_weight_gradients)

    @property
    def v_shape(self) -> bool:
        """Whether the pipeline's stages are placed in a V (parallel.stages.V_SHAPED)."""
        return self.parallel.pp > 1 and self.schedule.pipeline in V_SHAPED

    @property
    def grad_sync(self) -> str:
        """How gradients and optimizer state are shared as configured: fsdp, or schedule.grad_sync."""
        return "fsdp" if self.parallel.fsdp else self.schedule.grad_sync


def build_config(tree: dict[str, Any]) -> Config:
    """A config as recorded (a checkpoint manifest, a dumped run config): typed, not re-validated."""
    return build_dataclass(Config, tree, "")


def validate(cfg: Config) -> None:
    """Checks that involve more than one section."""
    t, m = cfg.train, cfg.model
    for key in ("steps", "global_batch_tokens", "seq_len"):
        require(getattr(t, key) >= 1, f"train.{key}={getattr(t, key)} must be >= 1")
    require(t.seq_len <= m.max_seq_len, f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    require(t.global_batch_tokens % t.seq_len == 0,
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of train.seq_len={t.seq_len}")
    require(t.micro_batch_size is None or t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1 or null")
    require(t.loss_chunk_tokens >= 0, f"train.loss_chunk_tokens={t.loss_chunk_tokens} must be >= 0 (0: no chunks)")
    require(cfg.parallel.ep >= 1, f"parallel.ep={cfg.parallel.ep} must be >= 1")
    _validate_pipeline(cfg)
    require(not t.fp8_dispatch or t.fp8 == "rowwise",
            f"train.fp8_dispatch=true sends the experts FP8 rows for their FP8 GEMMs: set train.fp8=rowwise "
            f"(it is {t.fp8}) or drop train.fp8_dispatch")
    require(not t.fp8_dispatch or cfg.schedule.dispatch == "flat",
            f"train.fp8_dispatch=true is built for the flat exchange, not schedule.dispatch="
            f"{cfg.schedule.dispatch} (hierarchical rows carry their weights as columns): set schedule.dispatch=flat")
    require(cfg.schedule.chunks >= 1, f"schedule.chunks={cfg.schedule.chunks} must be >= 1")
    require(cfg.schedule.bucket_mb > 0, f"schedule.bucket_mb={cfg.schedule.bucket_mb} must be > 0")
    require(cfg.schedule.check_steps >= 0, f"schedule.check_steps={cfg.schedule.check_steps} must be >= 0")
    _validate_sources(cfg.data)
    require(cfg.data.source is not None or cfg.data.dir is not None or cfg.data.sources or cfg.sft.data is not None,
            "set data.dir to a prepared corpus (moeyard prepare) or data.source to a folder of text files "
            "(or python-stdlib), or sft.data to a JSONL file of conversations")
    require(0 <= cfg.sft.heldout_fraction < 1, f"sft.heldout_fraction={cfg.sft.heldout_fraction} must be in [0, 1)")
    require(cfg.sft.eval_every >= 0, f"sft.eval_every={cfg.sft.eval_every} must be >= 0")
    require(m.moe.num_experts_per_layer is not None or m.moe.num_experts % cfg.parallel.ep == 0,
            f"model.moe.num_experts={m.moe.num_experts} is not divisible by parallel.ep={cfg.parallel.ep}")
    uneven = [n for n in m.moe.num_experts_per_layer or [] if n % cfg.parallel.ep]
    require(not uneven, f"model.moe.num_experts_per_layer={m.moe.num_experts_per_layer} has layers whose experts "
                        f"do not split evenly over parallel.ep={cfg.parallel.ep}: choose a parallel.ep that "
                        f"divides every count")
    require(not (cfg.parallel.fsdp and cfg.schedule.grad_sync == "reduce_scatter"),
            "parallel.fsdp=true already shards the optimizer state: drop schedule.grad_sync=reduce_scatter")
    require(cfg.parallel.fsdp or not cfg.parallel.fsdp_gather_once,
            "parallel.fsdp_gather_once=true needs parallel.fsdp=true (replicated weights are never gathered)")
    once = cfg.parallel.fsdp_reduce_once
    shown = str(once).lower()
    values = 1 if isinstance(once, bool) else len(once)
    require(isinstance(once, bool) or values == cfg.parallel.pp,
            f"parallel.fsdp_reduce_once={shown} has {values} values for parallel.pp={cfg.parallel.pp} pipeline "
            f"ranks: give one true or false for all of them, or one per pipeline rank")
    require(not isinstance(once, list) or (cfg.parallel.fsdp and cfg.parallel.fsdp_gather_once),
            f"parallel.fsdp_reduce_once={shown} chooses, rank by rank, between reducing once a step and in every "
            f"micro-step, which only fsdp gathered once does: set parallel.fsdp=true and "
            f"parallel.fsdp_gather_once=true, or give one true or false")
    require((all(once) if isinstance(once, list) else once) or cfg.parallel.fsdp_gather_once,
            f"parallel.fsdp_reduce_once={shown} needs parallel.fsdp_gather_once=true (per micro-step "
            f"fsdp reduces every micro-step already)")
    require(cfg.parallel.timeout_s > 0, "parallel.timeout_s must be > 0")
    require(cfg.parallel.rendezvous_timeout_s > 0, "parallel.rendezvous_timeout_s must be > 0")
    require(cfg.checkpoint.stop_grace_s > 0, "checkpoint.stop_grace_s must be > 0")
    require(cfg.log.every >= 1, f"log.every={cfg.log.every} must be >= 1")
    c = cfg.checkpoint
    require(c.every >= 0, f"checkpoint.every={c.every} must be >= 0")
    require(c.keep_last >= 0 and c.keep_every >= 0, "checkpoint.keep_last and checkpoint.keep_every must be >= 0")
    require(t.stop_at is None or 1 <= t.stop_at <= t.steps,
            f"train.stop_at={t.stop_at} must be between 1 and train.steps={t.steps}")
    require(t.max_skipped_steps >= 1, "train.max_skipped_steps must be >= 1")
    require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    o = cfg.optim
    require(0 <= o.warmup_steps, "optim.warmup_steps must be >= 0")
    require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1,
            f"optim.beta1={o.beta1} and optim.beta2={o.beta2} must be in [0, 1)")
    require(o.eps > 0 and o.weight_decay >= 0, "optim.eps must be > 0 and optim.weight_decay >= 0")
    try:
        cfg.run.dir.format(name=cfg.run.name)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"run.dir={cfg.run.dir!r} has a placeholder other than {{name}}: {err}") from None
    require(0 < cfg.optim.lr and 0 <= cfg.optim.min_lr <= cfg.optim.lr,
            f"optim.lr={cfg.optim.lr} must be > 0 and optim.min_lr={cfg.optim.min_lr} between 0 and optim.lr")


ONE_STAGE_PER_RANK = ("gpipe", "1f1b", "overlapped_1f1b")
LOOPED = ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble")
"""The pipeline schedules moeyard runs (parallel/pipeline.py): one stage a rank, looped stages, and V_SHAPED."""
ROUNDS = ("interleaved_1f1b", "interleaved_zero_bubble")
"""The schedules that run the micro-batches in rounds of pp (torch refuses a count that does not split)."""
WITHOUT_FSDP = ("overlapped_1f1b",)
"""The schedules refused with parallel.fsdp (_validate_pipeline says why)."""


def _validate_pipeline(cfg: Config) -> None:
    """What parallel.pp > 1 runs with today; each refusal names the setting to change."""
    pp, m, s = cfg.parallel.pp, cfg.model, cfg.schedule
    require(pp >= 1, f"parallel.pp={pp} must be >= 1")
    require(pp > 1 or cfg.parallel.layers_per_stage is None,
            f"parallel.layers_per_stage={cfg.parallel.layers_per_stage} splits pipeline stages, and parallel.pp=1 "
            f"has none: set it to null, or set parallel.pp")
    if pp == 1:
        return
    require(s.pipeline not in V_SHAPED or s.stages_per_rank == 2,
            f"schedule.pipeline={s.pipeline} places exactly 2 stages on each rank, in a V (rank r holds stages r and "
            f"2 pp - 1 - r), and schedule.stages_per_rank={s.stages_per_rank}: set it to 2, or use "
            f"schedule.pipeline=interleaved_zero_bubble for {s.stages_per_rank} looped stages a rank")
    require(s.pipeline not in LOOPED or s.stages_per_rank >= 2,
            f"schedule.pipeline={s.pipeline} runs schedule.stages_per_rank >= 2 stages on each rank "
            f"(it is {s.stages_per_rank}); use schedule.pipeline=1f1b for one")
    require(s.pipeline != "overlapped_1f1b" or not cfg.parallel.fsdp,
            "schedule.pipeline=overlapped_1f1b with parallel.fsdp: a forward and a backward run side by side on "
            "the same FSDP units, whose hooks are not made for two threads; use parallel.fsdp=false (replicated "
            "stages) or schedule.pipeline=1f1b")
    require(not cfg.lanes or m.moe.switch.jitter == 0,
            f"schedule.pipeline={s.pipeline} with model.moe.switch.jitter: the jitter is drawn from the process's "
            f"random state, which recomputation in the other lane saves and restores at the same time; set "
            f"model.moe.switch.jitter=0 or use schedule.pipeline=1f1b")
    stages = pp * cfg.stages_per_rank
    require(stages <= m.n_layers, f"parallel.pp={pp} x {cfg.stages_per_rank} stages per rank for model.n_layers="
                                  f"{m.n_layers} blocks: every stage needs at least one block; lower parallel.pp"
                                  f"{' or schedule.stages_per_rank' if cfg.stages_per_rank > 1 else ''}")
    split = cfg.parallel.layers_per_stage
    require(split is None or (len(split) == stages and sum(split) == m.n_layers and min(split[:-1]) >= 1
                              and split[-1] >= 0),
            f"parallel.layers_per_stage={split} must give each of the {stages} stages (parallel.pp={pp} x "
            f"{cfg.stages_per_rank} a rank) at least one block (the last: zero or more, beside its output layer "
            f"and loss), {m.n_layers} (model.n_layers) in all; set it to null for an even split")
    require(s.grad_sync != "reduce_scatter",
            "schedule.grad_sync=reduce_scatter (ZeRO) with parallel.pp > 1: its gradient buckets are cut for the "
            "whole model, not a stage's part; use parallel.fsdp=true (with parallel.fsdp_gather_once=true it "
            "gathers and reduces once per step, as ZeRO does) or schedule.grad_sync=all_reduce")


def _validate_sources(data: DataConfig) -> None:
    if data.sources is None:
        return
    require(len(data.sources) >= 1, "data.sources is empty: list at least one {dir, weight}, or remove it")
    require(data.source is None and data.dir is None,
            "data.sources replaces data.dir and data.source: set one or the other")
    for i, source in enumerate(data.sources):
        require(source.weight > 0, f"data.sources[{i}].weight={source.weight} must be > 0")
    labels = [s.label for s in data.sources]
    twice = sorted({n for n in labels if labels.count(n) > 1})
    require(not twice, f"data.sources: the names {twice} occur twice (folders of the same name): give each a "
                       f"distinct `name`")
    folders = [str(Path(s.dir).resolve()) for s in data.sources]
    again = sorted({f for f in folders if folders.count(f) > 1})
    require(not again, f"data.sources lists the corpus {again[0] if again else ''} more than once (under "
                       f"different names): list each corpus once and give it the weight it should have")


def validate_for_world(cfg: Config, world_size: int) -> None:
    """Checks that need the number of processes."""
    ep, pp = cfg.parallel.ep, cfg.parallel.pp
    if pp == 1:
        require(world_size % ep == 0, f"world size {world_size} is not a multiple of parallel.ep={ep}: start a "
                                      f"multiple of {ep} processes (--nproc) or change parallel.ep")
    require(world_size % (ep * pp) == 0,
            f"world size {world_size} is not a multiple of parallel.pp x parallel.ep = {pp} x {ep}: start a "
            f"multiple of {pp * ep} processes (--nproc) or change parallel.ep / parallel.pp")
    dp = world_size // pp
    ranks = f"the {dp} ranks of each of the {pp} pipeline stages" if pp > 1 else f"{dp} processes"
    seqs = cfg.global_batch_sequences
    require(seqs % dp == 0,
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is {seqs} sequences of train.seq_len, "
            f"which do not split evenly over {ranks}")
    mbs = cfg.train.micro_batch_size
    if mbs is not None:
        require((seqs // dp) % mbs == 0,
                f"train.micro_batch_size={mbs} does not divide the {seqs // dp} sequences each of {ranks} gets")
    micro_steps = (seqs // dp) // (mbs or seqs // dp)
    require(pp == 1 or micro_steps >= pp,
            f"{micro_steps} micro-batches per step for parallel.pp={pp} stages: a pipeline needs at least one "
            f"micro-batch per stage in flight; lower train.micro_batch_size to {max(1, seqs // dp // pp)} or less")
    require(pp == 1 or cfg.schedule.pipeline != "dualpipev" or micro_steps >= 2 * pp,
            f"schedule.pipeline=dualpipev runs at least as many micro-batches as its 2 x parallel.pp={pp} stages, "
            f"and each of {ranks} gets {micro_steps}: lower train.micro_batch_size to "
            f"{max(1, seqs // dp // (2 * pp))} or less, or use schedule.pipeline=zbv_zero_bubble")
    rounds = max(1, micro_steps // pp)
    require(pp == 1 or cfg.schedule.pipeline not in ROUNDS or micro_steps % rounds == 0,
            f"schedule.pipeline={cfg.schedule.pipeline} runs the micro-batches in rounds of parallel.pp={pp}: "
            f"{micro_steps} micro-batches do not split into {rounds} equal rounds; choose train.micro_batch_size "
            f"so that the micro-batches are a multiple of {pp}")


def accepted(cfg: Config, world_size: int) -> bool:
    """Whether the checks above accept `cfg` on `world_size` ranks (the planners weigh only such runs)."""
    try:
        validate(cfg)
        validate_for_world(cfg, world_size)
    except ConfigError:
        return False
    return True


def config_from_tree(tree: dict[str, Any]) -> Config:
    """Typed and validated (checks that need no checkpoint, corpus or model)."""
    cfg = build_dataclass(Config, tree, "")
    validate(cfg)
    return cfg


def read_config(path: Optional[str | Path], overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """What the YAML file (or the defaults when `path` is None) and the overrides say, validated. Touches no
    checkpoint, builds no model and knows no world: `moeyard.load_config` (trainer.config.resolve) is the
    config a run uses."""
    return config_from_tree(read_tree(path, overrides))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
