"""Pipeline stages (parallel.pp) over real gloo groups: every layout trains the one-process model -- the same
losses, grad norms and parameters after 6 optimizer steps, within 1e-5."""
from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np
import pytest
from helpers import pipeline_cases
from helpers.multiprocess import run_distributed

from moeyard.errors import ConfigError
from moeyard.parallel.stages import V_SHAPED
from moeyard.trainer.config.sections import validate_for_world

TOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict:
    """One-process runs, each computed once: (the settings that change what is computed, sft) -> its result."""
    return {}


LAYOUT = ("parallel.", "schedule.pipeline", "schedule.mode", "schedule.chunks", "schedule.defer_weight_gradients",
          "train.recompute")
"""Settings that place the work, not change what is computed: the reference leaves them out."""


def _reference(cache: dict, settings: tuple[str, ...], sft: bool) -> dict:
    """The one-process run with the same micro-batches (the same rows summed in the same groups) and loss."""
    key = (tuple(s for s in settings if not s.startswith(LAYOUT)), sft)
    if key not in cache:
        cache[key] = run_distributed(pipeline_cases.train_steps, 1, key[0], 6, sft)[0]
    return cache[key]


def _assert_same_run(results: list[dict], ref: dict, frozen: tuple[str, ...] = ()) -> None:
    """`frozen`: patterns of parameters train.frozen names, which must not move on any stage."""
    for r in results:
        for step, (got, want) in enumerate(zip(r["steps"], ref["steps"])):
            for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "mtp_loss"):
                assert got[key] == pytest.approx(want[key], rel=TOL, abs=1e-7), f"step {step} {key}"
            assert got["expert_load"] == want["expert_load"], f"step {step}: expert loads differ"
        assert r["heldout"] == pytest.approx(ref["heldout"], rel=TOL), "held-out loss"
        _assert_fsdp_collectives(r)
    held = {name for r in results for name in r["updates"]}
    assert held == ref["updates"].keys(), "the stages together do not hold the whole model"
    for r in results:  # every stage's copy (the embedding and its copy on the last stage, both)
        for name, got in r["updates"].items():
            want = ref["updates"][name]
            if any(fnmatchcase(name, pattern) for pattern in frozen):
                assert not np.any(got) and not np.any(want), f"stage {r['stage']} {name}: frozen, and it moved"
                continue
            assert np.linalg.norm(want) > 0, f"{name} did not train: the comparison would prove nothing"
            diff = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            assert diff <= TOL, f"stage {r['stage']} {name}: its update over 6 steps differs by {diff:.2e} (relative)"


def _assert_fsdp_collectives(r: dict) -> None:
    """FSDP2's gathers and reductions in each step after the first (whose shape inference runs one forward
    and backward more), per unit of more than one rank: fsdp gathered once gathers and reduces once per
    step in the stage; resident weights gather once and reduce every micro-batch; per micro-step fsdp
    gathers each block in forward and backward (the root once) and reduces every micro-batch. A rank
    holding several stages (looped schedules) counts all of them: a prefetch across stages would show."""
    units, micro = r["fsdp_units"], r["micro_batches"]
    # The root (embedding, output layer) is gathered in each micro-step's forward; where the rank holds
    # several stages, once a step (each stage's forward enters it: parallel/pipeline.py keeps it).
    per_micro_step = 2 * micro * (units - 1) + (1 if r["stages_per_rank"] > 1 else micro)
    expected = {"none": (0, 0), "per micro-step": (per_micro_step, micro * units),
                "gathered once": (units, units), "resident weights": (units, micro * units)}[r["fsdp"]]
    for step in r["steps"][1:]:
        assert (step["gathers"], step["reductions"]) == expected, \
            f"stage {r['stage']} ({r['fsdp']}): {units} units, {micro} micro-batches: (gathers, reductions)"


