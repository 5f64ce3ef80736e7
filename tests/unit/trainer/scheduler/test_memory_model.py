"""The memory model on cases whose numbers can be worked out by hand."""
from __future__ import annotations

import dataclasses

import pytest

from moeyard.models import ModelConfig, MoEConfig, Transformer
from moeyard.trainer.scheduler.memory_model import GB, Layout, count_parameters, predict_memory, smallest_world

CFG = ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256,
                  moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=128, first_dense_layers=1, num_shared_experts=1))


def test_parameter_counts_split_the_model_into_dense_and_experts() -> None:
    model = Transformer(CFG)
    counts = count_parameters(CFG, ep=2)
    assert counts.dense + counts.experts == sum(p.numel() for p in model.parameters())
    # Three MoE layers, each 8 experts of gate, up (dim x ffn) and down (ffn x dim).
    assert counts.experts == 3 * 8 * 3 * 128 * 128
    assert counts.root == 2 * 512 * 128 + 128  # embedding, output layer, final norm
    frozen = frozenset(n for n, _ in model.named_parameters() if "experts" in n)
    assert count_parameters(CFG, 2, frozen).experts_trainable == 0


def test_fsdp_state_is_sixteen_bytes_per_parameter_spread_over_the_world() -> None:
    counts = count_parameters(CFG, ep=2)
    for world in (2, 4, 8):
        m = predict_memory(CFG, Layout(world=world, ep=2, tokens=256, grad_sync="fsdp"))
        state = m.parameters + m.gradients + m.optimizer
        assert state == pytest.approx(16 * (counts.dense + counts.experts) / world)


def test_replicated_state_holds_every_dense_parameter_and_this_ranks_experts() -> None:
    counts = count_parameters(CFG, ep=4)
    for world in (4, 8):
        m = predict_memory(CFG, Layout(world=world, ep=4, tokens=256))
        assert m.parameters + m.gradients + m.optimizer == pytest.approx(16 * (counts.dense + counts.experts / 4))
    zero = predict_memory(CFG, Layout(world=8, ep=4, tokens=256, grad_sync="reduce_scatter"))
    plain = predict_memory(CFG, Layout(world=8, ep=4, tokens=256))
    assert zero.optimizer < plain.optimizer and zero.parameters == plain.parameters


def test_recompute_keeps_less_for_backward() -> None:
    layout = Layout(world=2, ep=2, tokens=4096)
    kept = {mode: predict_memory(CFG, dataclasses.replace(layout, recompute=mode)).activations
            for mode in ("none", "selective", "experts", "full")}
    assert kept["full"] < kept["experts"] < kept["none"]
    assert kept["full"] < kept["selective"] < kept["none"]
    double = predict_memory(CFG, dataclasses.replace(layout, tokens=8192)).activations
    assert double == pytest.approx(2 * kept["none"])  # activations grow with the tokens of a micro-batch


def test_loss_chunks_bound_the_logits() -> None:
    whole = predict_memory(CFG, Layout(world=2, ep=2, tokens=8192, loss_chunk_tokens=0))
    chunked = predict_memory(CFG, Layout(world=2, ep=2, tokens=8192, loss_chunk_tokens=1024))
    assert whole.with_activations - chunked.with_activations == pytest.approx(3 * 4 * (8192 - 1024) * 512)


def test_smallest_world_is_the_first_multiple_of_ep_that_fits() -> None:
    layout = Layout(world=2, ep=2, tokens=512, grad_sync="fsdp", recompute="full")
    capacity = predict_memory(CFG, dataclasses.replace(layout, world=6)).total / GB / 0.9 * 1.0001
    world = smallest_world(CFG, layout, capacity)
    assert world == 6
    assert not predict_memory(CFG, dataclasses.replace(layout, world=4)).fits(capacity)
    assert smallest_world(CFG, dataclasses.replace(layout, grad_sync="all_reduce"), capacity / 100) is None


