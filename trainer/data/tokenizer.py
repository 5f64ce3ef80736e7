"""Tokenizers for pretraining corpora: the built-in byte tokenizer, or a local Hugging Face one.

A Hugging Face tokenizer is read from its folder's `tokenizer.json` with the `tokenizers` library (no
transformers needed, batched encoding in Rust). Each document is encoded with the tokenizer's own special
tokens (its post-processor adds BOS where the tokenizer defines it, e.g. Llama-3) and ends with its EOS
token, as Megatron-LM's `--append-eod` does. The identity of a tokenizer is a content hash of its
canonical tokenizer.json and special tokens: corpora and checkpoints record it, so a run refuses data
tokenized differently from the model it trains.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moeyard.errors import DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
"""The files of a Hugging Face tokenizer folder that travel with a corpus and an exported model."""


class ByteTokenizer:
    """Every byte is a token, plus an end-of-text token. Needs no download."""

    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, data: bytes | str) -> list[int]:
        return list(data.encode("utf-8") if isinstance(data, str) else data)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_documents(self, texts: list[bytes]) -> list[np.ndarray]:
        """Token ids of each document (UTF-8 bytes), EOS at the end."""
        eos = np.array([self.eos_id], dtype=np.uint32)
        return [np.concatenate([np.frombuffer(t, dtype=np.uint8).astype(np.uint32), eos]) for t in texts]

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "hash": self.name, "eos_id": self.eos_id}


def _special_token(folder: Path, key: str) -> Optional[str]:
    """bos_token / eos_token as tokenizer_config.json (else special_tokens_map.json) names it."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            value = _read_json(path).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path} is not valid JSON ({err}): save the tokenizer again with save_pretrained") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} does not hold a JSON object: save the tokenizer again with save_pretrained")
    return data


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _vocabulary(tokenizer_json: dict[str, Any], path: Path) -> dict[str, int]:
    """token -> id of a tokenizer.json: its model's vocabulary (a mapping, or Unigram's list of
    [piece, score]) and its added tokens; DataError naming `path` where they are not that."""
    model = tokenizer_json.get("model")
    vocab = model.get("vocab", {}) if isinstance(model, dict) else None
    if isinstance(vocab, list) and all(isinstance(p, list) and p and isinstance(p[0], str) for p in vocab):
        ids = {piece[0]: i for i, piece in enumerate(vocab)}
    elif isinstance(vocab, dict) and all(_is_id(i) for i in vocab.values()):
        ids = dict(vocab)
    else:
        raise DataError(f"{path}: its model's vocab is not a mapping of tokens to ids (nor Unigram's list of "
                        f"[piece, score]): save the tokenizer again with save_pretrained")
    added = tokenizer_json.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                              and _is_id(t.get("id")) for t in added):
        raise DataError(f"{path}: added_tokens must be a list of {{content: token, id: id}}: save the tokenizer "
                        f"again with save_pretrained")
    ids.update({t["content"]: t["id"] for t in added})
    return ids


def tokenizer_record(folder: Path) -> dict[str, Any]:
    """What identifies a Hugging Face tokenizer, read from its files alone (no tokenizers library): name,
    vocabulary size (highest id + 1: the embedding rows it needs), EOS id and a content hash of its
    tokenizer.json as canonical JSON (key order and whitespace do not count) and its BOS/EOS tokens."""
    data = _read_json(folder / "tokenizer.json")
    ids = _vocabulary(data, folder / "tokenizer.json")
    bos, eos = _special_token(folder, "bos_token"), _special_token(folder, "eos_token")
    if eos is not None and eos not in ids:
        raise DataError(f"the tokenizer in {folder} names eos_token {eos!r}, which is not in its vocabulary")
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")) + f"|bos={bos}|eos={eos}"
    return {"name": folder.resolve().name, "vocab_size": max(ids.values(), default=-1) + 1,
            "hash": hashlib.sha256(canonical.encode()).hexdigest()[:16], "eos_id": None if eos is None else ids[eos]}