def _assert_lanes(results: list[dict], overlapped: bool) -> None:
    """overlapped_1f1b and dualpipev with replicated stages: on every rank both lanes ran all-to-alls, and each
    lane's all-to-alls overlapped the other lane's computing (its micro-batch, outside its own all-to-alls) for
    some time over the steps; the other schedules run one lane."""
    for r in results:
        backward = sum(step["a2a_s"]["backward"] for step in r["steps"])
        if not overlapped:
            assert backward == 0, f"stage {r['stage']}: a backward lane ran all-to-alls without overlapped_1f1b"
            continue
        hidden = {lane: sum(step["hidden_s"][lane] for step in r["steps"]) for lane in ("forward", "backward")}
        assert backward > 0 and all(s > 0 for s in hidden.values()), \
            f"stage {r['stage']}: backward-lane all-to-alls {backward:.4f} s, hidden behind the other lane {hidden}"


def _assert_weight_steps(results: list[dict], layout: tuple[str, ...]) -> None:
    """The split-backward schedules where the gradient sync holds its reduction (replicated stages; fsdp gathered
    once, reducing once): every micro-batch's weight-gradient GEMMs (each trained linear layer's and expert
    loop's) ran in the weight steps, on every rank, in every step; with fsdp reducing in every micro-step, with
    schedule.defer_weight_gradients=false, and in every other schedule, none did."""
    split = ("schedule.pipeline=interleaved_zero_bubble", "schedule.pipeline=zbv_zero_bubble",
             "schedule.pipeline=dualpipev")
    for r in results:
        counts = [step["weight_step_gemms"] for step in r["steps"]]
        held = "parallel.fsdp=true" not in layout or r["fsdp"] == "gathered once"
        if not (any(s in layout for s in split) and held) or "schedule.defer_weight_gradients=false" in layout:
            assert counts == [0] * len(counts), f"stage {r['stage']}: weight steps ran weight GEMMs {counts}"
            continue
        assert counts == [r["weight_gemms"] * r["micro_batches"]] * len(counts), \
            (r["stage"], r["weight_gemms"], r["micro_batches"], counts)


