"""Render (and optionally submit) an sbatch script that trains, survives the time limit and requeues itself.

Two layouts:
- `torchrun` (default): one Slurm task per node runs `moeyard train --nnodes N`, which starts that
  node's workers through torchrun and joins the c10d rendezvous on the first node. Restarts after a
  worker failure (`--max-restarts`) happen inside the allocation.
- `srun`: one Slurm task per worker (GPU) runs `python -m moeyard.train`; each reads its rank from
  Slurm's variables. No launcher process in between, so nothing to restart a failed worker.

Either way Slurm sends SIGUSR1 `--signal-lead` seconds before the time limit; the workers checkpoint at
the next step boundary and exit with 128 + signal, and the script requeues the job, which resumes from
that checkpoint (`checkpoint.resume: auto`).
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

from .env import LaunchError


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
    folders = {job.workdir, job.config.parent, job.run_dir.parent}
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
        'echo "moeyard: job $SLURM_JOB_ID start $(date -Is), restart ${SLURM_RESTART_COUNT:-0}"',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "port=$((20000 + SLURM_JOB_ID % 20000))",
        "",
    ]
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
        "if [ $rc -eq 138 ] || [ $rc -eq 143 ]; then  # SIGUSR1/SIGTERM: a checkpoint was written",
        '    echo "moeyard: stopped by a signal (exit $rc) after a checkpoint; requeueing to resume"',
        '    scontrol requeue "$SLURM_JOB_ID"',
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