class HFTokenizer:
    """A local Hugging Face fast tokenizer (its tokenizer.json), encoding documents in batches."""

    def __init__(self, folder: Path) -> None:
        if not (folder / "tokenizer.json").is_file():
            raise DataError(f"--tokenizer {folder} has no tokenizer.json (a fast tokenizer's file): give a folder "
                            f"written by a tokenizer's save_pretrained, e.g. a Hugging Face model folder")
        self.folder = folder
        self.meta = tokenizer_record(folder)
        self.name, self.vocab_size, self.eos_id = self.meta["name"], self.meta["vocab_size"], self.meta["eos_id"]
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("a Hugging Face tokenizer needs the `tokenizers` package: pip install "
                            "'moeyard[data]'") from None
        try:
            self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # the Rust side raises its own Exception type
            raise DataError(f"{folder / 'tokenizer.json'} could not be read as a tokenizer: {err}") from None
        self.backend.no_truncation()  # a saved max_length would cut every document short, silently
        self.backend.no_padding()
        self._encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        bare, special = (self.backend.encode("a", add_special_tokens=flag).ids for flag in (False, True))
        at = next((i for i in range(len(special) - len(bare) + 1) if special[i:i + len(bare)] == bare), None)
        self._around = (special[:at], special[at + len(bare):]) if at is not None else ([], [])  # BOS, ...
        self.splits_at_lines = at is not None and _splits_at_lines(_read_json(folder / "tokenizer.json")) and \
            self._pieces_encode_as_whole()

    def _pieces_encode_as_whole(self) -> bool:
        """The rule line_pieces relies on, tried on this tokenizer: a probe cut into pieces at every allowed
        newline encodes to the ids of the whole (prefix spaces, merges across a newline and odd Split
        patterns fail it)."""
        probe = "a.\nb\n1\n'x\n\u03bb y\nend\r\nz \n q\nword. Word\n" * 3
        pieces = line_pieces(probe, 4)
        whole = self.backend.encode(probe, add_special_tokens=False).ids
        return len(pieces) > 1 and [i for p in pieces for i in self.backend.encode(p, add_special_tokens=False).ids] \
            == whole

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each document: the tokenizer's own special tokens (BOS where it adds one), then EOS.
        A document longer than PIECE_CHARS is encoded in pieces cut at line starts (`line_pieces`), where the
        tokenizer's pre-tokenizer splits anyway: the same ids, with memory that follows a piece, not the
        document (a tokenizer holds ~165x the text it encodes)."""
        tail = [] if self.eos_id is None else [self.eos_id]
        if not self.splits_at_lines or all(len(t) <= PIECE_CHARS for t in texts):
            return [np.array(e.ids + tail, dtype=np.uint32) for e in self._encode(texts, add_special_tokens=True)]
        head, end = self._around
        out = []
        for text in texts:
            pieces = line_pieces(text)
            ids = [i for e in self._encode(pieces, add_special_tokens=False) for i in e.ids] if len(pieces) > 1 \
                else self._encode([text], add_special_tokens=False)[0].ids
            out.append(np.array(head + ids + end + tail, dtype=np.uint32))
        return out

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    def record(self) -> dict[str, Any]:
        return dict(self.meta)


PIECE_CHARS = 1 << 20
"""Longer documents are encoded a piece at a time (HFTokenizer.encode_documents)."""


def _splits_at_lines(tokenizer_json: dict[str, Any]) -> bool:
    """Whether this tokenizer's pre-tokenizer always separates "\n" from a following word (GPT-2's and
    Llama-3's regexes, ByteLevel), with no normalizer that could join across lines, so that cutting a text
    after such a newline changes no token. SentencePiece's Metaspace (a "▁" before each text) does not."""
    pre, normalizer = tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("normalizer")
    parts = (pre.get("pretokenizers") or []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    return bool(parts) and all(isinstance(p, dict) and (
        (p.get("type") == "ByteLevel" and not p.get("add_prefix_space")) or
        (p.get("type") == "Split" and p.get("behavior") == "Isolated" and not p.get("invert"))) for p in parts) \
        and (normalizer is None or (isinstance(normalizer, dict) and normalizer.get("type") == "NFC"))


def line_pieces(text: str, size: int | None = None) -> list[str]:
    """`text` cut into pieces of at most about `size` characters (PIECE_CHARS), each cut right after a "\n"
    that sits between two non-space characters (a single newline, then a word: the pre-tokenizers above put
    a boundary there alone); a stretch without such a newline stays whole."""
    size = size or PIECE_CHARS
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.rfind("\n", start + 1, start + size)
        while cut > start and (text[cut - 1].isspace() or cut + 1 >= len(text) or text[cut + 1].isspace()):
            cut = text.rfind("\n", start + 1, cut)
        if cut <= start:
            nxt = start + size
            while True:  # no cut inside the window: the next one after it
                cut = text.find("\n", nxt)
                if cut == -1 or (not text[cut - 1].isspace() and cut + 1 < len(text) and not text[cut + 1].isspace()):
                    break
                nxt = cut + 1
            if cut == -1:
                break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def load_tokenizer(folder: Optional[Path]) -> ByteTokenizer | HFTokenizer:
    """The byte tokenizer (None), or the Hugging Face tokenizer in `folder`, which must name the EOS token that
    ends each document (without one, documents would run together in the corpus)."""
    if folder is None:
        return ByteTokenizer()
    if not folder.is_dir():
        raise DataError(f"--tokenizer {folder} is not a folder: give a Hugging Face tokenizer folder")
    tokenizer = HFTokenizer(folder)
    if tokenizer.eos_id is None:
        raise DataError(f"the tokenizer in {folder} names no eos_token (in tokenizer_config.json or "
                        f"special_tokens_map.json), so nothing would separate one document from the next: add "
                        f'"eos_token": "<its end-of-text token>" to {folder / "tokenizer_config.json"}')
    return tokenizer


def hf_tokenizer_record(folder: Path) -> Optional[dict[str, Any]]:
    """The record of the tokenizer an HF model folder carries (None: it carries no tokenizer.json)."""
    if not (folder / "tokenizer.json").is_file():
        return None
    return {**tokenizer_record(folder), "dir": str(folder.resolve())}


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The tokenizer files of `src` into `dst` (created)."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