def test_the_peak_is_the_start_of_backward_or_its_end() -> None:
    """Activations are freed as backward makes gradients: the peak holds one or the other (both when
    gradients accumulate over micro-steps, or live in bucket buffers; accumulating, a block's backward also
    holds its fresh weight gradients)."""
    big_batch = predict_memory(CFG, Layout(world=2, ep=2, tokens=8192))
    assert big_batch.total == pytest.approx(big_batch.parameters + big_batch.optimizer + big_batch.activations
                                            + big_batch.with_activations)
    tiny_batch = predict_memory(CFG, Layout(world=2, ep=2, tokens=8, loss_chunk_tokens=8))
    assert tiny_batch.total == pytest.approx(tiny_batch.parameters + tiny_batch.optimizer + tiny_batch.gradients
                                             + tiny_batch.after_backward)
    accumulating = predict_memory(CFG, Layout(world=2, ep=2, tokens=8192, micro_steps=2))
    fresh = 4 * count_parameters(CFG, 2).largest_block
    assert accumulating.total == pytest.approx(big_batch.total + big_batch.gradients + fresh)


def test_the_plan_line_says_whether_it_fits() -> None:
    m = predict_memory(CFG, Layout(world=2, ep=2, tokens=512))
    line = m.line(80.0, "dgx-h100")
    assert line.startswith(f"memory per rank: {m.total / GB:.2f} GB predicted peak (parameters ")
    assert line.endswith("; fits dgx-h100 (80 GB)")
    assert "does NOT fit" in m.line(m.total / GB / 2, "tiny")


def test_fsdp_counts_the_largest_rank_with_padding() -> None:
    """Experts that split evenly on no dimension are padded to torch.chunk's first piece on every rank."""
    from moeyard.parallel.shards import expert_shard_dim, padded_shard_numel

    assert expert_shard_dim((1, 64, 32), 4) == 1 and expert_shard_dim((8, 64, 32), 4) == 0
    assert expert_shard_dim((3, 5, 7), 4) == 0 and padded_shard_numel((3, 5, 7), 0, 4) == 35  # chunks 1,1,1,0
    assert padded_shard_numel((5, 6), 0, 4) == 12  # torch.chunk(5 rows, 4) -> 2, 2, 1: every rank holds 2
    counts = count_parameters(CFG, ep=2)
    even, _ = counts.fsdp_shard(world=4, ep=2)
    assert even == pytest.approx(counts.dense / 4 + counts.experts / 2 / 2, rel=0.01)  # dense over 4, ep shard over 2
    odd = dataclasses.replace(counts, shapes=counts.shapes + (((3, 5, 7), True, True),))
    assert odd.fsdp_shard(world=4, ep=2)[0] - even == 2 * 5 * 7  # 3 experts over edp 2: 2 and 1, padded to 2


def test_gather_once_holds_the_unsharded_weights_and_gradients_through_the_step() -> None:
    counts = count_parameters(CFG, ep=2)
    per_micro = predict_memory(CFG, Layout(world=4, ep=2, tokens=256, grad_sync="fsdp", micro_steps=4), counts)
    once = predict_memory(CFG, Layout(world=4, ep=2, tokens=256, grad_sync="fsdp", micro_steps=4, gather_once=True,
                                      reduce_bytes=2), counts)
    unsharded = counts.dense + counts.experts / 2
    assert once.parameters - per_micro.parameters == pytest.approx(4 * unsharded)
    # The unsharded gradients (reduce_dtype bfloat16) until the last backward reduces them into the float32
    # shards, which replace them unit by unit: the larger of the two
    assert once.gradients == pytest.approx(max(2 * unsharded, per_micro.gradients))
    assert once.gradients > per_micro.gradients
    assert once.total > per_micro.total


