"""The architecture's contracts (../shared/ARCHITECTURE.md): dependencies run service -> models -> kernels; every
reward declares itself and is discovered without a list; the matching variants and the profiles each have one
source that HTTP, the CLI and Python read the same way."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rewardscope.models.detection.detector import OnnxDetector
from rewardscope.models.profiles import PROFILES
from rewardscope.models.registry import RewardDeclaration, declaration, declarations, matching_variants
from rewardscope.service.engine import RewardEngine
from rewardscope.service.schemas import MatchItem
from rewardscope.service.settings import ServiceSettings
from rewardscope.service.tools import cli

from rewardscope import Scorer, list_rewards

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against its package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module or "")
    return names


def package_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("rewardscope", *parts[:-1]))


@pytest.mark.parametrize(
    "folder, forbidden",
    [("models", ("rewardscope.service",)), ("kernels", ("rewardscope.service", "rewardscope.models"))],
)
def test_dependencies_run_one_way(folder, forbidden):
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / folder).rglob("*.py")
        for name in imported_modules(path, package_of(path))
        if name.startswith(forbidden)
    }
    assert offenders == set()


def test_every_registered_reward_declares_itself():
    declared = declarations()
    assert set(declared) == set(list_rewards())
    for name, entry in declared.items():
        assert isinstance(entry, RewardDeclaration) and entry.name == name
        assert entry.summary and entry.scale and entry.direction == "higher is better"
        low, high = entry.range
        assert low is None or high is None or low < high, name
    # what the gradient path, the profiles and the detector option read, per reward
    assert {name for name, entry in declared.items() if entry.differentiable} == {
        "matching",
        "clip",
        "pickscore",
        "aesthetic",
    }
    assert {name for name, entry in declared.items() if entry.uses_detector} == {
        "matching",
        "matching_soft",
        "geneval",
        "numeracy",
        "layout",
        "plausibility",
    }


def cli_option(command: str, option: str) -> argparse.Action:
    (commands,) = [action for action in cli.build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    (found,) = [action for action in commands.choices[command]._actions if option in action.option_strings]
    return found


def test_the_matching_variants_have_one_source_read_by_schema_cli_and_engine():
    variants = list(matching_variants())
    assert variants == ["seed", "soft", "geneval", "numeracy", "layout"]
    assert MatchItem.model_json_schema()["properties"]["variant"]["enum"] == variants
    assert list(cli_option("score", "--variant").choices) == variants
    for variant, name in matching_variants().items():  # each variant is a registered reward of the family
        assert declaration(name).variant == variant
    sources = "".join(path.read_text() for path in (ROOT / "client" / "rewardscope_client").glob("*.py"))
    assert '"numeracy"' not in sources  # the client keeps no copy: the server's schema answers 400 with the list


def test_http_cli_and_python_resolve_a_profile_to_the_same_settings():
    for profile in PROFILES:
        python = Scorer(["matching", "geneval"], profile=profile).describe()
        from_cli = cli.build_scorer({"matching": 1.0, "geneval": 1.0}, profile=profile).describe()
        http = RewardEngine(ServiceSettings(rewards=["matching", "geneval"])).scorer(
            {"matching": 1.0, "geneval": 1.0}, profile
        )
        for name in ("matching", "geneval"):
            expected = PROFILES[profile].for_reward(name)
            assert set(expected) <= set(declaration(name).profile_keys)
            if "iou_threshold" in expected and expected["iou_threshold"] is None:
                expected["iou_threshold"] = OnnxDetector.nms_iou  # None: the detector's own NMS only
            for described in (python, from_cli, http.describe()):
                params = described[name]["params"]
                assert {key: params[key] for key in expected} == expected, (profile, name)
    assert (
        Scorer(["matching"], profile="geneval", config={"matching": {"conf_threshold": 0.5}}).describe()["matching"][
            "params"
        ]["conf_threshold"]
        == 0.5
    )  # explicit config wins over the profile


THROWAWAY = '''
"""A reward living in another distribution, registered through the rewardscope.rewards entry point."""
from rewardscope.models.registry import RewardDeclaration, list_rewards, register_reward
from rewardscope.models.types import RewardOutput

# A plugin may ask the registry while the registry is importing it: no deadlock, the rewards found so far.
KNOWN_AT_IMPORT = list_rewards()


@register_reward(RewardDeclaration("throwaway", "fraction of red in the image", (0.0, 1.0), "mean red channel / 255"))
class Throwaway:
    name, version = "throwaway", "throwaway-1"

    def __init__(self, **config):
        pass

    def score(self, samples):
        return [RewardOutput(sum(p[0] for p in s.image.getdata()) / 255 / (s.image.width * s.image.height))
                for s in samples]

    def describe(self):
        return {"name": self.name, "version": self.version}
'''

PROBE = """
import json, sys
from rewardscope import list_rewards
from starlette.testclient import TestClient
from rewardscope.service.app import RewardService

with TestClient(RewardService.to_asgi()) as client:
    described = client.get("/rewards").json()["rewards"]
print(json.dumps({"listed": "throwaway" in list_rewards(), "described": described.get("throwaway")}))
"""


def test_a_new_reward_is_discovered_without_editing_a_list(tmp_path, bus_path):
    (tmp_path / "throwaway_reward.py").write_text(textwrap.dedent(THROWAWAY))
    dist = tmp_path / "throwaway_reward-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-reward\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rewardscope.rewards]\nthrowaway = throwaway_reward\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "REWARDSCOPE_REWARDS": "matching,throwaway",
        "REWARDSCOPE_GOLDEN_CHECK": "false",
    }
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["listed"]
    assert found["described"]["summary"] == "fraction of red in the image" and found["described"]["range"] == [0, 1]
    command = [sys.executable, "-m", "rewardscope.service.tools.cli", "score", str(bus_path), "--prompt", "a bus"]
    scored = subprocess.run([*command, "--rewards", "throwaway"], env=env, capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr[-3000:]
    value = json.loads(scored.stdout.strip().splitlines()[-1])["rewards"]["throwaway"]
    assert 0 < value < 1


def test_a_reward_takes_a_detector_by_registered_name_path_or_object(bus_path, embedded_onnx):
    from rewardscope.models.detection.detector import Detector
    from rewardscope.models.detection.torch_detector import TorchDetector

    twin = TorchDetector.embedded()
    scored = {}
    for option in ("embedded", str(embedded_onnx), twin):
        scorer = Scorer(["matching"], config={"matching": {"detector": option}})
        detector = scorer.rewards["matching"].detector
        assert isinstance(detector, Detector) and detector.version == twin.version
        assert detector.torch_twin() is twin  # the gradient path asks the detector for its differentiable twin
        (result,) = scorer.score([bus_path], ["four people and a bus"])
        scored[type(detector).__name__] = result.rewards["matching"]
    assert set(scored) == {"OnnxDetector", "TorchDetector"}
    assert scored["TorchDetector"] == pytest.approx(scored["OnnxDetector"], abs=0.02)
    with pytest.raises(TypeError, match="Detector"):
        Scorer(["matching"], config={"matching": {"detector": 42}})


def test_the_offline_tools_never_import_the_http_app():
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / "service" / "tools").rglob("*.py")
        for name in imported_modules(path, package_of(path))
        if name.startswith(("rewardscope.service.app", "bentoml"))
    }
    assert offenders == set()
