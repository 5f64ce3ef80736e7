"""Exact resume, resharding on a different layout, and damaged checkpoints -- through `moeyard train`."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.runs import final_parameters, read_metrics, run_moeyard_train, train_forked, write_config

LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")
DIVERGE = ("optim.lr=1e30", "optim.warmup_steps=0", "train.grad_clip=0")  # non-finite within a step or two


def losses(run_dir) -> dict[int, tuple]:
    return {m["step"]: tuple(m[k] for k in LOSS_KEYS) for m in read_metrics(run_dir)}


TIMING = {"tokens_per_s", "step_time_s", "peak_memory_gb"}
"""Measurements of this machine, not of the run."""


def records(run_dir) -> list[dict]:
    """Every number a run logged, but the machine's timings."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run_dir)]


def _damage(path, how: str) -> None:
    shard = sorted(path.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))


@pytest.mark.parametrize("nproc,ep,extra", [
    (4, 2, []),  # each expert replicated on 2 ranks
    (4, 2, ["schedule.grad_sync=reduce_scatter"]),  # ZeRO-sharded optimizer state
    (4, 2, ["parallel.fsdp=true"]),  # FSDP2: every parameter and its AdamW state sharded
    # Router state lives in buffers: the expert biases, and the dense-to-sparse schedule's position. The
    # first also saves in the background along the way (its stop at 6 is a plain save, as in every case).
    (2, 2, ["model.moe.router=sigmoid_bias", "model.moe.bias_update_rate=0.01", "checkpoint.every=3",
            "checkpoint.async_save=true"]),
    (2, 2, ["model.moe.router=dense_to_sparse", "model.moe.dts_steps=9"]),  # its schedule ends after the resume
])
def test_stop_and_resume_is_bit_exact(tmp_path, small_corpus, nproc, ep, extra) -> None:
    """Two runs of one config: straight to step 12, and stopped at 6 then resumed by the same command. Steps
    1-6 are the same run twice (the same config gives the same run), 7-12 a resumed one: every logged
    number but the machine's timings, and every final parameter, bit for bit."""
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 12})
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_forked(config, straight, nproc, f"parallel.ep={ep}", *extra)
    first = train_forked(config, split, nproc, f"parallel.ep={ep}", "train.stop_at=6", *extra)
    assert "stopped at train.stop_at=6" in first.stdout
    assert [m["step"] for m in read_metrics(split)] == list(range(1, 7))
    second = train_forked(config, split, nproc, f"parallel.ep={ep}", *extra)  # same command: auto-resume
    assert "at step 6" in second.stdout
    assert records(split) == records(straight) and len(records(straight)) == 12
    _, p_straight = final_parameters(straight)
    _, p_split = final_parameters(split)
    for name, p in p_straight.items():
        assert torch.equal(p, p_split[name]), name


FSDP = "parallel.fsdp=true"
PIPELINE = ("train.micro_batch_size=4", "model.moe.balance_loss=sequence")
"""Pipeline stages need several micro-batches a step; the balance loss per sequence is the same for any
micro-batching, so every layout's losses compare."""


@pytest.mark.parametrize("origin,resumed", [
    ((4, 4, ()), [(2, 2, ()), (1, 1, ()), (2, 2, (FSDP,))]),  # replicated -> fsdp too
    ((4, 2, (FSDP,)), [(2, 2, ()), (1, 1, ()), (2, 1, (FSDP,))]),  # fsdp -> replicated, and fsdp at ep=1
    # pipeline stages: pp 2 x ep 2 with fsdp, every block on the first stage (the last: the output layer and
    # loss) -> one process, and -> pp 3 (one block a stage)
    ((4, 2, (*PIPELINE, FSDP, "parallel.pp=2", "parallel.layers_per_stage=[3,0]")),
     [(1, 1, PIPELINE), (3, 1, (*PIPELINE, "parallel.pp=3"))]),
], ids=["replicated", "fsdp", "pipeline"])
def test_resume_on_other_layouts_continues_the_same_run(tmp_path, small_corpus, origin, resumed) -> None:
    """Saved at 4 ranks; resumed on other layouts (ranks, ep, fsdp on/off): the losses of the steps after
    the checkpoint match the 4-rank run's own continuation (model and optimizer state resharded)."""
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 10})
    origin_dir = tmp_path / "origin"
    nproc, ep, extra = origin
    first = train_forked(config, origin_dir, nproc, f"parallel.ep={ep}", "train.stop_at=6", *extra)
    if "parallel.pp=2" in extra:
        assert "pipeline: 2 stages, decoder blocks per stage [3, 0]" in first.stdout, first.stdout[-2000:]
    checkpoint = origin_dir / "checkpoints" / "step_000006"
    train_forked(config, origin_dir, nproc, f"parallel.ep={ep}", *extra)  # the 4-rank continuation, steps 7-10
    reference = losses(origin_dir)
    for nproc, ep, extra in resumed:
        run = tmp_path / f"resharded_{nproc}_{ep}_{len(extra)}"
        proc = train_forked(config, run, nproc, f"parallel.ep={ep}", f"checkpoint.resume={checkpoint}", *extra)
        assert "at step 6" in proc.stdout
        got = losses(run)
        assert sorted(got) == [7, 8, 9, 10]
        for step, values in got.items():
            assert values == pytest.approx(reference[step], rel=1e-5), f"{nproc} ranks ep={ep} {extra}, step {step}"
    if "parallel.pp=2" in origin[2]:  # a pipeline checkpoint reads whole (load_full_model, as load_model does)
        _, whole = final_parameters(origin_dir)  # into the same model the one-process continuation trained
        _, one = final_parameters(tmp_path / "resharded_1_1_2")
        for name, p in one.items():
            assert float((whole[name] - p).norm() / p.norm()) < 1e-5, name
        export = subprocess.run([sys.executable, "-m", "moeyard", "convert", "to-hf", str(origin_dir), "--out",
                                 str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
        assert export.returncode == 0 and (tmp_path / "hf" / "config.json").is_file(), export.stderr


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_damaged_newest_checkpoint_is_reported_and_skipped(tmp_path, small_corpus, how) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 6}, checkpoint={"every": 2})
    run = tmp_path / "run"
    train_forked(config, run, 2, "parallel.ep=2", "train.stop_at=4")
    _damage(run / "checkpoints" / "step_000004", how)
    proc = train_forked(config, run, 2, "parallel.ep=2")
    assert "skipping checkpoint" in proc.stdout and "step_000004" in proc.stdout
    assert "at step 2" in proc.stdout
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    # Asked for by path, a damaged checkpoint is an error, not a silent fallback.
    _damage(run / "checkpoints" / "step_000006", how)
    explicit = run_moeyard_train(config, tmp_path / "other", 1, "parallel.ep=1",
                                 f"checkpoint.resume={run / 'checkpoints' / 'step_000006'}")
    assert explicit.returncode != 0
    assert "step_000006" in explicit.stderr and ("truncated" in explicit.stderr or "sha256" in explicit.stderr)


