"""`moeyard plan --hardware` for a described cluster."""
from __future__ import annotations

from helpers.runs import cli_in_process

from moeyard import configs


def test_plan_command_for_a_described_cluster(tmp_path) -> None:
    proc = cli_in_process(
        ["plan", str(configs.path("tiny.yaml")), "--world-size", "64",
         "--hardware", str(configs.path("hardware/dgx-h100.yaml")), "--set", "parallel.ep=64",
         "--set", "model.moe.num_experts=64", "--set", "train.global_batch_tokens=1048576",
         "--set", "model.dim=1024", "--set", "model.moe.ffn_dim=4096"], tmp_path, {})
    assert proc.returncode == 0, proc.stderr
    assert "hardware description dgx-h100" in proc.stdout and "communication hidden:" in proc.stdout
    assert "predicted speed-up" in proc.stdout
    # The layouts weighed under the device's memory, the one taken, and the throughput it predicts.
    table = proc.stdout.split("layouts weighed (70.2 GB usable per rank):")[1].splitlines()[2:]  # 0.9 x (80 - 2)
    weighed = table[:next(i for i, line in enumerate(table) if not line.startswith("  "))]
    assert len(weighed) == 5 * 4, proc.stdout  # every layout with every recompute mode
    assert sum(line.endswith("<- chosen") for line in weighed) == 1, proc.stdout
    assert {line[2:24].strip() for line in weighed} == {"replicated", "ZeRO", "fsdp per micro-step",
                                                        "fsdp gathered once", "fsdp resident weights"}
    tflops = next(line for line in proc.stdout.splitlines() if line.startswith("model TFLOP/s per GPU: "))
    assert 0 < float(tflops.split()[4]) < 989, tflops  # below the H100's bf16 peak
    assert "tokens/s per GPU: " in proc.stdout
    bounds = proc.stdout.split("the ep group spans 8 machines")[1].splitlines()[2:6]  # M = 1, 2, 4, none
    assert [line.split()[0] for line in bounds] == ["1", "2", "4", "none"], proc.stdout
    memory = [line for line in proc.stdout.splitlines() if line.startswith("memory per rank:")]
    assert len(memory) == 1 and memory[0].endswith("fits dgx-h100 (80 GB)"), proc.stdout


def test_plan_says_when_a_model_does_not_fit_and_what_would(tmp_path) -> None:
    """Mixtral-8x7B's shape without sharding beyond ep on 8 H100s: 16 bytes for each of its 7.2B parameters
    per rank (the dense 1.6B and an eighth of the experts) is 116 GB before any activation; the plan says it
    does not fit and that parallel.fsdp would shard the rest."""
    proc = cli_in_process(
        ["plan", str(configs.path("published/mixtral-8x7b.yaml")), "--world-size", "8", "--hardware", "dgx-h100",
         "--set", "parallel.ep=8", "--set", "parallel.fsdp=false"], tmp_path, {})
    assert proc.returncode == 0, proc.stderr
    assert "does NOT fit dgx-h100 (80 GB)" in proc.stdout and "parallel.fsdp=true" in proc.stdout, proc.stdout


SLOW_LINKS = """name: slow-links
devices_per_node: 8
gemm_tflops: 0.02
intra_node_gbps: 0.01
intra_node_latency_us: 1
inter_node_gbps: 0.01
inter_node_latency_us: 1
memory_gbps: 10
overlap_slowdown: 1.0
act_bytes: 4
chunk_overhead_us: 1
"""


def test_a_planned_run_times_its_plan_against_r1_and_keeps_the_faster(tmp_path, small_corpus) -> None:
    """A hardware description whose links are so slow that the planner pipelines every MoE layer: the run
    tries its plan and r=1 on this machine, says which it keeps, and records it in plan.json."""
    import json

    from helpers.runs import moeyard_train, write_config

    (tmp_path / "hw.yaml").write_text(SLOW_LINKS)
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 10})
    proc = moeyard_train(config, tmp_path / "run", 2, "parallel.ep=2", "schedule.mode=auto",
                         f"schedule.hardware={tmp_path / 'hw.yaml'}")
    (check,) = [line for line in proc.stdout.splitlines() if line.startswith("plan check:")]
    planned = [int(r) for r in check.split("chunks [")[1].split("]")[0].split(",")]
    assert max(planned) > 1, check
    chunks = json.loads((tmp_path / "run" / "plan.json").read_text())["chunks"]
    assert chunks == ([1] * len(planned) if "switched back to r=1" in check else planned), (check, chunks)
