"""Who am I? Rank, world size and rendezvous address from the launcher's environment."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


class LaunchError(RuntimeError):
    """The environment of a worker does not describe a usable launch; the message says how to fix it."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """torchrun or single (a lone process with no launcher)."""


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as err:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from err


def resolve_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun/torchelastic variables; a process started without a launcher is rank 0 of 1."""
    env = os.environ if env is None else env
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    present = [k for k in keys if k in env]
    if not present:
        for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"):
            if env.get(key, "1").isdigit() and int(env.get(key, "1")) > 1:
                # Without this, N processes would each train alone and race on one run directory.
                raise LaunchError(f"{key}={env[key]}: started as one of several MPI/Slurm tasks, but moeyard "
                                  f"reads only torchrun's variables for now; start it with torchrun or "
                                  f"`moeyard train --nproc N`")
        return DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")
    missing = [k for k in keys if k not in env]
    if missing:
        raise LaunchError(f"launcher environment is half set: {', '.join(present)} given but {', '.join(missing)} "
                          f"missing; start workers with torchrun or `moeyard train --nproc N`")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    return DistEnv(rank, world, local_rank, local_world, env["MASTER_ADDR"], _int(env, "MASTER_PORT"), "torchrun")
