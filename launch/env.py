"""Who am I? Rank, world size and rendezvous address from whichever launcher started this process.

One function, `resolve_env`, one result, `DistEnv`, whatever started the worker:
torchrun (or any env:// launcher), Open MPI / MPICH / PMIx (`mpirun`), a Slurm
step (`srun`), or nothing at all (one process).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from moeyard.errors import LaunchError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """torchrun, slurm, mpi, or single (a lone process with no launcher)."""


def single_process() -> DistEnv:
    return DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as err:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from err


def _checked(rank: int, world: int, local_rank: int, local_world: int, source: str) -> None:
    if not 0 <= rank < world:
        raise LaunchError(f"{source}: rank {rank} is outside world size {world}")
    if not 0 <= local_rank < local_world:
        raise LaunchError(f"{source}: local rank {local_rank} is outside local world size {local_world}")


def _master_from_env(env: Mapping[str, str]) -> Optional[tuple[str, int]]:
    """MASTER_ADDR and MASTER_PORT, when the user (or the job script) set both."""
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    if "MASTER_ADDR" in env or "MASTER_PORT" in env:
        given = "MASTER_ADDR" if "MASTER_ADDR" in env else "MASTER_PORT"
        other = "MASTER_PORT" if given == "MASTER_ADDR" else "MASTER_ADDR"
        raise LaunchError(f"{given} is set but {other} is not: set both, or neither to let moeyard choose")
    return None


# --- torchrun -----------------------------------------------------------------------------------------

def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in keys if k not in env]
    if missing:
        present = [k for k in keys if k in env]
        raise LaunchError(f"launcher environment is half set: {', '.join(present)} given but {', '.join(missing)} "
                          f"missing; start workers with torchrun or `moeyard train --nproc N`")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    return DistEnv(rank, world, local_rank, local_world, env["MASTER_ADDR"], _int(env, "MASTER_PORT"), "torchrun")


# --- Slurm --------------------------------------------------------------------------------------------

def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list (`gpu[01-04],login1`) with `scontrol show hostnames`, as Slurm defines it."""
    if not re.search(r"[\[,]", nodelist):
        return [nodelist]
    if shutil.which("scontrol") is None:
        raise LaunchError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r}: `scontrol` is not on PATH; set "
                          f"MASTER_ADDR to the first node's address")
    try:
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=60)
    except (subprocess.SubprocessError, OSError) as err:
        proc, reason = None, str(err)
    if proc is None or proc.returncode != 0:
        if proc is not None:
            reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise LaunchError(f"`scontrol show hostnames {nodelist}` failed ({reason}); set MASTER_ADDR to the "
                          f"first node's address")
    return proc.stdout.split()


def in_slurm_step(env: Mapping[str, str]) -> bool:
    """Started by srun (a job step), not the batch script itself, which has SLURM_PROCID but no step id."""
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """How many tasks Slurm placed on node `node_id`, from its compact form, e.g. `4(x2),3`."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise LaunchError(f"cannot read SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}: Slurm writes it like "
                              f"'4(x2),3'; start the workers with srun and do not override it")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchError(f"SLURM_NODEID={node_id} is outside SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def slurm_port(job_id: str) -> int:
    """A port every task of a job derives alike, spread over jobs so neighbours on a node rarely collide.
    The sbatch scripts of `moeyard slurm` compute the same in bash (`launch/slurm.py`)."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 20000 + number % 20000


def _from_slurm(env: Mapping[str, str], hostnames: Callable[[str], list[str]]) -> DistEnv:
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID"):
        if key not in env:
            raise LaunchError(f"inside a Slurm step but {key} is not set: start the workers with `srun`")
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    local_world = tasks_on_node(per_node, _int(env, "SLURM_NODEID")) if per_node and "SLURM_NODEID" in env \
        else world
    _checked(rank, world, local_rank, local_world, "Slurm")
    master = _master_from_env(env)
    if master is None:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise LaunchError("inside a Slurm step but SLURM_JOB_NODELIST is not set; set MASTER_ADDR")
        hosts = hostnames(nodelist)
        if not hosts:
            raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} names no host; set MASTER_ADDR")
        master = hosts[0], slurm_port(env["SLURM_JOB_ID"])  # task 0 runs on the step's first node
    return DistEnv(rank, world, local_rank, local_world, master[0], master[1], "slurm")