def test_nonfinite_stop_saves_the_last_good_state_and_says_why(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 10})
    run = tmp_path / "run"
    proc = run_moeyard_train(config, run, 1, "parallel.ep=1", *DIVERGE, "train.nonfinite=stop")
    assert proc.returncode == 3, proc.stderr
    assert "non-finite loss or gradient at step" in proc.stderr and "saved the last good state" in proc.stderr
    metrics = read_metrics(run)
    bad = metrics[-1]
    assert bad["skipped_steps"] == 1
    from moeyard.trainer.checkpoint.store import CheckpointStore, verify

    newest = CheckpointStore(run / "checkpoints").newest_intact().path
    assert verify(newest)["step"] == bad["step"] - 1
    # A restart (torchrun would make one) refuses to repeat the stop, and says how to go on.
    again = run_moeyard_train(config, run, 1, "parallel.ep=1")
    assert again.returncode != 0 and "STOPPED_NONFINITE" in again.stderr


def test_nonfinite_skip_counts_and_gives_up_after_max_skipped_steps_with_zero(tmp_path, small_corpus) -> None:
    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 10})
    run = tmp_path / "run"
    proc = run_moeyard_train(config, run, 2, "parallel.ep=2", *DIVERGE, "train.max_skipped_steps=3",
                             "schedule.grad_sync=reduce_scatter")
    assert proc.returncode != 0 and "non-finite loss or gradient" in proc.stderr
    skipped = [m["skipped_steps"] for m in read_metrics(run)]
    assert skipped[-3:] == [1, 2, 3]


def test_checkpoint_inspect_and_export(tmp_path, small_corpus) -> None:
    from safetensors.torch import load_file

    from moeyard.models import Transformer
    from moeyard.trainer.config.sections import build_config

    config = write_config(tmp_path / "c.yaml", small_corpus, train={"steps": 2})
    run = tmp_path / "run"
    # sigmoid_bias: its expert biases are buffers that routing needs at inference, so the export has them.
    train_forked(config, run, 2, "parallel.ep=2", "model.moe.router=sigmoid_bias", "model.moe.bias_update_rate=0.01")
    ckpt = run / "checkpoints" / "step_000002"
    moeyard = [sys.executable, "-m", "moeyard", "checkpoint"]
    shown = subprocess.run(moeyard + ["inspect", str(ckpt)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "intact" in shown.stdout and "written by 2 ranks, ep=2" in shown.stdout
    assert "layers.1.ffn.experts.w_gate_EDF" in shown.stdout and "(8, 64, 64)" in shown.stdout
    out = tmp_path / "export"
    done = subprocess.run(moeyard + ["export", str(ckpt), "--to", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    tensors = load_file(str(out / "model.safetensors"))
    cfg_model = json.loads((out / "config.json").read_text())
    model = Transformer(build_config({"model": cfg_model}).model)
    model.load_state_dict(tensors)  # strict: parameters and router buffers, nothing missing or extra
    assert tensors["layers.1.ffn.router.expert_bias_E"].abs().max() > 0
    _, expected = final_parameters(run)
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name
    again = subprocess.run(moeyard + ["export", str(ckpt), "--to", str(out)], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and "is not empty" in again.stderr
