"""`moeyard slurm --nodes 2` on a real two-node Slurm: each slurmd in its own network namespace (own
address) and UTS namespace (own hostname), slurmctld beside node0. Both layouts train like a local run."""
from __future__ import annotations

import sys

import pytest
from helpers.runs import read_metrics
from helpers.slurm_cluster import SlurmCluster


@pytest.fixture(scope="module")
def two_host_slurm(tmp_path_factory):
    from helpers.netns import hosts

    with hosts() as pair:
        with SlurmCluster(tmp_path_factory.mktemp("slurm2"), hosts=pair).running() as cluster:
            yield cluster


@pytest.mark.parametrize("layout,nproc", [("torchrun", "1"), ("srun", "1")])
def test_two_slurm_nodes_train_like_a_local_run(two_host_slurm, tmp_path, launch_reference, layout, nproc) -> None:
    config, reference = launch_reference
    run_dir = tmp_path / "run"
    job = two_host_slurm.run(sys.executable, "-m", "moeyard", "slurm", str(config), "--nodes", "2",
                             "--gpus-per-node", "0", "--nproc-per-node", nproc, "--layout", layout,
                             "--set", f"run.dir={run_dir}", "--set", "parallel.timeout_s=60", "--submit").strip()
    state = two_host_slurm.wait_until_done(job, timeout_s=240)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log + two_host_slurm.logs()
    assert two_host_slurm.job_field(job, "NodeList") == "node[0-1]", log
    assert [m["loss"] for m in read_metrics(run_dir)] == reference, log  # bit for bit
