"""Render (and optionally submit) an sbatch script that trains, survives the time limit and requeues itself.

Two layouts:
- `torchrun` (default): one Slurm task per node runs `moeyard train --nnodes N`, which starts that
  node's workers through torchrun and joins the c10d rendezvous on the first node. Restarts after a
  worker failure (`--max-restarts`) happen inside the allocation.
- `srun`: one Slurm task per worker (GPU) runs `python -m moeyard.train`; each reads its rank from
  Slurm's variables. No launcher process in between, so nothing to restart a failed worker.

Either way Slurm sends SIGUSR1 `--signal-lead` seconds before the time limit; the workers checkpoint at
the next step boundary, leave run.dir/PREEMPTED and exit with 128 + signal, and the script requeues the
job, which resumes from that checkpoint (`checkpoint.resume: auto`). Task 0 must run on the first node
of the allocation (the default block distribution; not with `-m arbitrary` or heterogeneous jobs).
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from moeyard.errors import LaunchError


@dataclass(frozen=True)
class SlurmJob:
    config: Path
    run_dir: Path
    nodes: int
    gpus_per_node: int
    nproc_per_node: int
    overrides: list[str] = field(default_factory=list)
    layout: Literal["torchrun", "srun"] = "torchrun"
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    signal_lead_s: int = 120
    max_restarts: int = 0
    job_name: str = "moeyard"
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)
    cpus_per_task: Optional[int] = None
    """Cores per Slurm task (a whole node's worth in the torchrun layout); None: the cluster's default."""
    data_paths: tuple[Path, ...] = ()
    """Folders the workers read (the corpus or its source): mounted into a container at the same paths."""
    cache_dir: Optional[Path] = None
    """moeyard's cache (prepared corpora, profiles); in a container, mounted and named by MOEYARD_CACHE."""
    container_image: Optional[str] = None
    """Run each task in this image with pyxis/enroot (`srun --container-image`)."""
    apptainer_image: Optional[str] = None
    """Run each task in this Apptainer/Singularity image (`apptainer exec --nv`)."""

    def check(self) -> None:
        if self.nodes < 1:
            raise LaunchError(f"--nodes={self.nodes} must be >= 1")
        if self.gpus_per_node < 0 or self.nproc_per_node < 1:
            raise LaunchError("--gpus-per-node must be >= 0 and --nproc-per-node >= 1")
        if self.gpus_per_node and self.nproc_per_node > self.gpus_per_node:
            raise LaunchError(f"--nproc-per-node={self.nproc_per_node} is more than --gpus-per-node="
                              f"{self.gpus_per_node}: each worker needs its own GPU")
        for what, path in (("run.dir", self.run_dir), ("the working directory", self.workdir),
                           ("the config path", self.config)):
            if any(c.isspace() for c in str(path)):
                raise LaunchError(f"{what} {str(path)!r} contains white space, which #SBATCH lines cannot hold: "
                                  f"use a path without spaces")
        if self.layout == "srun" and self.max_restarts:
            raise LaunchError("--max-restarts needs the torchrun layout: in the srun layout nothing restarts a "
                              "failed worker")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError(f"--cpus-per-task={self.cpus_per_task} must be >= 1")
        if self.container_image and self.apptainer_image:
            raise LaunchError("choose one container runtime: --container-image (pyxis) or --apptainer")
        if self.signal_lead_s < 10:
            raise LaunchError(f"--signal-lead={self.signal_lead_s} s leaves no time to write a checkpoint")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def _task_prefix(job: SlurmJob) -> tuple[str, str]:
    """(srun options, command prefix) that run a task in the container, and its python."""
    q = shlex.quote
    folders = {job.workdir, job.config.parent, job.run_dir.parent, *job.data_paths}
    if job.cache_dir is not None:
        folders.add(job.cache_dir)
    mounts = sorted(str(f) for f in folders if not any(o != f and o in f.parents for o in folders))
    if job.container_image:  # the image's python; the job's folders mounted at the same paths
        binds = ",".join(f"{m}:{m}" for m in mounts)
        return (f" --container-image={q(job.container_image)} --container-mounts={binds} "
                f"--container-workdir={job.workdir}", "python")
    if job.apptainer_image:
        return "", f"apptainer exec --nv --bind {','.join(mounts)} {q(job.apptainer_image)} python"
    return "", q(job.python)


def render_sbatch(job: SlurmJob) -> str:
    job.check()
    q = shlex.quote
    srun_options, python = _task_prefix(job)
    sets = "".join(f" --set {q(a)}" for a in job.overrides)
    tasks_per_node = 1 if job.layout == "torchrun" else job.nproc_per_node
    lines = [
        "#!/bin/bash",
        f"# Rendered by `moeyard slurm` ({job.layout} layout): {job.nodes} node(s) x {job.nproc_per_node} "
        f"worker(s).",
        f"#SBATCH --job-name={re.sub(r'[^A-Za-z0-9_.-]+', '-', job.job_name)}",
        f"#SBATCH --nodes={job.nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
    ]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    lines += [
        f"#SBATCH --chdir={job.workdir}",
        f"#SBATCH --output={job.run_dir}/slurm-%j.out",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=USR1@{job.signal_lead_s}",
        "#SBATCH --requeue",
    ]
    for flag, value in (("partition", job.partition), ("time", job.time), ("account", job.account)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [
        "",
        "set -uo pipefail",
        "export PYTHONUNBUFFERED=1",
        f"run_dir={q(str(job.run_dir))}",
        "started=$(date +%s)",
        'echo "moeyard: job $SLURM_JOB_ID start $(date -Is), restart ${SLURM_RESTART_COUNT:-0}"',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "port=$((20000 + SLURM_JOB_ID % 20000))  # as launch/env.py's slurm_port",
        "",
    ]
    if (job.container_image or job.apptainer_image) and job.cache_dir is not None:
        lines.append(f"export MOEYARD_CACHE={q(str(job.cache_dir))}  # the host's cache, mounted in the container")
    if job.cpus_per_task:
        lines.append("export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun does not inherit it since 22.05")
    if job.layout == "torchrun":
        # The task's --node-rank comes from SLURM_NODEID, read by `moeyard train` itself.
        lines.append(f"srun --kill-on-bad-exit=1{srun_options} {python} -m moeyard train {q(str(job.config))} "
                     f"--nnodes {job.nodes} --nproc {job.nproc_per_node} --rdzv-endpoint \"$head_node:$port\" "
                     f"--rdzv-id \"$SLURM_JOB_ID\" --max-restarts {job.max_restarts}{sets}")
    else:
        lines += ['export MASTER_ADDR="$head_node" MASTER_PORT="$port"',
                  f"srun --kill-on-bad-exit=1{srun_options} {python} -m moeyard.train {q(str(job.config))}{sets}"]
    lines += [
        "rc=$?",
        "# Requeue only when this run's workers stopped on a signal after writing a checkpoint: a crash (or",
        "# peers killed because one crashed) leaves no fresh marker, and must not loop.",
        'marker="$run_dir/PREEMPTED"',
        'if [ -f "$marker" ] && [ "$(stat -c %Y "$marker")" -ge "$started" ]; then',
        '    echo "moeyard: stopped by a signal after a checkpoint (exit $rc); requeueing to resume"',
        '    scontrol requeue "$SLURM_JOB_ID" || echo "moeyard: scontrol requeue failed; sbatch this script '
        'again to resume" >&2',
        "fi",
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def submit(script: str, path: Path) -> str:
    """Write the script next to the run and sbatch it; return the job id."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH: run `moeyard slurm` without --submit on a machine without "
                          "Slurm, or from a login node of the cluster")
    path.write_text(script)
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch refused {path}: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]