def test_resident_weights_hold_the_unsharded_weights_but_sharded_gradients() -> None:
    """fsdp_reduce_once=false: the weights stay gathered as with gathering once, the gradients are reduced every
    micro-step into their shards as per micro-step."""
    counts = count_parameters(CFG, ep=2)
    layout = Layout(world=4, ep=2, tokens=256, grad_sync="fsdp", micro_steps=4)
    per_micro = predict_memory(CFG, layout, counts)
    once = predict_memory(CFG, dataclasses.replace(layout, gather_once=True), counts)
    resident = predict_memory(CFG, dataclasses.replace(layout, gather_once=True, reduce_once=False), counts)
    assert resident.parameters == once.parameters
    assert resident.gradients == per_micro.gradients
    assert per_micro.total < resident.total < once.total


def test_bfloat16_moments_halve_the_optimizer_state() -> None:
    for grad_sync in ("all_reduce", "fsdp"):
        layout = Layout(world=4, ep=2, tokens=256, grad_sync=grad_sync)
        full = predict_memory(CFG, layout)
        assert predict_memory(CFG, dataclasses.replace(layout, moment_bytes=2)).optimizer == full.optimizer / 2
    zero = Layout(world=4, ep=2, tokens=256, grad_sync="reduce_scatter")
    # ZeRO keeps a float32 master shard besides the moments: 4 + 2 x 2 bytes instead of 4 + 2 x 4
    assert predict_memory(CFG, dataclasses.replace(zero, moment_bytes=2)).optimizer == pytest.approx(
        predict_memory(CFG, zero).optimizer * 8 / 12)


def test_pipeline_stages_hold_their_blocks_and_the_micro_batches_in_flight() -> None:
    """pp 2: each stage holds half the blocks (the first also the embedding, the last the output layer), so
    the stages' parameters add up to the model's; 1f1b keeps pp micro-batches' activations on the first
    stage, gpipe all of them."""
    from moeyard.trainer.scheduler.memory_model import in_flight

    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    whole = count_parameters(cfg, ep=2)
    stages = [count_parameters(cfg, 2, frozenset(), s, 2) for s in range(2)]
    assert sum(c.dense + c.experts for c in stages) == whole.dense + whole.experts
    assert stages[0].root == 512 * 128 and stages[1].root == 512 * 128 + 128  # embedding; output layer, norm
    assert [in_flight("1f1b", 4, s, 8) for s in range(4)] == [4, 3, 2, 1]
    assert [in_flight("overlapped_1f1b", 4, s, 8) for s in range(4)] == [5, 4, 3, 2]  # one beside each backward
    assert [in_flight("gpipe", 4, s, 8) for s in range(4)] == [8] * 4
    assert in_flight("1f1b", 4, 0, 2) == 2  # never more than the step's micro-batches
    # interleaved_1f1b, V=4 at pp=16 (Megatron-Core's Qwen3-235B layout): torch's warm-up of (V-1) pp +
    # 2 (pp-1-stage) forwards of a quarter-rank stage, and one more: 19.75 micro-batches on the first rank
    assert in_flight("interleaved_1f1b", 16, 0, 128, 4) == 19.75 > in_flight("1f1b", 16, 0, 128)
    assert in_flight("interleaved_1f1b", 16, 15, 128, 4) == 12.25
    assert in_flight("interleaved_1f1b", 4, 0, 2, 2) == 2  # capped by the step's forwards
    # Fewer than 2 pp micro-batches run as one round of all of them: 3 at pp 2 warm up (V-1) x 3 + 2 forwards
    assert in_flight("interleaved_1f1b", 2, 0, 3, 2) == 3
    assert in_flight("interleaved_1f1b", 4, 0, 6, 2) == 6  # all 12 forwards before the first backward
    # interleaved_zero_bubble (ZB1P): one hop a stage from the last, not two; the same rounds
    assert [in_flight("interleaved_zero_bubble", 2, s, 4, 2) for s in range(2)] == [2.0, 1.5]
    assert in_flight("interleaved_zero_bubble", 2, 0, 4, 3) == 2.0
    assert in_flight("interleaved_zero_bubble", 2, 0, 3, 2) == 2.5
    assert in_flight("interleaved_zero_bubble", 4, 0, 6, 2) == 5
    assert in_flight("looped_bfs", 4, 3, 8, 2) == 8  # every forward of every stage before a backward
    layout = Layout(world=4, ep=2, tokens=256, micro_steps=4)
    one, two = predict_memory(cfg, layout), predict_memory(cfg, dataclasses.replace(layout, pp=2))
    # In a V the first rank holds both ends (the embedding once) and the MTP depths, the last none of them
    mtp = dataclasses.replace(cfg, mtp_layers=1)
    v = [count_parameters(mtp, 2, frozenset(), s, 2, 2, v_shape=True) for s in range(2)]
    looped = [count_parameters(mtp, 2, frozenset(), s, 2, 2) for s in range(2)]
    assert v[0].root == 512 * 128 + 512 * 128 + 128 and v[1].root == 0
    assert sum(c.dense + c.experts for c in v) == sum(c.dense + c.experts for c in looped) - 512 * 128  # no copy
    assert two.parameters < 0.7 * one.parameters  # the largest stage: two of four blocks and a 64k root
    gpipe = predict_memory(cfg, dataclasses.replace(layout, pp=2, pipeline="gpipe"))
    assert gpipe.activations > two.activations
    assert smallest_world(cfg, dataclasses.replace(layout, pp=2), 1.0) % 4 == 0  # a multiple of pp x ep