@pytest.mark.parametrize("world,layout,router,sft", [
    (2, ("parallel.pp=2", "schedule.pipeline=gpipe", "train.micro_batch_size=1"), "topk_softmax", True),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=1f1b", "train.micro_batch_size=2",
         "schedule.mode=manual", "schedule.chunks=2"), "topk_softmax", False),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=1f1b", "train.micro_batch_size=1",
         "parallel.fsdp=true", "train.recompute=full", "schedule.mode=auto"), "sigmoid_bias", False),
    (4, ("parallel.pp=4", "schedule.pipeline=1f1b", "train.micro_batch_size=2", "train.loss_chunk_tokens=10",
         "train.frozen=layers.3.*"), "topk_softmax", True),
    (4, ("parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1", "model.mtp_layers=1",
         "model.tie_embeddings=true", "parallel.layers_per_stage=[4, 0]"), "sigmoid_bias", True),
    (4, ("parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=2", "model.mtp_layers=1", "parallel.fsdp=true",
         "parallel.fsdp_gather_once=true"), "topk_softmax", False),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=gpipe", "train.micro_batch_size=1", "parallel.fsdp=true",
         "parallel.fsdp_gather_once=true", "parallel.fsdp_reduce_once=[true,false]"), "sigmoid_bias", False),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=overlapped_1f1b", "train.micro_batch_size=1",
         "train.recompute=full"), "sigmoid_bias", True),
    (2, ("parallel.pp=2", "schedule.pipeline=interleaved_1f1b", "train.micro_batch_size=2", "model.mtp_layers=1"),
     "topk_softmax", True),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=interleaved_1f1b", "train.micro_batch_size=1",
         "model.mtp_layers=1", "parallel.fsdp=true", "parallel.fsdp_gather_once=true", "train.loss_chunk_tokens=10"),
     "topk_softmax", True),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=looped_bfs", "train.micro_batch_size=1",
         "parallel.fsdp=true", "train.recompute=full"), "sigmoid_bias", False),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=interleaved_zero_bubble", "train.micro_batch_size=1",
         "model.mtp_layers=1", "parallel.fsdp=true", "parallel.fsdp_gather_once=true", "train.recompute=full",
         "schedule.defer_weight_gradients=false"), "sigmoid_bias", False),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=interleaved_zero_bubble", "train.micro_batch_size=1"),
     "sigmoid_bias", True),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=zbv_zero_bubble", "train.micro_batch_size=1",
         "model.mtp_layers=1", "model.tie_embeddings=true", "parallel.fsdp=true", "parallel.fsdp_gather_once=true",
         "parallel.fsdp_reduce_once=[true,false]", "train.recompute=full"), "sigmoid_bias", False),
    (4, ("parallel.pp=2", "parallel.ep=2", "schedule.pipeline=dualpipev", "train.micro_batch_size=1",
         "model.mtp_layers=1", "model.moe.first_dense_layers=0", "parallel.layers_per_stage=[2, 1, 1, 0]"),
     "sigmoid_bias", True),
    (2, ("parallel.pp=2", "schedule.pipeline=zbv_zero_bubble", "train.micro_batch_size=1", "train.fp8=rowwise",
         "parallel.fsdp=true", "parallel.fsdp_gather_once=true"), "topk_softmax", False),
], ids=["pp2-gpipe-sft", "pp2-ep2-1f1b-manual-chunks2", "pp2-ep2-fsdp-recompute-sigmoid_bias-auto",
        "pp4-1f1b-sft-loss_chunks-last-block-frozen", "pp2-ep2-mtp-tied-last-stage-of-no-block-sft", "pp2-ep2-mtp-fsdp-gathered-once",
        "pp2-ep2-gpipe-fsdp-once-on-rank0-resident-weights-on-rank1-sigmoid_bias",
        "pp2-ep2-overlapped-recompute-sigmoid_bias-sft",
        "pp2x2-interleaved-mtp-sft", "pp2x2-ep2-interleaved-mtp-fsdp-gathered-once-sft-loss_chunks",
        "pp2x2-ep2-looped_bfs-fsdp-recompute-sigmoid_bias",
        "pp2x2-ep2-zero_bubble-whole-backward-mtp-fsdp-gathered-once-recompute-sigmoid_bias",
        "pp2x2-ep2-zero_bubble-weight-steps-sft",
        "pp2v-ep2-zbv-mtp-tied-fsdp-once-on-rank0-resident-on-rank1-recompute-sigmoid_bias",
        "pp2v-ep2-dualpipev-lanes-weight-steps-mtp-last-stage-of-no-block-sigmoid_bias-sft",
        "pp2v-zbv-weight-steps-fsdp-once-fp8"])
def test_pipeline_stages_train_the_one_process_model(reference, world, layout, router, sft) -> None:
    """Packed SFT rows (segments and loss masks through the stages) in three of them; MTP (the last stage
    embeds the tokens with its copy of the embedding) with tied embeddings and with fsdp; a last stage of no
    decoder block (its MTP depth, output layer and loss), on a rank of its own and in a V; fsdp gathered in
    every micro-step, once per step and as resident weights (reducing once on the first pipeline rank and every
    micro-step on the second: parallel.fsdp_reduce_once per rank), each with its count of collectives; a manual
    plan (pipelined exchange inside the stages) and schedule.mode=auto (the planner's, from measurements
    made inside the stages); overlapped_1f1b, whose lanes' all-to-alls must each overlap the other lane's
    computing (parallel/lanes.py's trace); a block frozen by name (the pattern is the whole model's, matching on
    one stage only); FP8 linear and expert layers (train.fp8: each stage sees the one-process run's
    micro-batches, so its per-row scales are the same) under FSDP2 gathered once, whose weight GEMMs run in the
    weight steps; every layout ends with a held-out evaluation through its stages."""
    settings = (*layout, f"model.moe.router={router}")
    results = run_distributed(pipeline_cases.train_steps, world, settings, 6, sft, timeout_s=240)
    ref = _reference(reference, settings, sft)
    _assert_same_run(results, ref, tuple(s.split("=", 1)[1] for s in layout if s.startswith("train.frozen=")))
    _assert_lanes(results, overlapped="schedule.pipeline=overlapped_1f1b" in layout or (
        "schedule.pipeline=dualpipev" in layout and "parallel.fsdp=true" not in layout))
    _assert_weight_steps(results, layout)
    if "schedule.mode=auto" in layout:  # planned inside the stages from the profiler's measurements
        assert all(r["plan"].startswith("planner") for r in results), [r["plan"] for r in results]
    if "model.mtp_layers=1" in layout:  # the MTP loss is there to compare, and the embedding is on both ends:
        assert all(step["mtp_loss"] > 0 for step in ref["steps"])  # two ranks, or in a V one rank (no copy)
        v_shape = any(f"schedule.pipeline={s}" in layout for s in V_SHAPED)
        assert sum("tok_embeddings.weight" in r["updates"] for r in results) == (1 if v_shape else 2)


