"""Hugging Face tokenizers built offline for the data tests, and the same documents in every source format."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

DOCUMENTS = ["def f(x):\n    return x + 1\n", "Grüße aus Köln — ünïcödé ✓\n", "", "a" * 700, "class A:\n    pass\n",
             "line one\nline two\n\n\nlast"]
"""Empty, long, multi-line and non-ASCII documents."""


def train_bpe(folder: Path, texts: list[str], vocab_size: int = 400, bos: bool = False) -> Path:
    """A byte-level BPE tokenizer trained with `tokenizers` on `texts`, saved as transformers does; EOS is
    <|endoftext|>; with `bos` its post-processor puts <|bos|> before each document (as Llama-3's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|bos|>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        bos_token="<|bos|>" if bos else None)
    tokenizer.save_pretrained(str(folder))
    return folder


def word_level(folder: Path, words: int) -> Path:
    """A word-level tokenizer of `words` entries w0, w1, ... (more than 65,536 needs uint32 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(words - 2)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>").save_pretrained(str(folder))
    return folder


def write_every_format(root: Path, documents: list[str]) -> dict[str, Path]:
    """The documents as a folder of .txt files, JSONL, JSONL.gz, Parquet and a save_to_disk dataset."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "folder"
    folder.mkdir(parents=True)
    for i, doc in enumerate(documents):
        (folder / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    lines = "".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(documents))
    (root / "docs.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(root / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    pq.write_table(pa.table({"id": list(range(len(documents))), "text": documents}), root / "docs.parquet",
                   row_group_size=2)
    datasets.Dataset.from_dict({"text": documents}).save_to_disk(str(root / "arrow"))
    return {"folder": folder, "jsonl": root / "docs.jsonl", "jsonl.gz": root / "docs.jsonl.gz",
            "parquet": root / "docs.parquet", "arrow": root / "arrow"}