def test_a_v_ranks_two_stages_each_hold_their_own_micro_batches() -> None:
    """dualpipev at pp 2, full recompute: the first rank holds 4 micro-batches of stage 0 and 1 of the last stage
    (v_in_flight), so moving a block from the last stage to stage 0 (blocks [1, 1, 1, 1] -> [2, 1, 1, 0]) keeps
    3 more blocks' inputs (4 x 2 + 1 x 0 against 4 x 1 + 1 x 1), where half the rank's blocks a stage
    would keep as many; and the final norm is kept for the last stage's one micro-batch."""
    from moeyard.trainer.scheduler.memory_model import predict_stage, stage_counts

    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    layout = Layout(world=4, ep=2, tokens=256, pp=2, pipeline="dualpipev", stages_per_rank=2, micro_steps=4,
                    recompute="full", defer_weight_gradients=False)  # the activations alone

    def first_rank(sizes: tuple[int, ...]) -> float:
        split = dataclasses.replace(layout, layers_per_stage=sizes)
        return predict_stage(cfg, split, stage_counts(cfg, split)[0], 0).activations

    block_input = 256 * 4 * cfg.dim
    assert first_rank((2, 1, 1, 0)) - first_rank((1, 1, 1, 1)) == pytest.approx(3 * block_input)
    # Deferred weight steps, at the states torch's order goes through (v_states: stage 0's and stage 3's
    # micro-batches held, their pending weight steps, a weight step running; a full backward runs its weight
    # step at once): stage 0's runs with 3 of its micro-batches and stage 3's one held, its stash and fresh
    # gradients (the output layer's, larger than a block's, on this rank of the last stage); the not-deferred
    # run holds 4 of stage 0 and 1 of stage 3 and adds the fresh gradients to the accumulated ones at its peak
    from moeyard.trainer.scheduler.memory_model import _weight_step_bytes, v_states

    assert v_states("dualpipev", 2, 0, 4) == ((3, 1, 1, 0, 1), (4, 0, 0, 1, 1), (4, 1, 0, 0, 0))
    deferred = dataclasses.replace(layout, defer_weight_gradients=True, layers_per_stage=(2, 1, 1, 0))
    counts = stage_counts(cfg, deferred)[0]
    held = predict_stage(cfg, deferred, counts, 0).activations - first_rank((2, 1, 1, 0))
    stash = sum(_weight_step_bytes(cfg, i, 256, 4) for i in (0, 1))
    k, norm = 2 * block_input, 2 * block_input  # stage 3 holds no block, only the final norm
    fresh = 4 * max(counts.largest_block, cfg.vocab_size * cfg.dim)
    assert held == pytest.approx(max(3 * k + norm + stash + fresh, 4 * k + fresh, 4 * k + norm)
                                 - (4 * k + norm + fresh))
    assert stash > k  # the weight step's state is the peak: the test sees the stash
    with pytest.raises(ValueError):  # every stage but the last holds a block
        first_rank((3, 0, 1, 0))


