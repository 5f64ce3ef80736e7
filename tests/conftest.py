"""Shared fixtures and the test tiers.

The tests folder is put on sys.path so that tests and spawned workers import `helpers`. Tests mirror the
code: tests/unit/<package>/ (one process, no process group), tests/distributed/ (real gloo groups of 2-4
processes, marker `distributed`), tests/e2e/ (whole runs: the CLI, launchers, many training steps; marker
`e2e`). `pytest -m "not e2e"` is the fast tier.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


TIER_ORDER = ("e2e", "distributed")
"""Slow tiers first: the two xdist workers start the long runs early and end on short unit tests."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by the tier its folder names, and run the slower tiers first."""
    def tier(item: pytest.Item) -> str:
        return Path(str(item.path)).relative_to(TESTS).parts[0]

    for item in items:
        if tier(item) in TIER_ORDER:
            item.add_marker(getattr(pytest.mark, tier(item)))
    items.sort(key=lambda item: TIER_ORDER.index(tier(item)) if tier(item) in TIER_ORDER else len(TIER_ORDER))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A prepared corpus from one stdlib package (json + email: ~0.5 MB), shared by the session."""
    from moeyard.trainer.data.tokens import prepare_folder, stdlib_dir

    src = tmp_path_factory.mktemp("corpus_src")
    for package in ("json", "email"):
        for path in sorted((stdlib_dir() / package).rglob("*.py")):
            target = src / package / path.relative_to(stdlib_dir() / package)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    out = tmp_path_factory.mktemp("corpus") / "tokens"
    prepare_folder(src, out, "*.py")
    return out


@pytest.fixture(scope="session")
def launch_reference(tmp_path_factory, small_corpus):
    """(config, losses) of a 6-step ep=2 run on 2 local processes: what every other launcher must reproduce."""
    from helpers.runs import moeyard_train, read_metrics, write_config

    root = tmp_path_factory.mktemp("launch_reference")
    config = write_config(root / "c.yaml", small_corpus, parallel={"ep": 2})
    moeyard_train(config, root / "run", 2)
    return config, [m["loss"] for m in read_metrics(root / "run")]
