"""One import name: the distribution installs only `align`; foreign top-level `kernels` / `tools` / `rewards` /
`rollouts` packages (PyPI has all four; Hugging Face's `kernels` is common on GPU boxes) change nothing."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
FOREIGN = ("kernels", "tools", "rewards", "rollouts")


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# the real one of a name is the foreign package where it is installed (transformers >= 5.25 depends on Hugging
# Face's `kernels` and imports it): only the others are faked, since a fake would break what imports the real one
FAKED = tuple(name for name in FOREIGN if not _installed(name))
SUBPACKAGE_ROOTS = {"align": "align", "align.kernels": "kernels", "align.tools": "tools", "align.rewards": "rewards",
                    "align.rollouts": "rollouts"}


def _foreign_site(tmp_path: Path, names: tuple[str, ...] = FAKED) -> Path:
    """Packages named like ours, as `pip install kernels tools ...` would put them first on sys.path. Each one
    logs that it was imported and offers none of our names."""
    site = tmp_path / "foreign-site"
    site.mkdir(parents=True)
    for name in names:
        pkg = site / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(
            "import os, traceback\n"
            "frames = [f.filename for f in traceback.extract_stack()[:-1]\n"
            "          if not f.filename.startswith('<frozen') and not f.filename.endswith('importlib/__init__.py')]\n"
            f"open(os.environ['FOREIGN_LOG'], 'a').write({name!r} + ' ' + frames[-1] + '\\n')\n"
            "__version__ = '99.0'\n")
    return site


def _run_outside_repo(tmp_path: Path, argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    site = _foreign_site(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site), "FOREIGN_LOG": str(tmp_path / "foreign.log"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


CHECK_OURS = r"""
import json, os, sys
repo = sys.argv[1]
import kernels, tools, rewards, rollouts           # the foreign ones: first on sys.path (or installed)
for foreign in (kernels, tools, rewards, rollouts):
    assert not hasattr(foreign, "sample") and not foreign.__file__.startswith(os.path.join(repo, foreign.__name__, "")), foreign.__file__
from align import tools as our_tools
assert our_tools.calculate("2*(3+4)") == "14", our_tools.calculate("2*(3+4)")
res = our_tools.run_code("def f(x):\n    return x + 1\n", ["assert f(1) == 2", "assert f(2) == 4"], timeout_s=20)
assert (res.status, res.passed, res.failed) == ("failed", 1, 1), res
from align.rewards.verifiers import MathVerify        # its sympy checker child starts isolated
checker = MathVerify(timeout_s=60)
assert checker.score([""], [r"\boxed{(x+1)^2}"], label=["x^2+2x+1"]).scores == [1.0]
checker.close()
import torch
from align import kernels as our_kernels
tok, logp = our_kernels.sample(torch.tensor([[0.0, 5.0, -1.0]]), temperature=1e-4)
assert tok.tolist() == [1], tok
ours = {n: m.__file__ for n, m in sys.modules.items() if n.startswith("align") and getattr(m, "__file__", None)}
assert all(f.startswith(repo) for f in ours.values()), ours
print(json.dumps({"isolation": res.isolation, "n_align_modules": len(ours)}))
"""


def test_foreign_top_level_packages_do_not_shadow_ours(tmp_path):
    done = _run_outside_repo(tmp_path, [sys.executable, "-c", CHECK_OURS, str(REPO)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["n_align_modules"] > 10
    # the foreign packages were importable (the check imported them itself) ...
    log = tmp_path / "foreign.log"
    imported = sorted(line.split()[0] for line in log.read_text().splitlines()) if log.exists() else []
    assert imported == sorted(FAKED)


def test_demo_training_step_works_beside_foreign_packages(tmp_path):
    out = tmp_path / "demo"
    done = _run_outside_repo(tmp_path, [sys.executable, str(REPO / "examples" / "demo.py"), "--out", str(out),
                                        "--steps", "2", "--sft-steps", "2", "--prompts-per-step", "4"])
    # exit 1 = "the reward did not rise", expected of two steps; a crash would leave a traceback
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stdout[-2000:] + done.stderr[-3000:]
    assert "reward (exact-answer accuracy" in done.stdout
    assert (out / "grpo" / "metrics.jsonl").is_file()
    # ... and nothing of ours imported them (transformers imports `kernels`: before 5.25 to read its version,
    # its hub-kernels probe then finding no `kernels` distribution; from 5.25 the installed real one)
    log = tmp_path / "foreign.log"
    importers = [line.split(" ", 1) for line in log.read_text().splitlines()] if log.exists() else []
    ours = tuple(str(REPO / folder) + os.sep for folder in (*SUBPACKAGE_ROOTS.values(), "examples"))
    assert not [(name, who) for name, who in importers if who.startswith(ours)], importers


BARE_IMPORTS = r"""
import json, sys
found = {}
for name in sys.argv[1:]:
    module = __import__(name)
    try:
        found[name] = module.__file__
    except AttributeError as e:  # the placeholder for a name not installed
        found[name] = "AttributeError: " + str(e)
        assert getattr(module, "__version__", "N/A") == "N/A" and not hasattr(module, "sample")