def _torch_v_order(schedule: str, pp: int, n: int) -> dict:
    """torch's compute order of a V-placed schedule for every rank, built without process groups."""
    import types

    from torch.distributed.pipelining.schedules import ScheduleDualPipeV, ScheduleZBVZeroBubble

    cls = {"zbv_zero_bubble": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}[schedule]
    fake = types.SimpleNamespace(pp_group_size=pp, _n_microbatches=n, n_local_stages=2, num_stages=2 * pp,
                                 _num_stages=2 * pp)
    return {r: cls._calculate_single_rank_operations(fake, r) for r in range(pp)}


@pytest.mark.parametrize("schedule", ["zbv_zero_bubble", "dualpipev"])
def test_v_schedules_hold_what_torchs_order_holds(schedule) -> None:
    """in_flight of the V-placed schedules against torch's own order: each rank's peak of forwards run and not
    yet backwarded (an input step frees them; a stage is half the rank's blocks), and v_in_flight's counts of each
    of its two stages, for pp 2-16 and every micro-batch count the schedule takes (dualpipev at least 2 pp, zbv at
    least pp as the run config asks)."""
    from torch.distributed.pipelining.schedules import BACKWARD_INPUT, FORWARD, FULL_BACKWARD, OVERLAP_F_B

    from moeyard.trainer.scheduler.memory_model import in_flight, v_in_flight

    for pp in (2, 4, 8, 16):
        for n in (pp, pp + 1, 2 * pp - 1, 2 * pp, 4 * pp, 64) if schedule == "zbv_zero_bubble" else \
                (2 * pp, 2 * pp + 1, 64):
            for rank, actions in _torch_v_order(schedule, pp, n).items():
                live = {rank: 0, 2 * pp - 1 - rank: 0}
                seen = set()
                for a in (sub for a in actions if a is not None
                          for sub in (a.sub_actions if a.computation_type == OVERLAP_F_B else (a,))):
                    change = {FORWARD: 1, FULL_BACKWARD: -1, BACKWARD_INPUT: -1}.get(a.computation_type, 0)
                    live[a.stage_index] += change
                    seen.add((live[rank], live[2 * pp - 1 - rank]))
                assert in_flight(schedule, pp, rank, n, 2) == max(map(sum, seen)) / 2, (pp, n, rank)
                # each stage's own count: every pair torch's order goes through is within one of v_in_flight's
                # pairs, each of which it reaches (stages of unequal blocks weigh them apart)
                pairs = v_in_flight(schedule, pp, rank, n)
                assert all(any(a <= p and b <= q for p, q in pairs) for a, b in seen), (pp, n, rank, pairs)
                assert set(pairs) <= seen, (pp, n, rank, pairs)


