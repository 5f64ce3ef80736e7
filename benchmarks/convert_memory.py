"""Peak memory of `moeyard convert from-hf` and `to-hf` on a ~2 GB random Hugging Face Mixtral.

    python benchmarks/convert_memory.py      # writes benchmarks/results/convert_memory.md

The model is made by transformers (random weights, float32, save_pretrained) in a process of its own.
Each conversion then runs in a fresh process that imports moeyard, reads its resident set (the
baseline: the interpreter, torch, moeyard), runs the conversion and reads its peak resident set; the
difference is what converting took. The streaming conversion holds one tensor at a time, so the
difference should stay near the largest tensor (one layer's stacked experts), not the model.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "convert_memory.md"
MIXTRAL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=5, num_attention_heads=16,
               num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)

MAKE = """
import json, sys, torch
from transformers import MixtralConfig, MixtralForCausalLM
torch.manual_seed(0)
model = MixtralForCausalLM(MixtralConfig(**json.loads(sys.argv[2]))).float()
model.save_pretrained(sys.argv[1], safe_serialization=True)
print(sum(p.numel() for p in model.parameters()))
"""

MEASURE = """
import sys, time
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

from moeyard.tools.hf_convert import export_hf, import_hf
base = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
start = time.perf_counter()
if sys.argv[1] == "from-hf":
    import_hf(Path(sys.argv[2]), Path(sys.argv[3]))
else:
    export_hf(Path(sys.argv[2]), Path(sys.argv[3]))
print(base, status("VmHWM") - base, time.perf_counter() - start)
"""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(action: str, source: Path, out: Path) -> tuple[int, int, float]:
    done = subprocess.run([sys.executable, "-c", MEASURE, action, str(source), str(out)], capture_output=True,
                          text=True, check=True)
    base, peak, seconds = done.stdout.split()[-3:]
    return int(base), int(peak), float(seconds)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        made = subprocess.run([sys.executable, "-c", MAKE, str(root / "hf"), json.dumps(MIXTRAL)],
                              capture_output=True, text=True, check=True)
        params = int(made.stdout.split()[-1])
        largest = MIXTRAL["num_local_experts"] * MIXTRAL["hidden_size"] * MIXTRAL["intermediate_size"] * 4
        rows = []
        for action, source, out in (("from-hf", root / "hf", root / "ckpt"), ("to-hf", root / "ckpt", root / "back")):
            base, peak, seconds = measure(action, source, out)
            rows.append(f"| {action} | {folder_bytes(source) / 1e9:.2f} GB | {base / 1e9:.2f} GB | "
                        f"{peak / 1e9:.3f} GB | {peak / largest:.2f} | {seconds:.1f} s |")
    table = "\n".join([
        f"`python benchmarks/convert_memory.py`, {time.strftime('%Y-%m-%d')}: a random Mixtral of "
        f"{params / 1e6:.0f}M parameters (float32), its largest tensor one layer's stacked experts "
        f"({largest / 1e9:.3f} GB).", "",
        "| conversion | input on disk | baseline (interpreter, torch, moeyard) | peak above baseline | "
        "peak / largest tensor | time |", "|---|---|---|---|---|---|", *rows])
    print(table)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(table + "\n")


if __name__ == "__main__":
    main()
