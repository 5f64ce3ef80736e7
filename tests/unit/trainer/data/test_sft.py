"""SFT data: formats, malformed lines, chat template masks, packing and padding, held-out split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeyard.errors import DataError
from moeyard.trainer.data.sft import ByteChatTemplate, Example, read_conversations, split_heldout, target_mask, to_rows

T = ByteChatTemplate


def write_jsonl(path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def example(n: int, first: int) -> Example:
    return Example(list(range(first, first + n)), [False] * (n // 2) + [True] * (n - n // 2))


def _chatml_tokenizer(folder: Path) -> Path:
    """A small word-level HF tokenizer with a ChatML chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "system", "user", "assistant", "def", "return", "self", "x", "(", ")", ":",
             "value", "None", "loop"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(str(folder))
    return folder


def test_both_formats_render_to_the_same_conversation(tmp_path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "",
        {"prompt": "hi", "completion": "yo"},
    ])
    conversations, skipped = read_conversations(tmp_path / "d.jsonl", skip_malformed=False)
    assert conversations[0] == conversations[1] and skipped == []


def test_only_assistant_content_and_its_end_are_learned() -> None:
    example = T().render([{"role": "system", "content": "s"}, {"role": "user", "content": "ab"},
                          {"role": "assistant", "content": "cd"}])
    assert example.tokens == [T.ROLE_IDS["system"], ord("s"), T.END_ID, T.ROLE_IDS["user"], ord("a"), ord("b"),
                              T.END_ID, T.ROLE_IDS["assistant"], ord("c"), ord("d"), T.END_ID]
    assert example.learn == [False] * 8 + [True, True, True]


@pytest.mark.parametrize("line,reason", [
    ("{not json", "Expecting property name"),
    ('["a"]', "expected a JSON object"),
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "message 0 needs a role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"prompt": "x"}', 'expected "messages", or "prompt" and "completion"'),
    ('{"prompt": 1, "completion": "y"}', "must be strings"),
])
def test_malformed_lines_are_named_by_file_and_line_or_skipped_and_counted(tmp_path, line, reason) -> None:
    good = {"prompt": "p", "completion": "c"}
    write_jsonl(tmp_path / "d.jsonl", [good, line, good])
    with pytest.raises(DataError) as err:
        read_conversations(tmp_path / "d.jsonl", skip_malformed=False)
    assert "d.jsonl:2: " in str(err.value) and reason in str(err.value) and "sft.skip_malformed" in str(err.value)
    conversations, skipped = read_conversations(tmp_path / "d.jsonl", skip_malformed=True)
    assert len(conversations) == 2 and len(skipped) == 1
    assert skipped[0].startswith(f"{tmp_path / 'd.jsonl'}:2: ") and reason in skipped[0]