def test_pending_weight_steps_are_torchs() -> None:
    """pending_weight_steps against torch's own orders: each rank's peak of input steps whose weight step has
    not run (ZB1P with 2 and 4 stages a rank, zbv_zero_bubble, dualpipev), in whole-rank micro-batches; and the
    memory model adds what they hold only where the weight steps defer the expert loop's GEMMs (replicated,
    the loop path)."""
    import types

    from torch.distributed.pipelining.schedules import BACKWARD_INPUT, BACKWARD_WEIGHT, ScheduleInterleavedZeroBubble

    from moeyard.trainer.scheduler.memory_model import pending_weight_steps

    def peak(actions) -> int:
        pending = most = 0
        for a in (a for a in actions if a is not None):
            pending += {BACKWARD_INPUT: 1, BACKWARD_WEIGHT: -1}.get(a.computation_type, 0)
            most = max(most, pending)
        return most

    for pp in (2, 4, 8):
        for n in (2 * pp, 4 * pp):
            for schedule in ("zbv_zero_bubble", "dualpipev"):
                for rank, actions in _torch_v_order(schedule, pp, n).items():
                    flat = [sub for a in actions if a is not None for sub in (a.sub_actions or (a,))]
                    assert pending_weight_steps(schedule, pp, rank, 2) == peak(flat) / 2, (schedule, pp, n, rank)
            for per_rank in (2, 4):
                fake = types.SimpleNamespace(pp_group_size=pp, _n_microbatches=n, n_local_stages=per_rank,
                                             number_of_rounds=n // pp, microbatches_per_round=pp)
                for rank in range(pp):
                    fake.rank = rank
                    order = ScheduleInterleavedZeroBubble._calculate_single_rank_operations(fake, rank)
                    assert pending_weight_steps("interleaved_zero_bubble", pp, rank, per_rank) == \
                        peak(order) / per_rank, (pp, n, per_rank, rank)
    # Where the gradient sync holds its reduction (replicated; fsdp gathered once reducing once) the pending
    # weight steps hold their GEMMs' operands; fsdp reducing in every micro-step leaves the weight steps empty.
    replicated = Layout(world=4, ep=2, tokens=256, micro_steps=4, pp=2, pipeline="zbv_zero_bubble", stages_per_rank=2)
    held = dataclasses.replace(replicated, grad_sync="fsdp", gather_once=True)
    resident = dataclasses.replace(held, reduce_once=False)
    per_micro_step = dataclasses.replace(held, gather_once=False)
    activations = {name: predict_memory(CFG, layout).activations for name, layout in
                   [("replicated", replicated), ("held", held), ("resident", resident), ("per", per_micro_step)]}
    assert activations["replicated"] == activations["held"] > activations["resident"] == activations["per"]
    # Under bf16 compute with float32 reduction, FSDP2's float32 accumulator and the weight steps' bf16 .grad
    # stand together; without deferring only the accumulator does.
    mixed = dataclasses.replace(held, act_bytes=2, reduce_bytes=4)
    whole = dataclasses.replace(mixed, defer_weight_gradients=False)
    assert predict_memory(CFG, mixed).gradients > predict_memory(CFG, whole).gradients
    assert predict_memory(CFG, held).gradients == \
        predict_memory(CFG, dataclasses.replace(held, defer_weight_gradients=False)).gradients  # float32 compute


def test_accumulating_backwards_hold_one_blocks_fresh_weight_gradients() -> None:
    """Replicated gradients accumulating over micro-steps: each block's backward computes its weight gradients
    into new tensors before adding them to the accumulated ones (measured: a pp 2 1f1b first stage under full
    recompute peaked 34 MB above the model's activations, one MoE block's local weights being 28 MB); on the
    stage of the output layer, its gradient (per loss chunk) where larger. One micro-step: the fresh gradients
    are .grad."""
    layout = Layout(world=2, ep=2, tokens=256, micro_steps=2)
    block = count_parameters(CFG, 2).largest_block
    assert block > CFG.vocab_size * CFG.dim  # the block's gradients are the larger here
    two, one = predict_memory(CFG, layout), predict_memory(CFG, dataclasses.replace(layout, micro_steps=1))
    assert two.activations - one.activations == pytest.approx(4 * block)
    wide = dataclasses.replace(CFG, vocab_size=32768)  # an output layer of 4 M weights, larger than a block
    two, one = predict_memory(wide, layout), predict_memory(wide, dataclasses.replace(layout, micro_steps=1))
    assert two.activations - one.activations == pytest.approx(4 * 32768 * CFG.dim)
    # A pipeline's first stage holds no output layer: its blocks' gradients
    from moeyard.trainer.scheduler.memory_model import predict_stage, stage_counts

    staged = dataclasses.replace(layout, world=4, pp=2, micro_steps=4, pipeline="1f1b")
    first = stage_counts(wide, staged)[0]
    fewer = dataclasses.replace(staged, micro_steps=2)  # stage 0 holds both: no gradient when backward begins
    grown = predict_stage(wide, staged, first, 0).activations - predict_stage(wide, fewer, first, 0).activations
    assert grown == pytest.approx(4 * first.largest_block)


def test_a_blocks_activations_are_what_autograd_saves() -> None:
    """_block_activations against the tensors autograd keeps for one block's backward (saved-tensor hooks,
    each storage once, the parameters and RoPE tables left out), on a dense and an MoE block in float32."""
    import torch

    from moeyard.trainer.scheduler.memory_model import _block_activations

    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, dim=256, ffn_dim=512, moe=dataclasses.replace(CFG.moe, ffn_dim=256))
    model = Transformer(cfg)
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    T = 256
    x = torch.randn(1, T, cfg.dim, requires_grad=True)
    for layer in (0, 1):  # first_dense_layers=1: a dense block, then an MoE block
        saved: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in kept:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.layers[layer](x, model.rope_cos[:T], model.rope_sin[:T])
        predicted = _block_activations(cfg, layer, T, 4, "none")
        assert sum(saved.values()) == pytest.approx(predicted, rel=0.1), (layer, sum(saved.values()), predicted)


