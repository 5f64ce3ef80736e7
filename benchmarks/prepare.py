"""Tokenizing throughput of `moeyard prepare`, side by side with the ways users tokenize pretraining data.

One JSONL file (the Python standard library's .py files as documents, repeated to --mb megabytes), one
byte-level BPE tokenizer (trained here with `tokenizers`, saved as transformers saves it), one worker
count, run alternately --repeat times, best wall time of each:

- moeyard: `moeyard prepare data.jsonl --tokenizer T --workers N` (a process, as a user runs it);
- datasets: `load_dataset("json")` then `map(tokenizer, batched=True, num_proc=N)` with AutoTokenizer;
- Megatron-LM: `tools/preprocess_data.py --workers N --append-eod` when --megatron names a checkout
  (with --megatron-python, an interpreter that can import it).

Each tool's wall time is its whole process (start-up, reading, tokenizing, writing); tokens/s counts
the tokens it wrote. Usage:

    python benchmarks/prepare.py --mb 40 --workers 2 [--megatron DIR --megatron-python PY] \
        [--report benchmarks/results/prepare.md]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

DATASETS_SNIPPET = """
import sys, time
from datasets import Features, Sequence, Value, load_dataset
from transformers import AutoTokenizer
data, tok_dir, cache, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(tok_dir)
ds = load_dataset("json", data_files=data, split="train", cache_dir=cache)
out = ds.map(lambda b: {"input_ids": tok(b["text"])["input_ids"]}, batched=True, num_proc=workers,
             remove_columns=ds.column_names, features=Features({"input_ids": Sequence(Value("int32"))}))
print(sum(len(x) for x in out["input_ids"]))
"""


def write_jsonl(path: Path, megabytes: float) -> int:
    """Standard-library source files as {"text": ...} lines until `megabytes`; returns the documents."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    budget, documents = int(megabytes * 2**20), 0
    with open(path, "w", encoding="utf-8") as f:
        while budget > 0:
            for file in files:
                try:
                    text = file.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if not text.strip():
                    continue
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                budget -= len(line)
                documents += 1
                if budget <= 0:
                    break
    return documents


def train_tokenizer(folder: Path, sample: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(sample, encoding="utf-8") as f:
        for line, _ in zip(f, range(2000)):
            texts.append(json.loads(line)["text"])
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def timed(cmd: list[str], **kwargs) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def run_moeyard(data: Path, tok: Path, workers: int, work: Path) -> tuple[float, int]:
    out = work / "moeyard"
    shutil.rmtree(out, ignore_errors=True)
    wall, _ = timed([sys.executable, "-m", "moeyard", "prepare", str(data), "--out", str(out), "--tokenizer",
                     str(tok), "--workers", str(workers)])
    return wall, json.loads((out / "meta.json").read_text())["tokens"]


def run_datasets(data: Path, tok: Path, workers: int, work: Path) -> tuple[float, int]:
    cache = work / "hf-cache"
    shutil.rmtree(cache, ignore_errors=True)
    wall, out = timed([sys.executable, "-c", DATASETS_SNIPPET, str(data), str(tok), str(cache), str(workers)],
                      env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    return wall, int(out.strip().splitlines()[-1])


def run_megatron(data: Path, tok: Path, workers: int, work: Path, checkout: Path, python: str) -> tuple[float, int]:
    prefix = work / "megatron" / "data"
    shutil.rmtree(prefix.parent, ignore_errors=True)
    prefix.parent.mkdir(parents=True)
    wall, _ = timed([python, str(checkout / "tools" / "preprocess_data.py"), "--input", str(data), "--output-prefix",
                     str(prefix), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok),
                     "--workers", str(workers), "--append-eod"], cwd=checkout)
    (bin_file,) = prefix.parent.glob("*.bin")
    return wall, bin_file.stat().st_size // 2  # uint16 tokens below a 65,500 vocabulary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--megatron", type=Path, default=None, help="a Megatron-LM checkout")
    parser.add_argument("--megatron-python", default=sys.executable)
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moeyard-prepare-bench-"))
    try:
        data = work / "data.jsonl"
        documents = write_jsonl(data, args.mb)
        tok = train_tokenizer(work / "tokenizer", data, args.vocab)
        tools = {"moeyard prepare": lambda: run_moeyard(data, tok, args.workers, work),
                 "datasets map": lambda: run_datasets(data, tok, args.workers, work)}
        if args.megatron is not None:
            tools["Megatron-LM preprocess_data.py"] = lambda: run_megatron(data, tok, args.workers, work,
                                                                           args.megatron, args.megatron_python)
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeat):  # alternate, so a slow moment of the machine hits every tool alike
            for name, run in tools.items():
                wall, tokens = run()
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, tokens)
        ours = best["moeyard prepare"][1] / best["moeyard prepare"][0]
        size = data.stat().st_size / 2**20
        lines = [f"JSONL of {size:.1f} MiB ({documents:,} documents), byte-level BPE of {args.vocab:,} tokens, "
                 f"{args.workers} workers, best of {args.repeat}, {os.cpu_count()} CPUs", "",
                 "| tool | wall s | tokens | tokens/s | MiB/s | moeyard / tool |", "|---|---|---|---|---|---|"]
        for name, (wall, tokens) in best.items():
            rate = tokens / wall
            lines.append(f"| {name} | {wall:.1f} | {tokens:,} | {rate:,.0f} | {size / wall:.1f} | {ours / rate:.2f}x |")
        report = "\n".join(lines) + "\n"
        print(report)
        if args.report is not None:
            args.report.write_text(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
