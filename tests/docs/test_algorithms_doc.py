"""docs/algorithms.md cannot drift: every registered estimator, aggregation and KL estimator is described, and
every `algo.*` / `reward.*` key it names exists in the config dataclasses."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from align import algos
from align.config import GRPOAlgoConfig, PPOAlgoConfig, RewardConfig, Section

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "algorithms.md"
TEXT = DOC.read_text()
SPANS = re.findall(r"`([^`\n]+)`", TEXT)
# a dotted key anywhere in a backticked span: `algo.clip_low`, `algo.loss_agg: token-mean`, `c = reward.clip`
# (not verl's `algorithm.x` or `reward_model.x`: the root must be followed by a dot)
KEY = re.compile(r"(?<![\w.])((?:algo|reward)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def _section_types(annotation: typing.Any) -> list[type]:
    """The Section classes a field annotation can hold (X, Union[X, None])."""
    args = typing.get_args(annotation) or (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, Section)]


def _resolves(classes: list[type], parts: list[str]) -> bool:
    """Whether the dotted path `parts` names a field in one of `classes` (nested sections followed)."""
    for cls in classes:
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        if parts[0] not in fields:
            continue
        if len(parts) == 1:
            return True
        if _resolves(_section_types(hints[parts[0]]), parts[1:]):
            return True
    return False


ROOTS = {"algo": [PPOAlgoConfig, GRPOAlgoConfig], "reward": [RewardConfig]}
DOC_KEYS = sorted({key for span in SPANS for key in KEY.findall(span)})


def test_doc_names_keys() -> None:
    assert len(DOC_KEYS) > 20, DOC_KEYS  # the parser found the doc's keys


@pytest.mark.parametrize("key", DOC_KEYS)
def test_doc_key_exists(key: str) -> None:
    root, *parts = key.split(".")
    assert _resolves(ROOTS[root], parts), f"docs/algorithms.md names `{key}`, which is no config key"


def test_parser_rejects_unknown_keys() -> None:
    assert not _resolves(ROOTS["algo"], ["no_such_key"])
    assert not _resolves(ROOTS["reward"], ["overlong_buffer", "nope"])
    assert _resolves(ROOTS["reward"], ["overlong_buffer", "penalty_factor"])
    assert _resolves(ROOTS["algo"], ["rollout_correction", "cap"])


@pytest.mark.parametrize("name", sorted(algos.ADVANTAGE_ESTIMATORS) + list(algos.AGG_MODES) + list(algos.KL_KINDS)
                         + list(algos.CORRECTION_MODES))
def test_doc_describes(name: str) -> None:
    assert name in SPANS or f"### {name}" in TEXT or any(s.startswith(f"{name} ") for s in SPANS), (
        f"{name!r} is registered in align.algos but docs/algorithms.md does not describe it (as `{name}`)")


def test_doc_is_linked() -> None:
    assert "(docs/algorithms.md)" in (REPO / "README.md").read_text()
    assert "(algorithms.md)" in (REPO / "docs" / "guide.md").read_text()
