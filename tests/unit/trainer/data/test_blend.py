"""Weighted blends, the data position, document segments."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeyard.errors import DataError
from moeyard.trainer.data.blend import CorpusSource, DataPosition, TokenBatches
from moeyard.trainer.data.corpus import PrepareOptions, prepare_corpus


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    """Corpus "a" of documents of 'a' bytes and corpus "b" of 'b' bytes, so a window shows its source."""
    root = tmp_path_factory.mktemp("blend")
    out = {}
    for name, size in (("a", 300), ("b", 200)):
        rows = [json.dumps({"text": name * (17 + 13 * (i % 7))}) for i in range(size)]
        (root / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
        prepare_corpus([root / f"{name}.jsonl"], root / name, PrepareOptions())
        out[name] = root / name
    return out


def _sources(corpora, weights=(0.7, 0.3)) -> list[CorpusSource]:
    return [CorpusSource(n, corpora[n], w) for n, w in zip("ab", weights)]


def _source_of(window: torch.Tensor) -> str:
    return chr(int(window[window < 256][0]))


def test_each_source_gets_its_weight_within_one_sample(two_corpora) -> None:
    data = TokenBatches(_sources(two_corpora), seq_len=16, global_batch=10, dp_rank=0, dp_size=1, seed=3)
    picked = [_source_of(row) for step in range(150) for row in data.batch(step).tokens_BT1]
    for start in (0, 500):
        share = picked[start:start + 1000].count("a") / 1000
        assert abs(share - 0.7) <= 0.02, share
    assert abs(picked[:1000].count("a") - 700) <= 1, "the largest-deficit rule keeps every prefix on its share"
    assert data.tokens_per_source() == {"a": 1050 * 16, "b": 450 * 16}


def test_the_blend_is_the_same_global_batch_at_any_world_size(two_corpora) -> None:
    single = TokenBatches(_sources(two_corpora), 16, 8, 0, 1, seed=1)
    ranks = [TokenBatches(_sources(two_corpora), 16, 8, r, 4, seed=1) for r in range(4)]
    for step in range(6):
        whole = single.batch(step).tokens_BT1
        assert torch.equal(torch.cat([r.batch(step).tokens_BT1 for r in ranks]), whole)
    assert len({tuple(p) for p in single.global_picks(2)}) == 8, "a window repeats within a batch"


def test_a_restored_position_continues_the_uninterrupted_batches_at_another_world_size(two_corpora) -> None:
    ref = TokenBatches(_sources(two_corpora), 16, 8, 0, 1, seed=2)
    expected = [ref.batch(s).tokens_BT1 for s in range(40)]  # several epochs of "b" (25 windows a batch of 8)
    saved = json.loads(json.dumps(ref.position_at(23).to_dict()))  # as a manifest carries it
    ranks = [TokenBatches(_sources(two_corpora), 16, 8, r, 2, seed=2) for r in range(2)]
    for r in ranks:
        r.restore(DataPosition.from_dict(saved), 23)
    for step in range(23, 40):
        assert torch.equal(torch.cat([r.batch(step).tokens_BT1 for r in ranks]), expected[step]), step


def test_new_weights_on_resume_count_shares_from_there(two_corpora) -> None:
    ref = TokenBatches(_sources(two_corpora), 16, 10, 0, 1, seed=0)
    for step in range(10):
        ref.batch(step)
    saved = ref.position_at(10)
    flipped = TokenBatches(_sources(two_corpora, (0.2, 0.8)), 16, 10, 0, 1, seed=0)
    assert flipped.changed_blend(saved) and not ref.changed_blend(saved)
    flipped.restore(saved, 10)
    picked = [_source_of(row) for step in range(10, 60) for row in flipped.batch(step).tokens_BT1]
    assert abs(picked.count("b") - 400) <= 1
    assert flipped.position_at(60).drawn["a"] == saved.drawn["a"] + picked.count("a"), "a source restarted"


def test_document_segments_follow_the_document_index(tmp_path) -> None:
    lengths = [5, 40, 3, 12, 70, 9]
    rows = [json.dumps({"text": chr(97 + i) * (n - 1)}) for i, n in enumerate(lengths)]  # + EOS = n tokens
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "c", PrepareOptions())
    data = TokenBatches(tmp_path / "c", 24, 2, 0, 1, seed=0, document_mask=True)
    starts = np.cumsum([0] + lengths[:-1])
    for step in range(3):
        batch = data.batch(step)
        for wid, tokens, segment in zip(data.window_ids(step), batch.tokens_BT1, batch.segment_BT1):
            position = np.arange(wid * 24, wid * 24 + 25)
            doc = np.searchsorted(starts, position, side="right") - 1
            assert segment.tolist() == (doc - doc[0]).tolist()
            assert all(chr(97 + d) == chr(t) for d, t in zip(doc, tokens.tolist()) if t < 256)


def test_document_masked_logits_of_a_packed_window_equal_each_document_alone(tmp_path) -> None:
    """The pretraining path end to end: corpus index -> segments -> host-built spans -> the model."""
    from moeyard.models import ModelConfig, MoEConfig, Transformer
    from moeyard.trainer.step import _micro_batches

    lengths = [7, 19, 4, 30]
    rows = [json.dumps({"text": "".join(chr(40 + (i * 7 + j * 3) % 80) for j in range(n - 1))})
            for i, n in enumerate(lengths)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    prepare_corpus([tmp_path / "d.jsonl"], tmp_path / "c", PrepareOptions())
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2))).eval()
    data = TokenBatches(tmp_path / "c", 48, 1, 0, 1, seed=0, document_mask=True)
    (micro,) = _micro_batches(data.batch(0), 1, torch.device("cpu"))
    tokens_T, segment_T = micro.tokens_BT1[0, :-1], micro.segment_BT1[0, :-1]
    assert len(micro.docs.lengths) >= 2, "the window should hold several documents"
    with torch.no_grad():
        packed = model(tokens_T[None], segment_T[None], docs=micro.docs).logits_BTV[0]
        for doc in segment_T.unique():
            alone = model(tokens_T[segment_T == doc][None]).logits_BTV[0]
            torch.testing.assert_close(packed[segment_T == doc], alone, atol=1e-5, rtol=0)


def test_a_source_keeps_its_order_when_the_list_is_reordered(two_corpora) -> None:
    ab = TokenBatches(_sources(two_corpora), 16, 10, 0, 1, seed=4)
    ba = TokenBatches(list(reversed(_sources(two_corpora))), 16, 10, 0, 1, seed=4)
    assert [s.window_id(d) for s in ab.sources for d in range(30)] == \
        [s.window_id(d) for s in reversed(ba.sources) for d in range(30)]


def test_an_imported_model_without_a_tokenizer_never_trains_on_byte_ids(capsys) -> None:
    """Issue 35 item 6: an --init checkpoint imported from an HF folder without tokenizer.json trained on a
    byte corpus without a word. Refused for byte ids; with another tokenizer's corpus it cannot be checked,
    and says so."""
    from moeyard import configs
    from moeyard.trainer.config.sections import read_config
    from moeyard.trainer.data.compat import check_tokenizers

    cfg = read_config(configs.path("tiny.yaml"), ["model.vocab_size=32000"])
    imported = ("checkpoint.init", {"source": {"format": "huggingface", "dir": "/models/hf-mixtral",
                                               "family": "mixtral"}})
    byte_ids = {"data": {"vocab_size": 257, "tokenizer": {"name": "bytes", "hash": "bytes", "vocab_size": 257}}}
    with pytest.raises(DataError, match="without a tokenizer, and the corpus 'data' holds byte ids"):
        check_tokenizers(cfg, byte_ids, [imported])
    bpe_ids = {"data": {"vocab_size": 32000, "tokenizer": {"name": "bpe", "hash": "abc", "vocab_size": 32000}}}
    check_tokenizers(cfg, bpe_ids, [imported])
    assert "records no tokenizer" in capsys.readouterr().out
    pruned = ("checkpoint.init", {"source": {"family": "moeyard (pruned)", "dir": "/runs/x/step_000004"}})
    check_tokenizers(cfg, byte_ids, [pruned])  # not an import: nothing to say
