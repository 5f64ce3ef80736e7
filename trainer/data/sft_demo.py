"""The embedded SFT demo task, built from this Python's standard library: given a function's name,
docstring and body, write its `def` line (the parameters are to be inferred from the body; guessing the
name from the docstring alone was beyond the tiny model: 0.5% held-out exact match after tuning).

Deterministic (sorted files, source order) and cached as JSONL, so every rank and every run sees the same
conversations. Small functions only, so that prompt and answer fit the tiny model's 256-token rows.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Iterator

from moeyard.trainer.data.tokens import default_cache_root, stdlib_dir

DEMO = "python-stdlib-defs"
INSTRUCTION = "\nWrite the def line of {name}:"  # after the body: the name sits next to the answer
MAX_PROMPT_CHARS, MAX_DEF_CHARS = 140, 60  # with the markers and a name of up to 30 bytes, < 257 tokens


def _examples(path: Path) -> Iterator[dict[str, str]]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or ast.get_docstring(node) is None or node.decorator_list:
            continue
        first_body = node.body[0].lineno - 1
        def_lines = lines[node.lineno - 1:first_body]
        if len(def_lines) != 1:  # a signature over several lines
            continue
        definition = def_lines[0].strip()
        body = textwrap.dedent("\n".join(lines[first_body:node.end_lineno])).strip()
        if len(definition) <= MAX_DEF_CHARS and len(body) <= MAX_PROMPT_CHARS and definition.endswith(":") \
                and len(node.name) <= 30:
            yield {"prompt": body + INSTRUCTION.format(name=node.name), "completion": definition}


def stdlib_def_conversations() -> Path:
    """The cached JSONL file of the demo task (written once per machine and Python version)."""
    version = ".".join(map(str, sys.version_info[:3]))
    out = default_cache_root() / "sft" / f"{DEMO}-v3-{version}.jsonl"
    if out.is_file():
        return out
    root = stdlib_dir()
    records = [r for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts for r in _examples(p)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out)  # ranks racing here write the same bytes; the rename is atomic
    return out
