"""Reading each launcher's environment: torchrun, Slurm, Open MPI, MPICH/Hydra, PMIx, none."""
from __future__ import annotations

import sys

import pytest

from moeyard.errors import LaunchError
from moeyard.launch.env import resolve_env, slurm_port, tasks_on_node

SLURM_STEP = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "6", "SLURM_NTASKS": "8",
              "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
              "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
              "SLURM_STEP_NODELIST": "gpu[07-08]"}


class FakeComm:
    """Stands in for mpi4py's COMM_WORLD where the env does not say the size or the master."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def bcast(self, value, root: int):
        assert root == 0
        return ("node-a", 31234) if value is None else value


def no_scontrol(nodelist: str) -> list[str]:
    raise AssertionError(f"scontrol must not be needed for {nodelist}")


def no_mpi4py_needed():
    raise AssertionError("mpi4py must not be needed here")


def test_torchrun_env() -> None:
    env = resolve_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "node0", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node0", 29500, "torchrun")


def test_torchrun_inside_slurm_wins() -> None:
    """`moeyard train` per Slurm node starts torchrun; its workers see both and must follow torchrun."""
    env = resolve_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                       "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1",
                       "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"})
    assert (env.rank, env.world_size, env.launcher) == (5, 8, "torchrun")


def test_no_launcher_is_one_process() -> None:
    env = resolve_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_slurm_batch_script_without_srun_is_one_process() -> None:
    """The batch script has SLURM_PROCID=0 and SLURM_NTASKS=N but no step: it is one process, not rank 0 of N."""
    env = resolve_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "9",
                       "SLURM_JOB_NODELIST": "gpu[01-02]"}, hostnames=no_scontrol)
    assert (env.world_size, env.launcher) == (1, "single")


def test_slurm_step_env() -> None:
    asked = []

    def hostnames(nodelist: str) -> list[str]:
        asked.append(nodelist)
        return ["gpu07", "gpu08"]

    env = resolve_env(SLURM_STEP, hostnames=hostnames)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (6, 8, 2, 4)
    assert (env.master_addr, env.master_port, env.launcher) == ("gpu07", slurm_port("4242"), "slurm")
    assert asked == ["gpu[07-08]"]


def test_slurm_master_can_be_overridden() -> None:
    env = resolve_env({**SLURM_STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"}, hostnames=no_scontrol)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 23456)


def test_slurm_port_is_the_same_for_every_task_and_differs_between_jobs() -> None:
    assert slurm_port("4242") == slurm_port("4242")
    assert len({slurm_port(str(job)) for job in range(100)}) == 100
    assert slurm_port("123456") == 20000 + 123456 % 20000  # what the sbatch script computes in bash
    assert all(20000 <= slurm_port(str(job)) < 40000 for job in range(1000))


@pytest.mark.parametrize("compact,node,tasks", [("4(x2)", 1, 4), ("2,1", 1, 1), ("3(x2),2", 2, 2), ("8", 0, 8)])
def test_slurm_tasks_per_node(compact: str, node: int, tasks: int) -> None:
    assert tasks_on_node(compact, node) == tasks


def test_open_mpi_env() -> None:
    env = resolve_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                       "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "1"}, mpi_world=lambda: FakeComm(1, 2))
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node-a", 31234, "mpi")


def test_open_mpi_inside_a_slurm_allocation_follows_mpi() -> None:
    """mpirun starts its daemons with srun, so Slurm's variables describe the daemon, not the rank."""
    env = resolve_env({**SLURM_STEP, "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "16",
                       "MASTER_ADDR": "h", "MASTER_PORT": "1"}, hostnames=no_scontrol)
    assert (env.rank, env.world_size, env.launcher) == (3, 16, "mpi")


def test_mpich_started_by_srun_proxies_follows_mpi() -> None:
    """Hydra starts one proxy per node with srun: SLURM_PROCID is the node, PMI_RANK the rank."""
    env = resolve_env({**SLURM_STEP, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "PMI_RANK": "5", "PMI_SIZE": "8",
                       "MASTER_ADDR": "h", "MASTER_PORT": "1"}, hostnames=no_scontrol)
    assert (env.rank, env.world_size, env.launcher) == (5, 8, "mpi")


def test_srun_with_pmix_follows_slurm() -> None:
    """srun --mpi=pmix (a common MpiDefault) sets PMIX_RANK == SLURM_PROCID: Slurm's variables say more."""
    env = resolve_env({**SLURM_STEP, "PMIX_RANK": SLURM_STEP["SLURM_PROCID"]}, hostnames=lambda n: ["gpu07"],
                      mpi_world=no_mpi4py_needed)
    assert (env.rank, env.world_size, env.launcher) == (6, 8, "slurm")


def test_mpich_hydra_env() -> None:
    env = resolve_env({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
                       "MASTER_ADDR": "h0", "MASTER_PORT": "5000"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (2, 4, 0, 2)
    assert (env.master_addr, env.launcher) == ("h0", "mpi")


def test_pmix_without_size_asks_mpi4py() -> None:
    env = resolve_env({"PMIX_RANK": "3"}, mpi_world=lambda: FakeComm(3, 4))
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (3, 4, "node-a", 31234)


def test_mpi_rank_0_offers_a_real_free_port() -> None:
    from moeyard.launch.env import _agree_on_master

    class Root(FakeComm):
        def bcast(self, value, root: int):
            return value

    host, port = _agree_on_master(Root(0, 2))
    assert host and 0 < port < 65536


@pytest.mark.parametrize("env,fragment", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "half set: RANK, WORLD_SIZE given but MASTER_ADDR, MASTER_PORT missing"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    ({**SLURM_STEP, "SLURM_PROCID": "8"}, "Slurm: rank 8 is outside world size 8"),
    ({**SLURM_STEP, "MASTER_ADDR": "a"}, "MASTER_ADDR is set but MASTER_PORT is not"),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_JOB_ID"}, "SLURM_JOB_ID is not set"),
    ({**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "four"}, "cannot read SLURM_STEP_TASKS_PER_NODE='four'"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_SIZE=4 says this is one of several tasks"),
    ({"PMI_SIZE": "2"}, "PMI_SIZE=2 says this is one of several tasks"),
])
def test_bad_env_is_explained(env, fragment) -> None:
    with pytest.raises(LaunchError) as err:
        resolve_env(env, hostnames=lambda nodelist: ["gpu07"], mpi_world=no_mpi4py_needed)
    assert fragment in str(err.value)


@pytest.mark.parametrize("env", [{"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, {"PMIX_RANK": "0"}])
def test_mpi_without_master_or_mpi4py_says_what_to_install(monkeypatch, env) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    with pytest.raises(LaunchError, match=r"mpi4py is missing: pip install 'moeyard\[mpi\]'"):
        resolve_env(env)


def test_a_plain_host_name_needs_no_scontrol() -> None:
    from moeyard.launch.env import scontrol_hostnames

    assert scontrol_hostnames("node5") == ["node5"]