def test_a_line_that_is_not_utf8_is_named_not_a_traceback(tmp_path) -> None:
    (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "p", "completion": "c"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text"):
        read_conversations(tmp_path / "d.jsonl", skip_malformed=False)
    conversations, skipped = read_conversations(tmp_path / "d.jsonl", skip_malformed=True)
    assert len(conversations) == 1 and "not UTF-8" in skipped[0]


def test_packing_keeps_examples_whole_and_marks_their_segments() -> None:
    rows = to_rows([example(4, 10), example(3, 20), example(5, 30), example(9, 40)], seq_len=7, layout="pack",
                   pad_id=0)
    # Rows of 8 tokens: [4 + 3 + pad], [5 + pad], [first 8 of the 9: truncated].
    assert rows.tokens[0] == [10, 11, 12, 13, 20, 21, 22, 0] and rows.segment[0] == [1] * 4 + [2] * 3 + [0]
    assert rows.tokens[1] == [30, 31, 32, 33, 34, 0, 0, 0] and rows.segment[1] == [1] * 5 + [0] * 3
    assert rows.tokens[2] == list(range(40, 48)) and rows.truncated == 1
    assert len(rows.tokens) == 3 and all(len(r) == 8 for r in rows.tokens)


def test_padding_gives_each_example_its_own_row() -> None:
    rows = to_rows([example(4, 10), example(3, 20)], seq_len=7, layout="pad", pad_id=0)
    assert rows.segment == [[1] * 4 + [0] * 4, [1] * 3 + [0] * 5]


def test_targets_never_cross_an_example_boundary_or_reach_padding() -> None:
    rows = to_rows([Example([1, 2, 3], [False, True, True]), Example([4, 5], [False, True])], seq_len=5,
                   layout="pack", pad_id=0)
    mask = target_mask(torch.tensor(rows.learn), torch.tensor(rows.segment))
    # Targets are tokens 2..6 of the row [1 2 3 4 5 pad]: 2 and 3 learned; 4 starts example 2 (not
    # predicted from 3, and not learned); 5 learned; the padding is not.
    assert mask.tolist() == [[True, True, False, True, False]]


def test_heldout_split_is_fixed_and_disjoint() -> None:
    items = list(range(100))
    train, held = split_heldout(items, 0.1, seed=3)
    assert (train, held) == split_heldout(items, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items


def test_a_packed_example_computes_exactly_what_it_computes_alone() -> None:
    """Attention never crosses examples and positions restart: the logits of each packed example equal its
    logits run alone (padding included in the row, and a dense-free MoE model)."""
    from moeyard.models import ModelConfig, MoEConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=264, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16)))
    a, b = torch.randint(0, 256, (5,)), torch.randint(0, 256, (7,))
    row = torch.cat([a, b, torch.zeros(4, dtype=torch.long)]).view(1, -1)
    segment = torch.tensor([[1] * 5 + [2] * 7 + [0] * 4])
    with torch.no_grad():
        packed = model(row, segment).logits_BTV[0]
        alone_a = model(a.view(1, -1)).logits_BTV[0]
        alone_b = model(b.view(1, -1)).logits_BTV[0]
        unmasked = model(row).logits_BTV[0]
    torch.testing.assert_close(packed[:5], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[5:12], alone_b, rtol=1e-5, atol=1e-5)
    assert (unmasked[5:12] - alone_b).abs().max() > 1e-3, "without segments the second example sees the first"


def test_hf_chat_template_learns_exactly_the_assistant_turns(tmp_path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from moeyard.trainer.data.sft import HFChatTemplate

    folder = _chatml_tokenizer(tmp_path / "tok")
    template = HFChatTemplate(folder)
    messages = [{"role": "system", "content": "self"}, {"role": "user", "content": "def x ( )"},
                {"role": "assistant", "content": "return x"}, {"role": "user", "content": "loop"},
                {"role": "assistant", "content": "None"}]
    example = template.render(messages)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert example.tokens == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    learned = [t for t, keep in zip(example.tokens, example.learn) if keep]
    expected = tokenizer("return x<|im_end|> None<|im_end|>", add_special_tokens=False)["input_ids"]
    assert learned == expected
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in template.stop_ids()
    assert template.prompt(messages[:-1])[-2:] == tokenizer("<|im_start|>assistant", add_special_tokens=False)[
        "input_ids"]


def test_sft_tokenizer_never_runs_a_folders_code_nor_reaches_the_hub(tmp_path) -> None:
    """Issue 35 item 2: a tokenizer_config.json with auto_map used to get transformers' "run this code?"
    prompt (and ran tokenization_evil.py on a "y"); a Hub name went to the network. Local folders only, and
    never their Python: the payload's marker file stays absent."""
    pytest.importorskip("transformers")
    from moeyard.trainer.data.sft import HFChatTemplate

    folder = _chatml_tokenizer(tmp_path / "tok")
    marker = tmp_path / "ran"
    (folder / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                                 "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="without running code from the folder"):
        HFChatTemplate(folder)
    assert not marker.exists(), "the folder's Python ran"
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        HFChatTemplate(Path("some-org/some-model"))