# --- MPI ----------------------------------------------------------------------------------------------

_MPI_VARIABLES = (  # (rank, size, local rank, local size) of Open MPI, MPICH/Hydra and Intel MPI, PMIx
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)


def _mpi_world():
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise LaunchError("started by MPI, but the environment does not say the world size or the master "
                          "address, and mpi4py is missing: pip install 'moeyard[mpi]', or export MASTER_ADDR "
                          "and MASTER_PORT to all ranks") from err
    return MPI.COMM_WORLD


def _agree_on_master(comm) -> tuple[str, int]:
    """Rank 0 offers its host name and a free port; every rank receives the same pair."""
    offer = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            offer = (socket.getfqdn(), s.getsockname()[1])
    return comm.bcast(offer, root=0)


def _from_mpi(env: Mapping[str, str], names: tuple[str, str, str, str], mpi_world: Callable) -> DistEnv:
    rank_key, size_key, local_rank_key, local_size_key = names
    comm = None
    rank = _int(env, rank_key)
    if size_key in env:
        world = _int(env, size_key)
    else:
        comm = mpi_world()
        world = comm.Get_size()
    local_rank = _int(env, local_rank_key) if local_rank_key in env else rank
    local_world = _int(env, local_size_key) if local_size_key in env else world
    _checked(rank, world, local_rank, local_world, "MPI")
    master = _master_from_env(env)
    if master is None:
        master = _agree_on_master(comm or mpi_world())
    return DistEnv(rank, world, local_rank, local_world, master[0], master[1], "mpi")


def _check_not_half_set(env: Mapping[str, str]) -> None:
    """A size without a rank: N processes would each train alone and race on one run directory."""
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"):
        if env.get(key, "1").isdigit() and int(env.get(key, "1")) > 1:
            raise LaunchError(f"{key}={env[key]} says this is one of several tasks, but no rank variable is set "
                              f"(OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK or SLURM_PROCID): the launch is half "
                              f"set; start the workers with mpirun, srun or torchrun")


def available_cpus() -> int:
    """Cores this process may run on (the affinity Slurm or a container grants), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- the one entry point ------------------------------------------------------------------------------

def resolve_env(env: Optional[Mapping[str, str]] = None, *,
                hostnames: Callable[[str], list[str]] = scontrol_hostnames,
                mpi_world: Callable = _mpi_world) -> DistEnv:
    """Read the launcher's variables. Precedence: torchrun's (it may itself run inside Slurm or MPI),
    then MPI's (mpirun inside a Slurm allocation also sets Slurm's), then a Slurm step's. A process
    started without a launcher is rank 0 of 1.

    MASTER_ADDR/MASTER_PORT, when set, override the address Slurm or MPI would give.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _from_mpi(env, _MPI_VARIABLES[0], mpi_world)
    slurm_step = in_slurm_step(env)
    for names in _MPI_VARIABLES[1:]:
        # srun --mpi=pmi2/pmix sets PMI's rank equal to Slurm's: then Slurm's variables say more. A different
        # rank means an MPI launcher (Hydra, prterun) started its proxies with srun: the proxy's Slurm
        # variables describe the node, not the rank.
        if names[0] in env and not (slurm_step and env[names[0]] == env["SLURM_PROCID"]):
            return _from_mpi(env, names, mpi_world)
    if slurm_step:
        return _from_slurm(env, hostnames)
    _check_not_half_set(env)
    return single_process()
