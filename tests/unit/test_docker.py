"""The Dockerfile's structure, checked by reading it: no Docker engine runs in CI."""
from __future__ import annotations

import json
import re

import pytest
from helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_base_image_is_pinned_to_a_release() -> None:
    bases = [args for word, args in instructions() if word == "FROM"]
    assert len(bases) == 1, bases
    image = bases[0].split()[0]
    name, _, tag = image.partition(":")
    assert "@sha256:" in image or re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+.*", tag), \
        f"base image {image} must name an exact release (or a digest), never latest"
    assert "cuda" in tag and name == "pytorch/pytorch"


def test_installs_through_the_pyproject_extras_only() -> None:
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = [args for word, args in instructions() if word == "RUN" and "pip install" in args]
    assert len(installs) == 1, installs
    match = re.search(r'pip install "?/opt/moeyard\[([a-z,]+)\]"?', installs[0])
    assert match, f"the image must pip install the package with its extras, not a list: {installs[0]}"
    assert set(match.group(1).split(",")) <= extras
    assert "requirements" not in DOCKERFILE.read_text()
    test_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    tested = {e for entry in test_extra for group in re.findall(r"moeyard\[([a-z,]+)\]", entry)
              for e in group.split(",")}
    assert set(match.group(1).split(",")) <= tested, "CI (the test extra) must install the extras the image installs"


def test_copies_every_package_folder_that_pyproject_maps() -> None:
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {args.split()[0] for word, args in instructions() if word == "COPY"}
    for folder in set(package_dir.values()):
        assert folder in copied, f"docker/Dockerfile does not COPY {folder}/, which pyproject maps into moeyard"
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"


def test_runs_as_a_non_root_user_with_moeyard_as_entrypoint() -> None:
    steps = instructions()
    users = [i for i, (word, _) in enumerate(steps) if word == "USER"]
    assert users, "no USER: the image would train as root"
    user = steps[users[-1]][1]
    assert user not in ("root", "0", "0:0")
    assert all(word != "RUN" for word, _ in steps[users[-1]:]), "nothing may run as root after USER"
    entrypoints = [args for word, args in steps if word == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints] == [["moeyard"]]


def test_readme_gives_build_single_node_and_slurm_commands() -> None:
    readme = (REPO / "docker" / "README.md").read_text()
    for command in ("docker build -f docker/Dockerfile", "docker run", "--container-image", "apptainer", "enroot"):
        assert command in readme, f"docker/README.md lacks {command}"