print(json.dumps(found))
"""


def _bare_imports_in_the_checkout(env: dict) -> dict:
    """`import kernels` & co. in a process started at the repo root, where the cwd (our folders) comes first on
    sys.path: what `python -m align.cli` and `torchrun` from a checkout see, and transformers >= 5.25 imports
    Hugging Face's `kernels` there."""
    done = subprocess.run([sys.executable, "-c", BARE_IMPORTS, *FOREIGN], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_bare_import_in_the_checkout_gets_the_installed_package_not_our_folder(tmp_path):
    site = _foreign_site(tmp_path, FOREIGN)
    env = {**os.environ, "PYTHONPATH": str(site), "FOREIGN_LOG": str(tmp_path / "foreign.log")}
    found = _bare_imports_in_the_checkout(env)
    assert found == {name: str(site / name / "__init__.py") for name in FOREIGN}, found


def test_a_bare_import_in_the_checkout_of_a_name_not_installed_is_an_empty_placeholder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = _bare_imports_in_the_checkout(env)
    for name in FOREIGN:
        if _installed(name):  # Hugging Face's kernels beside transformers >= 5.25: the installed one, never ours
            assert not found[name].startswith(str(REPO / name)), found[name]
        else:
            assert found[name].startswith("AttributeError: ") and f"`from align import {name}`" in found[name], found
    # transformers imports its hub-kernels integration without error: it probes `kernels` (its __version__ and
    # __file__), and imports it where installed
    done = subprocess.run([sys.executable, "-c", "import transformers.activations"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_importing_the_light_subpackages_loads_no_torch():
    code = ("import sys, align, align.tools, align.rewards, align.errors; import align.tools.calc_eval; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))[:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_distribution_installs_only_the_align_name():
    dist = importlib.metadata.distribution("align")
    assert dist.version == "0.2.0"
    assert dist.read_text("top_level.txt").split() == ["align"]


def test_every_package_folder_is_listed_in_pyproject():
    """A new sub-package folder that pyproject does not list would be missing from a wheel (editable installs
    still find it, so nothing else would notice)."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == SUBPACKAGE_ROOTS
    found = set()
    for name, folder in SUBPACKAGE_ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    assert sorted(setup["packages"]) == sorted(found)


@pytest.mark.parametrize("name", FOREIGN)
def test_isolated_children_cannot_import_a_top_level_copy_of_ours(name):
    """The calculator worker / sympy checker start isolated: run from the repo root, where `tools/` & co. sit,
    a top-level `tools` still does not resolve (and `align.tools` does)."""
    from align.tools._child import python_argv

    # an installed foreign package of the name may resolve (Hugging Face's `kernels`), never the repo's folder
    code = (f"import importlib.util as u; s = u.find_spec({name!r}); "
            f"assert s is None or not (s.origin or '').startswith({str(REPO / name)!r}), s; import align.{name}")
    done = subprocess.run(python_argv(code), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_source_checkout_on_pythonpath_works_uninstalled(tmp_path):
    """`PYTHONPATH=/path/to/repo python ...` without pip install (e.g. a fresh GPU box): align's own finder maps
    align.tools & co. to their folders. Run with -S so the editable install in site-packages is not seen."""
    code = ("import sys, align.tools.calc_eval as c, align.rewards.base as b; "
            "assert c.__file__.startswith(sys.argv[1] + '/tools/'), c.__file__; "
            "assert b.__file__.startswith(sys.argv[1] + '/rewards/'), b.__file__")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-S", "-c", code, str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
