"""A reward for the OpenRLHF service tests, served by a real `align serve-rewards --reward _openrlhf_reward:LenPlusLabel`
(tests/rewards on PYTHONPATH): score = len(response) + float(label); a response containing "ERR" is a sample error."""
from __future__ import annotations

from align.rewards.base import RewardFunction, RewardOutput


class LenPlusLabel(RewardFunction):
    name = "len_plus_label"

    def score(self, prompts, completions, **columns):
        labels = columns.get("label") or [0] * len(completions)
        scores, errors = [], []
        for c, y in zip(completions, labels):
            bad = "ERR" in c
            scores.append(None if bad else len(c) + float(y))
            errors.append("the response asked for an error" if bad else None)
        return RewardOutput(scores=scores, errors=errors)