def test_gpipe_holds_no_gradient_when_its_backwards_begin() -> None:
    """gpipe runs every forward first: its peak is all micro-batches' activations without gradients (measured:
    the pp 2 row of benchmarks/memory.py at 0.84 of the prediction that held both, 1.05 now), or the
    gradients at the end; 1f1b's backwards begin with earlier micro-batches' gradients accumulated."""
    layout = Layout(world=4, ep=2, tokens=256, micro_steps=4, pp=2, pipeline="gpipe")
    gpipe = predict_memory(CFG, layout)
    assert gpipe.start_of_backward == pytest.approx(gpipe.parameters + gpipe.optimizer + gpipe.activations
                                                    + gpipe.with_activations)
    one_f_one_b = predict_memory(CFG, dataclasses.replace(layout, pipeline="1f1b"))
    assert one_f_one_b.start_of_backward == pytest.approx(
        one_f_one_b.parameters + one_f_one_b.optimizer + one_f_one_b.gradients + one_f_one_b.activations
        + one_f_one_b.with_activations)


@pytest.mark.parametrize("grad_sync,recompute,copies", [("all_reduce", "none", True), ("all_reduce", "selective", True),
                                                        ("all_reduce", "full", False), ("fsdp", "none", False)])
def test_autocast_expert_copies_are_kept_per_micro_batch_in_flight(monkeypatch, grad_sync, recompute, copies) -> None:
    """Replicated weights under autocast: the experts' paths save the bf16 casts of a MoE block's local
    experts for backward, one set per micro-batch in flight (a pipeline stage holds several; measured on gloo:
    tests/distributed/test_exchange.py). FSDP's units are gathered in bf16 already (no copy); under full
    recompute one block's copy stands at a time, within autocast's copies."""
    from moeyard.trainer.scheduler import memory_model

    layout = Layout(world=4, ep=2, tokens=256, grad_sync=grad_sync, recompute=recompute, act_bytes=2, pp=2,
                    pipeline="1f1b", micro_steps=8)
    counts = memory_model.stage_counts(CFG, layout)[0]
    real = memory_model.predict_stage(CFG, layout, counts, 0)
    monkeypatch.setattr(memory_model, "_local_experts", lambda cfg, layout, block: 0)
    without = memory_model.predict_stage(CFG, layout, counts, 0)
    held = memory_model.stage_blocks(CFG, 0, 2)
    per_micro_batch = sum(2 * 3 * (CFG.moe.num_experts // 2) * CFG.dim * CFG.moe.ffn_dim for i in held
                          if CFG.is_moe_layer(i))
    flight = memory_model.in_flight("1f1b", 2, 0, 8)
    assert flight == 2 and per_micro_batch > 0
    assert real.activations - without.activations == (flight * per_micro_batch if copies else 0)
