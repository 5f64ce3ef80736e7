"""Reading the launcher's environment."""
from __future__ import annotations

import pytest

from moeyard.launch.env import LaunchError, resolve_env


def test_torchrun_env() -> None:
    env = resolve_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node0", 29500, "torchrun")


def test_no_launcher_is_one_process() -> None:
    env = resolve_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


@pytest.mark.parametrize("env,fragment", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "half set: RANK, WORLD_SIZE given but MASTER_ADDR, MASTER_PORT missing"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_SIZE=4: started as one of several MPI/Slurm tasks"),
])
def test_bad_env_is_explained(env, fragment) -> None:
    with pytest.raises(LaunchError) as err:
        resolve_env(env)
    assert fragment in str(err.value)
