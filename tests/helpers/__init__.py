"""Helpers shared by the tests: runs of the CLI, real multi-process groups, the bodies of multi-process tests
(`*_cases.py`, importable by spawned workers), a real Slurm, Hugging Face fixtures."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
