"""Byte-level tokenizer: every byte is a token, plus an end-of-text token. Needs no download."""
from __future__ import annotations


class ByteTokenizer:
    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, data: bytes | str) -> list[int]:
        return list(data.encode("utf-8") if isinstance(data, str) else data)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