def test_layouts_pipelines_cannot_run_are_refused_before_launch() -> None:
    cfg = pipeline_cases._config(("parallel.pp=2", "parallel.ep=2"))
    with pytest.raises(ConfigError, match="not a multiple of parallel.pp x parallel.ep = 2 x 2"):
        validate_for_world(cfg, 6)
    with pytest.raises(ConfigError, match="1 micro-batches per step for parallel.pp=4 stages.*micro_batch_size to 1"):
        validate_for_world(pipeline_cases._config(("parallel.pp=4",)), 8)
    with pytest.raises(ConfigError, match="dualpipev runs at least as many micro-batches as its 2 x parallel.pp=2 "
                                          "stages, and each of the 2 ranks of each of the 2 pipeline stages gets 2"):
        validate_for_world(pipeline_cases._config(("parallel.pp=2", "schedule.pipeline=dualpipev",
                                                   "train.micro_batch_size=2")), 4)
    for schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
        with pytest.raises(ConfigError, match=f"{schedule} runs the micro-batches in rounds of parallel.pp=2: 5 "
                                              f"micro-batches do not split into 2 equal"):
            validate_for_world(pipeline_cases._config(("parallel.pp=2", f"schedule.pipeline={schedule}",
                                                       "train.global_batch_tokens=160", "train.micro_batch_size=2")), 2)
    for settings, message in [
        (("schedule.pipeline=dualpipev", "schedule.stages_per_rank=4"),
         "schedule.pipeline=dualpipev places exactly 2 stages on each rank, in a V"),
        (("parallel.pp=5",), "parallel.pp=5 x 1 stages per rank for model.n_layers=4 blocks"),
        (("schedule.pipeline=looped_bfs", "schedule.stages_per_rank=3"),
         "parallel.pp=2 x 3 stages per rank for model.n_layers=4"),
        (("schedule.pipeline=interleaved_1f1b", "schedule.stages_per_rank=1"), "stages_per_rank >= 2 stages"),
        (("schedule.pipeline=overlapped_1f1b", "parallel.fsdp=true"), "overlapped_1f1b with parallel.fsdp: a forward"),
        (("schedule.pipeline=overlapped_1f1b", "model.moe.router=switch", "model.moe.top_k=1",
          "model.moe.switch.jitter=0.01"),
         "overlapped_1f1b with model.moe.switch.jitter"),
        (("schedule.grad_sync=reduce_scatter",), r"reduce_scatter \(ZeRO\) with parallel.pp > 1: its gradient buckets"),
        (("parallel.layers_per_stage=[1, 2]",), r"layers_per_stage=\[1, 2\] must give each of the 2 stages .* 4 "
                                                 r"\(model.n_layers\) in all"),
        (("schedule.pipeline=interleaved_1f1b", "parallel.layers_per_stage=[2, 2]"), "each of the 4 stages"),
        (("parallel.layers_per_stage=[0, 4]",), "at least one block"),
        (("parallel.pp=3", "parallel.layers_per_stage=[2, 0, 2]"), r"at least one block \(the last: zero or more"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pipeline_cases._config(("parallel.pp=2", *settings))
    with pytest.raises(ConfigError, match="parallel.pp=1 has none: set it to null"):
        pipeline_cases._config(("parallel.layers_per_stage=[2, 2]",))
