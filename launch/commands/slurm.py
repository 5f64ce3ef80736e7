"""`moeyard slurm`: render (or submit) the sbatch script of a run."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from moeyard import configs
from moeyard.errors import LaunchError
from moeyard.launch.worker import add_overrides
from moeyard.trainer.config.resolve import resolve_run
from moeyard.trainer.config.sections import validate_for_world
from moeyard.trainer.data.tokens import default_cache_root
from moeyard.trainer.preflight import check_inputs


def _data_paths(cfg) -> tuple[Path, ...]:
    """What workers read besides the config: the corpus (or its source) and the cache it is prepared in."""
    from moeyard.trainer.data.sft_demo import DEMO
    from moeyard.trainer.data.tokens import STDLIB

    paths = []
    blend = [source.dir for source in cfg.data.sources or []]
    for path in (cfg.data.dir, cfg.data.source, *blend, cfg.sft.data, cfg.sft.tokenizer, cfg.checkpoint.init):
        if path and path not in (STDLIB, DEMO):
            paths.append(Path(path).resolve().parent)
    return tuple(paths)


def _make_run_dir(run_dir: Path) -> None:
    """The job writes its log, checkpoints and lock there: say now if it cannot."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as err:
        raise LaunchError(f"run.dir {run_dir} cannot be written ({err.strerror}): choose a run.dir the job can "
                          f"write (--set run.dir=...)") from None


def cmd_slurm(args: argparse.Namespace) -> int:
    from moeyard.launch.slurm import SlurmJob, render_sbatch, submit

    config = Path(args.config or configs.path("tiny.yaml")).resolve()
    cfg = resolve_run(config, args.overrides)
    nproc = args.nproc_per_node or args.gpus_per_node
    if nproc < 1:
        raise LaunchError("--gpus-per-node 0 (a CPU partition) needs --nproc-per-node, the workers per node")
    job = SlurmJob(config=config, run_dir=cfg.run_dir.resolve(), nodes=args.nodes,
                   gpus_per_node=args.gpus_per_node, nproc_per_node=nproc, overrides=args.overrides,
                   layout=args.layout, partition=args.partition, time=args.time, account=args.account,
                   signal_lead_s=args.signal_lead, max_restarts=args.max_restarts,
                   job_name=f"moeyard-{cfg.run.name}", cpus_per_task=args.cpus_per_task,
                   data_paths=_data_paths(cfg), cache_dir=default_cache_root().resolve(),
                   container_image=args.container_image, apptainer_image=args.apptainer)
    script = render_sbatch(job)
    validate_for_world(cfg, job.world_size)
    _make_run_dir(cfg.run_dir)  # Slurm does not create the folder of --output
    if not args.submit:
        print(script, end="")
        return 0
    # A job that would fail on its data or checkpoint fails here, not after its wait in the queue; a
    # corpus not prepared yet is left to the job (tokenizing is no work for a login node).
    check_inputs(cfg, prepare=False)
    job_id = submit(script, cfg.run_dir / "job.sbatch")
    print(job_id)
    print(f"submitted job {job_id}; its log: {cfg.run_dir.resolve()}/slurm-{job_id}.out", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    slurm = sub.add_parser("slurm", help="render an sbatch script (or submit it) that trains, checkpoints before "
                                         "the time limit and requeues itself")
    slurm.add_argument("config", nargs="?", help="YAML config (default: the shipped configs/tiny.yaml)")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU partition")
    slurm.add_argument("--nproc-per-node", type=int, default=None,
                       help="workers per node (default: --gpus-per-node)")
    slurm.add_argument("--layout", choices=["torchrun", "srun"], default="torchrun",
                       help="torchrun: one task per node starting its workers (default); srun: one task per "
                            "worker")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--signal-lead", type=int, default=120,
                       help="seconds before the time limit at which Slurm sends SIGUSR1 (default 120)")
    slurm.add_argument("--max-restarts", type=int, default=0,
                       help="torchrun layout: restart all workers up to N times after a failure")
    slurm.add_argument("--cpus-per-task", type=int, default=None,
                       help="cores per Slurm task: a whole node's worth in the torchrun layout, one worker's in "
                            "the srun layout (default: the cluster's default, often 1)")
    slurm.add_argument("--container-image", default=None,
                       help="run every task in this image with pyxis/enroot, e.g. docker://ghcr.io/org/moeyard:0.1.0")
    slurm.add_argument("--apptainer", default=None, metavar="SIF",
                       help="run every task in this Apptainer image (apptainer exec --nv)")
    add_overrides(slurm)
    slurm.add_argument("--submit", action="store_true", help="sbatch the script and print the job id")
    slurm.set_defaults(func=cmd_slurm)
