"""The layer check (scripts/check_layers.py, run by .ci/run) holds on the tree and catches injected violations."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_layers.py"
spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
check_layers = importlib.util.module_from_spec(spec)
sys.modules["check_layers"] = check_layers  # dataclasses look their module up
spec.loader.exec_module(check_layers)


def test_the_tree_keeps_its_layers():
    assert [str(v) for v in check_layers.check(REPO)] == []


@pytest.fixture()
def tree(tmp_path):
    """A copy of the package folders, to inject violations into."""
    for folder in ("kernels", "tools", "rewards", "rollouts", "align"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize("file, line, expected", [
    ("tools/calculator.py", "from align.config import GRPOConfig", "align.tools must not import align.config"),
    ("tools/sandbox.py", "    from align import rewards", "align.tools must not import align.rewards"),
    ("kernels/sampling.py", "import transformers", "align.kernels must not import transformers"),
    ("kernels/logprobs.py", "from align.rollouts import RolloutEngine", "align.kernels must not import align.rollouts"),
    ("rollouts/engine.py", "from align.rewards import get_reward", "align.rollouts must not import align.rewards"),
    ("rewards/mixture.py", "from align.trainer.loop import Trainer", "align.rewards must not import align.trainer.loop"),
    ("align/algos/losses.py", "import numpy", "align.algos must not import numpy"),
    ("align/errors.py", "import yaml", "align.errors must not import yaml"),
    ("rewards/base.py", "import tools.sandbox", "align.rewards must not import tools.sandbox (the top-level name"),
])
def test_an_injected_violation_is_reported(tree, file, line, expected):
    path = tree / file
    path.write_text(path.read_text() + f"\n\ndef _injected():\n    {line.strip()}\n")
    found = [str(v) for v in check_layers.check(tree)]
    assert len(found) == 1 and expected in found[0], found
    done = subprocess.run([sys.executable, str(SCRIPT), str(tree)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and expected in done.stdout


def test_allowed_directions_pass(tree):
    for file, line in [("rewards/themis.py", "from align.tools import get_tool"),
                       ("rollouts/engine.py", "from align.kernels import sample"),
                       ("tools/base.py", "from align.errors import UserError")]:
        path = tree / file
        path.write_text(path.read_text() + f"\n\ndef _allowed():\n    {line}\n")
    assert check_layers.check(tree) == []
