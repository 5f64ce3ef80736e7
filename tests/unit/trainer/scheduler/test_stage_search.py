"""schedule.mode=auto over pipeline stages (moeyard plan --hardware): every layout weighed is one moeyard
runs as its printed overrides say, the memory bound holds, and stages are chosen where they are faster."""
from __future__ import annotations

import dataclasses

from moeyard import configs
from moeyard.trainer.config.sections import read_config, validate_for_world
from moeyard.trainer.scheduler.hardware import HardwareCosts
from moeyard.trainer.scheduler.run_planning import load_hardware
from moeyard.trainer.scheduler.stage_search import stage_choices

BASE = ["schedule.mode=auto", "train.global_batch_tokens=65536"]  # 256 sequences: 4 per rank of 16 at pp=4
WORLD, PER_NODE = 16, 8


def _choices(capacity_gb: float = 70.0, **hardware: float):
    cfg = read_config(configs.path("tiny.yaml"), BASE)
    hw = dataclasses.replace(load_hardware("dgx-h100"), **hardware)
    return cfg, stage_choices(cfg, WORLD, PER_NODE, HardwareCosts(hw), capacity_gb, hw.act_bytes)


def test_every_layout_weighed_is_the_run_its_overrides_make() -> None:
    cfg, choices = _choices()
    assert {c.pp for c in choices} == {1, 2, 4}  # tiny has 4 blocks: at most 4 stages
    assert {c.cfg.parallel.ep for c in choices} == {1, 2, 4, 8}
    assert any(c.cfg.schedule.pipeline == "interleaved_1f1b" for c in choices if c.pp == 2)
    assert any(c.cfg.schedule.pipeline == "interleaved_1f1b" and c.cfg.parallel.fsdp for c in choices)
    assert not any(c.cfg.schedule.pipeline == "overlapped_1f1b" and c.cfg.parallel.fsdp for c in choices)
    assert [c.step_s for c in choices] == sorted(c.step_s for c in choices)
    assert len({c.changes for c in choices}) == len(choices), "a run weighed twice"
    for c in choices:
        again = read_config(configs.path("tiny.yaml"), BASE + list(c.changes))
        for section in ("parallel", "schedule", "train"):
            assert getattr(again, section) == getattr(c.cfg, section), (section, c.changes)
        validate_for_world(again, WORLD)
        assert c.pp == 1 or (WORLD // c.pp) * c.cfg.train.micro_batch_size * c.pp <= cfg.global_batch_sequences


def test_the_v_schedules_are_weighed_with_and_without_deferred_weight_steps() -> None:
    """zbv_zero_bubble and dualpipev with replicated stages or fsdp gathered once, each both ways: deferring
    fills the bubble (a shorter step) and holds the weight GEMMs' operands where torch's order keeps them
    pending: more memory under fsdp gathered once, less replicated, where a backward that is not deferred
    makes its fresh weight gradients at the peak (measured so: benchmarks/RESULTS.md, issue 37 part 8); fsdp
    per micro-step only without (its weight steps would be empty, the same run)."""
    _, choices = _choices()
    v = [c for c in choices if c.cfg.schedule.pipeline in ("zbv_zero_bubble", "dualpipev")]
    by_run = {}
    for c in v:
        p = c.cfg.parallel
        layout = (c.cfg.schedule.pipeline, p.pp, p.ep, p.fsdp, p.fsdp_gather_once, tuple(p.layers_per_stage))
        by_run.setdefault(layout, {})[c.cfg.schedule.defer_weight_gradients] = c
    both = {layout: runs for layout, runs in by_run.items() if not layout[3] or layout[4]}
    assert both and all(set(runs) == {True, False} for runs in both.values()), by_run.keys()
    fsdp = 3  # the layout's parallel.fsdp
    assert all((runs[True].memory_gb > runs[False].memory_gb) == layout[fsdp] and runs[True].step_s < runs[False].step_s
               for layout, runs in both.items())
    assert all(set(runs) == {False} for layout, runs in by_run.items() if layout[3] and not layout[4])


def test_only_layouts_within_the_memory_are_weighed() -> None:
    _, roomy = _choices()
    limit = roomy[0].memory_gb * 0.999  # the fastest no longer fits
    _, tight = _choices(capacity_gb=limit)
    assert tight and all(c.memory_gb <= limit for c in tight)
    assert roomy[0].changes not in {c.changes for c in tight}
    assert _choices(capacity_gb=1e-6)[1] == []


def test_stages_are_chosen_where_the_network_makes_them_faster() -> None:
    """Slow links: replicated gradients cost more than the bubble, and each of pp stages reduces 1/pp of
    them; the planner then splits the model into stages, and predicts that faster than any pp=1 layout."""
    _, slow = _choices(inter_node_gbps=0.05, intra_node_gbps=0.2)
    assert slow[0].pp > 1 and "parallel.pp=" in " ".join(slow[0].changes)
    assert slow[0].step_s < min(c.step_s for c in slow if c.pp == 1)


def _slow_links(folder) -> str:
    """A described machine whose links make stages pay (test_stages_are_chosen_where_...)."""
    import yaml

    hw = {**yaml.safe_load(configs.path("hardware/dgx-h100.yaml").read_text()), "name": "slow-links",
          "inter_node_gbps": 0.05, "intra_node_gbps": 0.2}
    (folder / "slow.yaml").write_text(yaml.safe_dump(hw))
    return str(folder / "slow.yaml")


def test_plan_for_a_described_cluster_reports_the_stages_it_chose(tmp_path) -> None:
    """`moeyard plan --hardware` under auto: the stage layouts weighed, the overrides chosen, and the rest
    of the report (plan, memory) for that choice."""
    from moeyard.trainer.scheduler.report import hardware_report

    text = hardware_report(read_config(configs.path("tiny.yaml"), BASE), WORLD, _slow_links(tmp_path))
    chosen = next(line for line in text.splitlines() if line.startswith("chosen: "))
    pp = int(chosen.split("parallel.pp=")[1].split()[0])
    assert pp > 1 and "schedule.mode" not in chosen.split(" (")[0], text  # auto plans inside a run's stages
    assert text.splitlines()[0].startswith("pipeline stages weighed") and f"{pp} pipeline stages of" in text
    assert "memory per rank:" in text and "fits slow-links" in text


def test_a_training_run_under_auto_with_a_described_machine_takes_the_stages_chosen(tmp_path) -> None:
    """`moeyard train` with schedule.mode=auto and schedule.hardware: the launcher resolves the run to the
    stage layout whose full plan is fastest of the search's first few, the lanes left out (the config every worker
    reads), and says so;
    without a hardware
    description the configured stages stay (a training run measures nothing before its workers start)."""
    from moeyard.trainer.config.resolve import machines_of, resolve_run
    from moeyard.trainer.scheduler.memory_model import usable_gb

    hardware = _slow_links(tmp_path)
    overrides = BASE + [f"schedule.hardware={hardware}"]
    said: list[str] = []
    run = resolve_run(configs.path("tiny.yaml"), overrides, machines_of(WORLD, PER_NODE), say=said.append)
    cfg = read_config(configs.path("tiny.yaml"), overrides)
    hw = load_hardware(hardware)
    from moeyard.trainer.scheduler.stage_search import best_planned, chosen_for_training

    trainable = [c for c in stage_choices(cfg, WORLD, PER_NODE, HardwareCosts(hw), usable_gb(hw.memory_gb),
                                          hw.act_bytes)
                 if chosen_for_training(c.cfg)]  # no lanes: not taken for training before a GPU run
    best = best_planned(trainable, WORLD, PER_NODE, HardwareCosts(hw), usable_gb(hw.memory_gb), hw.act_bytes)
    assert run.parallel.pp == best.pp > 1
    for section in ("parallel", "schedule", "train"):
        assert getattr(run, section) == dataclasses.replace(getattr(best.cfg, section), **(
            {"ranks_per_node": PER_NODE} if section == "parallel" else {})), section
    assert any(line.startswith(f"schedule.mode=auto chose the stages for {WORLD} ranks of slow-links: ")
               and f"parallel.pp={best.pp}" in line for line in said), said
    kept = resolve_run(configs.path("tiny.yaml"), BASE, machines_of(WORLD, PER_NODE))
    assert kept.parallel.pp == 1


def test_within_stages_only_the_layouts_pipelines_run_are_weighed() -> None:
    """parallel.pp > 1: ZeRO is not weighed (its buckets cut the whole model: refused by config validation),
    nor fsdp under overlapped_1f1b; fsdp gathered once and resident weights are (looped schedules too). Every plan inside stages
    reduces replicated gradients after the schedule, one bucket per group, as training runs it (a plan with
    the whole model's buckets made a stage's run fail building them)."""
    from moeyard.trainer.scheduler.planner import manual_plan
    from moeyard.trainer.scheduler.run_planning import layout_choices, workload

    hw = load_hardware("dgx-h100")
    for pipeline, expected in [("1f1b", {"replicated", "fsdp per micro-step", "fsdp gathered once",
                                         "fsdp resident weights"}),
                               ("interleaved_1f1b", {"replicated", "fsdp per micro-step", "fsdp gathered once",
                                                     "fsdp resident weights"}),
                               ("overlapped_1f1b", {"replicated"})]:
        cfg = read_config(configs.path("tiny.yaml"), BASE + ["parallel.pp=2", "schedule.mode=manual",
                                                             "train.micro_batch_size=4",
                                                             f"schedule.pipeline={pipeline}"])
        w = workload(cfg, WORLD // 2, hw.act_bytes, PER_NODE)
        choices = layout_choices(cfg, w, HardwareCosts(hw), capacity_gb=70.0)
        assert {c.name for c in choices} == expected, pipeline
        for c in choices:
            assert len(c.plan.dense_buckets) <= 1 and len(c.plan.expert_buckets) <= 1, c.name
            assert c.plan.overlap_grads == (c.plan.grad_sync == "fsdp"), c.name
        staged = manual_plan(w, 2, 4.0, "all_reduce")
        assert (staged.chunks[0], len(staged.dense_buckets), staged.overlap_grads) == (2, 1, False)


def _balance_case(path: str, overrides: list[str], world: int):
    """A run of pp > 1 stages on dgx-h100s: (cfg, workload, reference plan, memory layout, costs, capacity)."""
    from moeyard.trainer.scheduler.memory_fit import memory_layout
    from moeyard.trainer.scheduler.memory_model import usable_gb
    from moeyard.trainer.scheduler.planner import reference_plan
    from moeyard.trainer.scheduler.run_planning import workload

    cfg = read_config(path, overrides)
    hw = load_hardware("dgx-h100")
    w = workload(cfg, world // cfg.parallel.pp, hw.act_bytes, PER_NODE)
    plan = dataclasses.replace(reference_plan(w, cfg.grad_sync), gather_once=cfg.parallel.fsdp_gather_once,
                               reduce_once=cfg.parallel.reduce_once)
    return cfg, w, plan, memory_layout(cfg, world, hw.act_bytes), HardwareCosts(hw), usable_gb(hw.memory_gb) * 1e9


def _with_split(cfg, split):
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, layers_per_stage=list(split)))


SMALL = ["model.n_layers=8", "model.mtp_layers=1", "model.dim=256", "model.moe.ffn_dim=512",
         "model.vocab_size=32000", "train.micro_batch_size=4"]
"""A model small enough to try every split of its 8 blocks (the first dense, an MTP depth)."""


def _every_split(cfg, w, plan, layout, costs, stages: int) -> tuple[list, dict, dict]:
    """Every split of cfg's 8 blocks over `stages` stages, with its predicted step and largest rank's peak."""
    import itertools

    from moeyard.trainer.scheduler.cost_model import predict
    from moeyard.trainer.scheduler.memory_model import predict_memory
    from moeyard.trainer.scheduler.run_planning import workload

    splits = [(*s, last) for s in itertools.product(range(1, 9), repeat=stages - 1) for last in range(9)
              if sum(s) + last == 8]  # the last stage may hold none (parallel.stages.stage_layers)
    runs = {s: _with_split(cfg, s) for s in splits}
    step = {s: predict(workload(r, w.dp, w.act_bytes, PER_NODE), plan, costs).step for s, r in runs.items()}
    peak = {s: predict_memory(r.model, dataclasses.replace(layout, layers_per_stage=s)).total for s, r in runs.items()}
    return splits, step, peak


def test_balanced_stages_fit_deepseek_v3_where_an_even_split_does_not() -> None:
    """DeepSeek-V3 on 256 H100 in 16 stages x ep 16, fsdp per micro-step, full recompute: split evenly, the
    last rank (the MTP depth, the output layer over 129k tokens, the loss) is over the memory per rank and
    the first (three dense blocks) far under it; the balanced split fits every rank with fewer blocks on the
    last, and is predicted no slower than the even split nor than [3, 4 x 14, 2] (which also fits, and which
    a balancer summing single blocks' times missed: its blocks' fixed costs counted once a block)."""
    from moeyard.trainer.scheduler.cost_model import predict
    from moeyard.trainer.scheduler.memory_model import predict_memory
    from moeyard.trainer.scheduler.run_planning import workload
    from moeyard.trainer.scheduler.stage_balance import balance_stages

    cfg, w, plan, layout, costs, capacity = _balance_case(
        configs.path("published/deepseek-v3-671b.yaml"),
        ["parallel.pp=16", "parallel.ep=16", "schedule.pipeline=1f1b"], 256)
    even = predict_memory(cfg.model, layout)
    assert even.total > capacity, even.total / 1e9
    split = balance_stages(cfg, w, plan, costs, layout, capacity).layers_per_stage
    assert split is not None and len(split) == 16 and sum(split) == cfg.model.n_layers and min(split[:-1]) >= 1
    assert split[-1] < 3, split  # even: [3, 4, ..., 4, 3, 3], the last rank over the memory
    balanced = _with_split(cfg, split)
    assert predict_memory(balanced.model, dataclasses.replace(layout, layers_per_stage=split)).total <= capacity
    step = predict(workload(balanced, w.dp, w.act_bytes, PER_NODE), plan, costs).step
    assert step <= predict(w, plan, costs).step, split
    other = _with_split(cfg, [3] + [4] * 14 + [2])
    assert predict_memory(other.model, dataclasses.replace(layout, layers_per_stage=(3,) + (4,) * 14 + (2,))).total \
        <= capacity
    assert step <= predict(workload(other, w.dp, w.act_bytes, PER_NODE), plan, costs).step, split


def test_the_balanced_split_is_as_fast_as_the_best_of_every_split() -> None:
    """On a model small enough to try every split (8 blocks, the first dense, an MTP depth, 3 stages), the
    balanced split's predicted step is within 2% of the fastest split's that fits; under a memory per rank
    too small for the even split, it is one that fits."""
    from moeyard.parallel.stages import stage_layers
    from moeyard.trainer.scheduler.stage_balance import balance_stages

    cfg, w, plan, layout, costs, _ = _balance_case(configs.path("tiny.yaml"), BASE + ["parallel.pp=3", *SMALL], 48)
    splits, step, peak = _every_split(cfg, w, plan, layout, costs, 3)
    even = tuple(len(r) for r in stage_layers(8, 3))
    for capacity in (max(peak.values()), peak[even] * 0.999):
        fitting = [s for s in splits if peak[s] <= capacity]
        split = balance_stages(cfg, w, plan, costs, layout, capacity).layers_per_stage
        assert split in fitting, (split, capacity)
        assert step[split] <= 1.02 * min(step[s] for s in fitting), (split, step[split], min(step.values()))
    assert balance_stages(cfg, w, plan, costs, layout, min(peak.values()) * 0.999) is None


def test_each_rank_reduces_once_where_its_memory_allows() -> None:
    """fsdp resident weights (gathered once, reduced every micro-step): the balancer lets each rank reduce once
    instead where that fits its memory. On the model small enough to try every split and every rank's choice,
    under each memory per rank a choice fits: the balancer's fits, is within 2% of the fastest that fits, and
    under some capacity is mixed and faster than the fastest with every rank reducing every micro-step."""
    import itertools

    from moeyard.trainer.scheduler.cost_model import predict
    from moeyard.trainer.scheduler.memory_model import predict_memory
    from moeyard.trainer.scheduler.run_planning import workload
    from moeyard.trainer.scheduler.stage_balance import balance_stages

    cfg, w, plan, layout, costs, _ = _balance_case(
        configs.path("tiny.yaml"), BASE + ["parallel.pp=3", *SMALL, "parallel.fsdp=true",
                                           "parallel.fsdp_gather_once=true", "parallel.fsdp_reduce_once=false"], 48)
    step, peak = {}, {}
    splits = ((*s, last) for s in itertools.product(range(1, 7), repeat=2) for last in range(7) if sum(s) + last == 8)
    for split in splits:
        run = _with_split(cfg, split)
        shaped = workload(run, w.dp, w.act_bytes, PER_NODE)
        for once in itertools.product((True, False), repeat=3):
            step[split, once] = predict(shaped, dataclasses.replace(plan, reduce_once=once), costs).step
            peak[split, once] = predict_memory(run.model, dataclasses.replace(layout, layers_per_stage=split,
                                                                              reduce_once=once)).total
    mixed_and_faster = 0
    for capacity in sorted(set(peak.values())):
        fitting = [k for k in step if peak[k] <= capacity]
        got = balance_stages(cfg, w, plan, costs, layout, capacity)
        chosen = (got.layers_per_stage, got.reduce_once)
        assert chosen in fitting, (chosen, capacity)
        assert step[chosen] <= 1.02 * min(step[k] for k in fitting), (chosen, capacity)
        every = [step[k] for k in fitting if k[1] == (False,) * 3]
        mixed_and_faster += len(set(got.reduce_once)) == 2 and step[chosen] < min(every)
    assert mixed_and_faster, "no memory per rank made some ranks reduce once and others not"


def test_deepseek_v3s_first_rank_reduces_once() -> None:
    """DeepSeek-V3 on 256 H100, 16 stages x ep 16, fsdp resident weights: the first rank's embedding and three
    dense blocks (2.9 billion dense parameters, reduced over 16 ranks) cost more reduced every micro-step than
    any rank's experts; with room for their unsharded gradients it reduces once, and so do the last ranks, which
    hold fewer micro-batches' activations. Every rank fits, and the pipeline is predicted faster than with
    every rank reducing every micro-step, each on its own balanced split."""
    from moeyard.trainer.scheduler.cost_model import predict
    from moeyard.trainer.scheduler.memory_model import predict_memory
    from moeyard.trainer.scheduler.run_planning import workload
    from moeyard.trainer.scheduler.stage_balance import balance_stages

    cfg, w, plan, layout, costs, capacity = _balance_case(
        configs.path("published/deepseek-v3-671b.yaml"),
        ["parallel.pp=16", "parallel.ep=16", "schedule.pipeline=1f1b", "parallel.fsdp_gather_once=true",
         "parallel.fsdp_reduce_once=false"], 256)
    mixed = balance_stages(cfg, w, plan, costs, layout, capacity)
    assert mixed.reduce_once[0] and mixed.reduce_once[-1] and not all(mixed.reduce_once), mixed.reduce_once
    run = _with_split(cfg, mixed.layers_per_stage)
    assert predict_memory(run.model, dataclasses.replace(layout, layers_per_stage=mixed.layers_per_stage,
                                                         reduce_once=mixed.reduce_once)).total <= capacity
    every = balance_stages(cfg, w, plan, costs, dataclasses.replace(layout, reduce_bytes=2), capacity)
    assert every.reduce_once is False  # bfloat16 reduction: reducing once is not weighed
    once = dataclasses.replace(plan, reduce_once=mixed.reduce_once)
    mixed_s = predict(workload(run, w.dp, w.act_bytes, PER_NODE), once, costs).step
    every_s = predict(workload(_with_split(cfg, every.layers_per_stage), w.dp, w.act_bytes, PER_NODE), plan,
                      costs).step
    assert mixed_s < every_s, (mixed_s, every_s)  # 27.3 s against 28.9 s at one chunk per MoE layer


def test_stages_in_a_v_are_balanced_and_weighed() -> None:
    """zbv_zero_bubble on a model small enough to try every split (8 blocks, the first dense, an MTP depth, pp 2:
    4 stages, rank 0 holding both ends): the V balancer's local search is within 2% of the fastest split that
    fits, under a memory per rank where the even split does not fit too; the stage search weighs both V
    schedules, and a training run does not take dualpipev's lanes (never run on a GPU)."""
    from moeyard.parallel.stages import stage_layers
    from moeyard.trainer.scheduler.stage_balance import balance_stages
    from moeyard.trainer.scheduler.stage_search import chosen_for_training

    cfg, w, plan, layout, costs, _ = _balance_case(
        configs.path("tiny.yaml"), BASE + ["parallel.pp=2", *SMALL, "schedule.pipeline=zbv_zero_bubble"], 32)
    splits, step, peak = _every_split(cfg, w, plan, layout, costs, 4)
    even = tuple(len(r) for r in stage_layers(8, 4))
    for capacity in (max(peak.values()), peak[even] * 0.999):
        fitting = [s for s in splits if peak[s] <= capacity]
        split = balance_stages(cfg, w, plan, costs, layout, capacity)
        assert split is not None and split.layers_per_stage in fitting, (split, capacity)
        chosen = step[split.layers_per_stage]
        assert chosen <= 1.02 * min(step[s] for s in fitting), (split, chosen, min(step[s] for s in fitting))
    _, choices = _choices()
    weighed = {c.cfg.schedule.pipeline for c in choices}
    assert {"zbv_zero_bubble", "dualpipev"} <= weighed, weighed
    assert not any(chosen_for_training(c.cfg) for c in choices
                   if c.cfg.schedule.pipeline == "dualpipev" and not c.cfg.parallel.fsdp)


def test_a_looped_ranks_blocks_are_its_stages_blocks() -> None:
    """rank_split turns each rank's block count into its stages' (r, r + pp, ...), every stage at least one
    block, the spare ones in different loops for neighbouring ranks; rank_layers counts them back."""
    from moeyard.parallel.stages import rank_layers, rank_split, stage_ids, stage_layers

    totals = [7, 5, 6, 6]
    for per_rank in (1, 2, 4):
        sizes = rank_split(totals, per_rank)
        assert len(sizes) == 4 * per_rank and min(sizes) >= 1 and sum(sizes) == 24
        spans = stage_layers(24, 4 * per_rank, sizes)
        for r, n in enumerate(totals):
            assert sum(len(spans[s]) for s in stage_ids(r, 4, per_rank)) == n
        assert [len(r) for r in rank_layers(24, 4, per_rank, sizes)] == totals
    looped = rank_split([6, 6, 6, 6], 4)  # 6 over 4 loops: two spares each, never all in the same loops
    assert len({tuple(looped[s] for s in stage_ids(r, 4, 4)) for r in range(4)}) > 1, looped
    assert [len(r) for r in rank_layers(61, 16)] == [len(r) for r in stage_layers(61, 16)]


def test_the_last_stage_keeps_a_block_where_alone_it_would_train_nothing() -> None:
    """On the small model, under the memory per rank where the balancer leaves the last stage no block (its MTP
    depth, output layer and loss), the same run training only the decoder blocks' attention (the last stage's own
    parameters frozen) keeps a block there: a rank with nothing to train is refused at launch."""
    from moeyard.trainer.scheduler.stage_balance import balance_stages

    cfg, w, plan, layout, costs, _ = _balance_case(configs.path("tiny.yaml"), BASE + ["parallel.pp=3", *SMALL], 48)
    _, _, peak = _every_split(cfg, w, plan, layout, costs, 3)
    emptied = [c for c in sorted(set(peak.values()))
               if balance_stages(cfg, w, plan, costs, layout, c).layers_per_stage[-1] == 0]
    assert emptied, "no memory per rank made the balancer empty the last stage: the case proves nothing"
    cfg, w, plan, layout, costs, _ = _balance_case(configs.path("tiny.yaml"), BASE + [
        "parallel.pp=3", *SMALL, "train.trainable=layers.*.attn.*"], 48)
    for capacity in emptied:
        split = balance_stages(cfg, w, plan, costs, layout, capacity)
        assert split is None or split.layers_per_stage[-1] >= 1, (capacity, split)
