"""`FormatReward`: the completion matches a regex (the `regex` module, with a timeout)."""
from __future__ import annotations

from typing import Any

from align.rewards.base import RewardFunction, RewardOutput
from align.rewards.verifiers.common import _completion_text

DEFAULT_FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


class FormatReward(RewardFunction):
    """`match_score` when the completion matches `pattern` (the `regex` module, with a timeout), else
    `miss_score`. mode: "search" (anywhere), "match" (at the start) or "fullmatch".

    A pattern that runs past `timeout_s` (catastrophic backtracking) is an error for that sample.
    Default pattern: `<think>...</think> <answer>...</answer>` (DeepSeek-R1 style).
    """

    name = "format"

    def __init__(self, pattern: str = DEFAULT_FORMAT_PATTERN, mode: str = "search", flags: str = "s",
                 match_score: float = 1.0, miss_score: float = 0.0, timeout_s: float = 1.0,
                 max_chars: int = 100_000):
        import regex

        if mode not in ("search", "match", "fullmatch"):
            raise ValueError(f"format: mode must be 'search', 'match' or 'fullmatch', got {mode!r}")
        unknown = set(flags) - set("imsx")
        if unknown:
            raise ValueError(f"format: unknown regex flags {''.join(sorted(unknown))!r}; use letters from 'imsx'")
        try:
            regex.compile(pattern)
        except regex.error as err:
            raise ValueError(f"format: invalid pattern {pattern!r}: {err}") from None
        self.pattern, self.mode, self.flags = pattern, mode, flags
        self.match_score, self.miss_score = float(match_score), float(miss_score)
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self._compiled = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    def _regex(self):
        if self._compiled is None:
            import regex

            flag_bits = 0
            for f in self.flags:
                flag_bits |= {"i": regex.IGNORECASE, "m": regex.MULTILINE, "s": regex.DOTALL, "x": regex.VERBOSE}[f]
            self._compiled = regex.compile(self.pattern, flag_bits)
        return self._compiled

    def verify(self, completion: str) -> tuple[float | None, str | None, dict[str, Any]]:
        if len(completion) > self.max_chars:
            return self.miss_score, None, {"reason": f"longer than {self.max_chars} characters"}
        try:
            found = getattr(self._regex(), self.mode)(completion, timeout=self.timeout_s)
        except TimeoutError:
            return None, f"format regex timed out after {self.timeout_s:g}s", {}
        return (self.match_score, None, {"reason": "match"}) if found else (self.miss_score, None, {"reason": "no match"})

    def score(self, prompts, completions, **columns) -> RewardOutput:
        results = [self.verify(_completion_text(c)) for c in completions]
        return RewardOutput(scores=[r[0] for r in results], errors=[r[1] for r in results],
                            info=[r[2] for r in results])
