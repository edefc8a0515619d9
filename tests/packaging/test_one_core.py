"""One core: one exception base, one config loader, one LR schedule (issue 12, part 2).

These walk the source folders, so a new module that defines its own exception base, parses YAML itself or
writes its own LambdaLR fails here rather than in review.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from align.errors import AlignError, UserError

REPO = Path(__file__).resolve().parents[2]
# package -> folder (align.kernels & co. install from the top-level folders, pyproject's package-dir)
FOLDERS = {"align": REPO / "align", "align.kernels": REPO / "kernels", "align.tools": REPO / "tools",
           "align.rewards": REPO / "rewards", "align.rollouts": REPO / "rollouts"}
# optional extras ([ray], [serve], [diversity]): a module that needs one is skipped only when it is missing
OPTIONAL = {"ray", "fastapi", "uvicorn", "pydantic", "prometheus_client", "sentence_transformers", "starlette"}
# child-process entry scripts: importing them changes the interpreter (recursion limit, signal handlers)
CHILD_SCRIPTS = {"align.tools._calc_worker", "align.tools._zygote"}


def _module_files() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _module_files()


def _source_files() -> list[Path]:
    return sorted(set(MODULES.values()))


def test_the_walk_sees_every_package():
    for name in ("align.errors", "align.config", "align.kernels", "align.tools.registry", "align.rewards.training",
                 "align.rollouts.worker", "align.algos.schedule"):
        assert name in MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_exception_class_derives_from_align_error(name):
    if name in CHILD_SCRIPTS:  # read, not imported: they must not define exception classes at all
        tree = ast.parse(MODULES[name].read_text())
        assert not [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.bases]
        return
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"optional dependency {err.name} is not installed")
        raise
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if c.__module__ == name and issubclass(c, BaseException)]
    for cls in classes:
        assert issubclass(cls, AlignError), f"{name}.{cls.__name__} must derive from align.errors.AlignError"


def test_builtin_bases_are_kept_for_callers_that_catch_them():
    from align.rewards.base import RewardInputError
    from align.rewards.client import RemoteRewardError
    from align.rewards.verifiers import UnsafeExpression
    from align.rollouts.worker import StaleWeightsError
    from align.tools.calc_eval import CalcError
    from align.tools.registry import UnknownNameError
    from align.tools.sandbox import SandboxUnavailableError

    assert issubclass(UnknownNameError, KeyError) and issubclass(UnknownNameError, UserError)
    assert issubclass(RewardInputError, ValueError) and issubclass(RewardInputError, UserError)
    assert issubclass(SandboxUnavailableError, RuntimeError) and issubclass(SandboxUnavailableError, UserError)
    assert issubclass(CalcError, ValueError) and issubclass(UnsafeExpression, ValueError)
    assert issubclass(RemoteRewardError, RuntimeError) and issubclass(StaleWeightsError, RuntimeError)
    assert str(UnknownNameError("no reward 'x'")) == "no reward 'x'"  # KeyError's quoting stays off


def test_align_errors_imports_nothing():
    tree = ast.parse((REPO / "align" / "errors.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_cli_catches_only_our_hierarchy():
    tree = ast.parse((REPO / "align" / "cli.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    caught = set()
    for node in ast.walk(main):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            caught |= {ast.unparse(t) for t in types}
    assert caught == {"UserError", "DistributedError", "KeyboardInterrupt"}  # DistributedError: a dead rank, one line


# ------------------------------------------------------------------------------------------------------
# one definition each: config loader, LR schedule

LIBRARY = ("align", "kernels", "tools", "rewards", "rollouts")
EVERYTHING = (*LIBRARY, "examples", "scripts", "benchmarks")


def _trees(folders):
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _where(predicate, folders=LIBRARY) -> set[str]:
    return {rel for rel, tree in _trees(folders) if any(predicate(node) for node in ast.walk(tree))}


def _calls(node, *names: str) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func) in names


def test_one_config_loader():
    # only align/config_schema.py parses YAML / overrides; only the registry makes close-match suggestions
    assert _where(lambda n: _calls(n, "yaml.safe_load", "yaml.load", "yaml.full_load", "yaml.unsafe_load")) == \
        {"align/config_schema.py"}
    defined = lambda *names: lambda n: isinstance(n, ast.FunctionDef) and n.name in names  # noqa: E731
    assert _where(defined("apply_overrides", "_parse_override", "read_config_file", "_coerce")) == {"align/config_schema.py"}
    assert _where(lambda n: isinstance(n, ast.Import) and any(a.name == "difflib" for a in n.names)) == \
        {"tools/registry.py"}
    # every command's config goes through that machinery
    import align.command_configs as commands
    import align.config as config

    for name in ("build", "apply_overrides", "read_config_file", "Section"):
        assert getattr(commands, name) is getattr(config, name)
    for cls in (commands.RMTrainConfig, commands.ServeRewardsConfig, commands.DiversityEvalConfig):
        assert issubclass(cls, config.Section)


def test_one_lr_schedule():
    # no other LambdaLR / torch scheduler / Hugging Face schedule / cos(pi * progress), examples and scripts included
    def schedule_code(node) -> bool:
        if isinstance(node, ast.ImportFrom):
            return (node.module or "").endswith("lr_scheduler")
        if isinstance(node, ast.Attribute) and ast.unparse(node).endswith("optim.lr_scheduler"):
            return True
        if isinstance(node, (ast.Attribute, ast.Name)):
            name = node.attr if isinstance(node, ast.Attribute) else node.id
            return name == "LambdaLR" or bool(re.fullmatch(r"get_\w+_schedule(_with_warmup)?", name))
        return _calls(node, "math.cos", "cos", "torch.cos", "np.cos") and any("pi" in ast.unparse(a) for a in node.args)

    assert _where(schedule_code, EVERYTHING) == {"align/algos/schedule.py"}
