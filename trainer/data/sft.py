"""Instruction-tuning data: JSONL conversations, rendered with a chat template, masked, packed or padded.

A line is `{"messages": [{"role": ..., "content": ...}, ...]}` or `{"prompt": ..., "completion": ...}`.
Only assistant turns are learned: every other token has loss mask False. Rows carry a segment id per
token (0 = padding) so that the model can keep attention inside one example and restart positions.

The built-in template works over the byte tokenizer with four reserved ids after the bytes and
end-of-text (the tiny configs have vocab_size 264): one per role marker and one that ends a turn.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moeyard.errors import DataError
from moeyard.trainer.data.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    import torch

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    tokens: list[int]
    learn: list[bool]
    """Per token: is it a target the loss counts (assistant content and its end-of-turn)?"""


@dataclass(frozen=True)
class Rows:
    """Fixed-length rows of seq_len + 1 tokens: inputs are [:-1], targets [1:]."""

    tokens: list[list[int]]
    learn: list[list[bool]]
    segment: list[list[int]]
    """Which example each token belongs to, 1, 2, ... within the row; 0 is padding."""
    truncated: int
    """Examples cut to fit seq_len + 1 tokens."""


class ByteChatTemplate:
    """`<|role|>content<|end|>` per message over the byte tokenizer."""

    ROLE_IDS = {"system": 257, "user": 258, "assistant": 259}
    END_ID = 260
    vocab_size = 261
    pad_id = 256  # end of text

    def __init__(self) -> None:
        self.tokenizer = ByteTokenizer()

    def render(self, messages: list[dict]) -> Example:
        tokens: list[int] = []
        learn: list[bool] = []
        for message in messages:
            content = self.tokenizer.encode(message["content"])
            assistant = message["role"] == "assistant"
            tokens += [self.ROLE_IDS[message["role"]], *content, self.END_ID]
            # The role marker is given; the content and the end of the turn (when to stop) are learned.
            learn += [False] + [assistant] * (len(content) + 1)
        return Example(tokens, learn)

    def prompt(self, messages: list[dict]) -> list[int]:
        """The tokens after which the model writes the next assistant turn."""
        return self.render(messages).tokens + [self.ROLE_IDS["assistant"]]

    def stop_ids(self) -> set[int]:
        return {self.END_ID}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i < 256])


class HFChatTemplate:
    """A local Hugging Face tokenizer's own chat template (`apply_chat_template`).

    Assistant tokens are found by rendering growing prefixes of the conversation: what message i adds
    after the generation prompt that precedes it is learned. A template whose renderings are not
    prefixes of each other (some drop earlier turns' reasoning) is refused rather than mis-masked.
    """

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        if not (folder / "tokenizer.json").is_file():
            raise DataError(f"sft.tokenizer={folder} holds no tokenizer.json: give a local folder with a fast "
                            f"tokenizer, written by save_pretrained (names on the Hugging Face Hub are not fetched, "
                            f"slow-only tokenizers such as a lone tokenizer.model are not read)")
        try:  # a local fast tokenizer only: never the Hub, never a folder's own Python (auto_map)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        except (ValueError, OSError) as err:
            raise DataError(f"the tokenizer in {folder} could not be loaded without running code from the folder "
                            f"or the network: {err}") from None
        if not self.tokenizer.chat_template:
            raise DataError(f"the tokenizer in {folder} has no chat_template: set one, or drop sft.tokenizer to "
                            f"use the built-in template")
        self.vocab_size = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _ids(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        if not messages:
            return []
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, messages: list[dict]) -> Example:
        tokens: list[int] = []
        learn: list[bool] = []
        for i, message in enumerate(messages):
            assistant = message["role"] == "assistant"
            before = self._ids(messages[:i], generation_prompt=assistant) if assistant else tokens
            upto = self._ids(messages[:i + 1], generation_prompt=False)
            if upto[:len(tokens)] != tokens or upto[:len(before)] != before:
                raise DataError("the tokenizer's chat template renders a conversation differently from its "
                                "beginning: assistant tokens cannot be told apart; use the built-in template")
            learn += [False] * (len(before) - len(tokens)) + [assistant] * (len(upto) - len(before))
            tokens = upto
        return Example(tokens, learn)

    def prompt(self, messages: list[dict]) -> list[int]:
        return self._ids(messages, generation_prompt=True)

    def stop_ids(self) -> set[int]:
        """eos, and the first token the template puts after an assistant turn's content (e.g. <|im_end|>)."""
        stops = {i for i in (self.tokenizer.eos_token_id,) if i is not None}
        turn = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
        learned = [t for t, keep in zip(turn.tokens, turn.learn) if keep]
        content = self.tokenizer("ok", add_special_tokens=False)["input_ids"]
        if learned[:len(content)] == content and len(learned) > len(content):
            stops.add(learned[len(content)])
        return stops

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _messages(record: object) -> list[dict]:
    """The conversation of one JSON record; raises ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ValueError(f"message {i} needs a role, one of {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f'message {i} needs a string "content"')
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("no assistant message: nothing to learn from this conversation")
        return messages
    if "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise ValueError('"prompt" and "completion" must be strings')
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]}]
    raise ValueError('expected "messages", or "prompt" and "completion"')


def read_conversations(path: Path, skip_malformed: bool) -> tuple[list[list[dict]], list[str]]:
    """Every conversation of a JSONL file, and (when skipping) one `file:line: reason` per bad line."""
    conversations: list[list[dict]] = []
    skipped: list[str] = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                conversations.append(_messages(json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as err:
                problem = f"{path}:{number}: not UTF-8 text (byte {err.start} of the line)"
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                problem = f"{path}:{number}: {err}"
            else:
                continue
            if not skip_malformed:
                raise DataError(f"{problem} (set sft.skip_malformed=true to skip and count such lines)")
            skipped.append(problem)
    if not conversations:
        raise DataError(f"{path} holds no usable conversation: each line needs \"messages\" (with an assistant "
                        f"turn), or \"prompt\" and \"completion\"")
    return conversations, skipped


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a fixed random `fraction` held out, the same for every rank and every run."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = round(len(items) * fraction)
    held = set(order[:cut])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def to_rows(examples: list[Example], seq_len: int, layout: Literal["pack", "pad"], pad_id: int) -> Rows:
    """Pack examples greedily in order into rows of seq_len + 1 tokens (an example never straddles two
    rows), or give each its own padded row. Examples longer than a row are cut at the end."""
    width = seq_len + 1
    rows = Rows([], [], [], truncated=0)
    tokens: list[int] = []
    learn: list[bool] = []
    segment: list[int] = []

    def flush() -> None:
        if tokens:
            fill = width - len(tokens)
            rows.tokens.append(tokens + [pad_id] * fill)
            rows.learn.append(learn + [False] * fill)
            rows.segment.append(segment + [0] * fill)

    truncated = 0
    for example in examples:
        t, m = example.tokens[:width], example.learn[:width]
        truncated += len(example.tokens) > width
        if layout == "pad" or len(tokens) + len(t) > width:
            flush()
            tokens, learn, segment = [], [], []
        next_segment = (segment[-1] if segment else 0) + 1
        tokens, learn, segment = tokens + t, learn + m, segment + [next_segment] * len(t)
    flush()
    return Rows(rows.tokens, rows.learn, rows.segment, truncated)


def target_mask(learn_BT1: "torch.Tensor", segment_BT1: "torch.Tensor") -> "torch.Tensor":
    """[B, T] bool: which targets (token j + 1 predicted at position j) the loss counts. A target counts if
    it is learned and belongs to the same example as its input: never predict across a boundary."""
    same_example = (segment_BT1[:, 1:] == segment_BT1[:, :-1]) & (segment_BT1[:, 1:] > 0)
    return learn_BT1[:, 1:] & same_example
