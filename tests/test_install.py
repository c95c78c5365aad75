"""The installed distribution: one import package (rewardscope) that never shadows Hugging Face's `kernels`, and a
venv that is what the lock files say.

transformers >= 5.25 imports Hugging Face's `kernels` package (transformers/integrations/hub_kernels.py); a
top-level `kernels` of ours on sys.path used to win and broke every transformers processor import."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
CARD_FOLDERS = ("service", "models", "kernels")

# Run in a fresh interpreter (the test process has already imported everything): prints what it found as JSON.
PROBE = """
import importlib.metadata, importlib.util, json, os, sys
import kernels
hf_kernels = importlib.metadata.distribution("kernels")
hf_kernels_dir = os.path.realpath(hf_kernels.locate_file("kernels"))
import transformers.integrations.hub_kernels  # the module that imports Hugging Face's kernels
from transformers import AutoProcessor, CLIPModel
import rewardscope
from rewardscope import Scorer, create_reward, list_rewards
from rewardscope.kernels.ops import box_match
print(json.dumps({
    "kernels_file": os.path.realpath(kernels.__file__),
    "hf_kernels_dir": hf_kernels_dir,
    "scorer_module": Scorer.__module__,
    "rewards": list_rewards(),
    "box_match_module": box_match.__module__,
    "top_level": {name: importlib.util.find_spec(name) is not None for name in ("models", "service")},
}))
"""


def probe(cwd: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["repo-root", "temp-dir"])
def test_hugging_face_kernels_and_rewardscope_import_side_by_side(where, tmp_path):
    found = probe(ROOT if where == "repo-root" else tmp_path)
    assert found["kernels_file"].startswith(found["hf_kernels_dir"] + os.sep)
    assert found["scorer_module"] == "rewardscope.models.scorer"
    assert found["box_match_module"] == "rewardscope.kernels.ops"
    assert "matching" in found["rewards"]
    if where == "temp-dir":  # from the repo root the card's folders are plain folders of the working directory
        assert found["top_level"] == {"models": False, "service": False}


def test_the_card_folders_never_become_top_level_packages():
    # A folder with __init__.py on sys.path is a regular package and beats an installed one of the same name.
    for folder in CARD_FOLDERS:
        assert not list((ROOT / folder).rglob("__init__.py")), folder
    assert sorted(path.name for path in (ROOT / "rewardscope").iterdir() if path.name != "__pycache__") == [
        "__init__.py"
    ]


def test_the_wheel_installs_exactly_one_import_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("rewardscope-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"rewardscope", wheel.name.split("-py3")[0] + ".dist-info"}
    # every module of the card's folders is in it, under rewardscope/
    for folder in CARD_FOLDERS:
        for module in (ROOT / folder).rglob("*.py"):
            assert f"rewardscope/{module.relative_to(ROOT).as_posix()}" in names
    assert "rewardscope/service/golden/expectations.json" in names
    assert "rewardscope/models/prompt_words.json" in names  # the prompt parser's word lists


def test_version_changelog_and_entry_points_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    import rewardscope

    assert rewardscope.__version__ == project["version"] == importlib.metadata.version("rewardscope")
    assert f"## {project['version']}" in (ROOT / "CHANGELOG.md").read_text()
    assert project["scripts"]["rewardscope"] == "rewardscope.service.tools.cli:main"
    assert "service: rewardscope.service.app:RewardService" in (ROOT / "bentofile.yaml").read_text()


def read_lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
        else:
            assert not line.strip() or line.lstrip().startswith("#"), f"{name}: unpinned line {line!r}"
    return pins


def test_the_locks_pin_torch_and_agree_with_each_other():
    dev, runtime = read_lock("requirements-dev.lock"), read_lock("requirements.lock")
    assert dev["torch"] == runtime["torch"] == "2.14.1" and dev["torchvision"] == "0.29.1"
    assert "kernels" in runtime and "transformers" in runtime
    # the Bento runs what CI tested: every runtime pin is the development environment's version
    assert {name: dev.get(name) for name in runtime} == runtime


@pytest.mark.skipif(bool(os.environ.get("REWARDSCOPE_UNLOCKED")), reason="make test-latest: newest versions")
def test_the_venv_is_what_the_lock_says():
    differences = {}
    for name, version in read_lock("requirements-dev.lock").items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differences[name] = (version, installed)
    assert differences == {}, "run `make venv` (locked, installed)"
