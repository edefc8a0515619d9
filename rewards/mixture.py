"""Weighted mixtures of rewards with per-source running normalisation and clipping.

mixed_i = clip( sum_k w_k * norm_k(s_ik) ),  norm_k(s) = (s - mean_k) / (std_k + eps) with the running
mean / std of source k (Welford / Chan parallel update, as in OpenAI baselines' RunningMeanStd), or the
identity when normalize="none". Inapplicable components (score None, no error) contribute nothing, as in
TRL's nansum over reward functions. An errored component with non-zero weight makes the sample an error
(on_error="error") or is left out of the sum (on_error="skip_component"); non-finite scores are errors
(RewardOutput enforces it, in float32 as well: a weighted sum beyond the float32 range is an error too), so
NaN or inf never reaches the advantages.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Sequence

from align.rewards.base import RewardFunction, RewardOutput, as_reward_function, finite_in_float32, score_all


class RunningMeanStd:
    """Running mean and (population) variance of a stream of floats, merged batch by batch (Chan et al. 1979)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, values: Sequence[float]) -> None:
        n = len(values)
        if n == 0:
            return
        b_mean = math.fsum(values) / n
        b_m2 = math.fsum((v - b_mean) ** 2 for v in values)
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class RewardMixture(RewardFunction):
    """`RewardMixture([(reward, weight), ...], normalize="none"|"running", clip=None|c|(lo, hi),
    on_error="error"|"skip_component", normalize_by=None|column)`.

    normalize="running" keeps running statistics per component (per reward source); with
    `normalize_by="data_source"` they are kept per (component, value of that column), so e.g. GSM8K and MATH
    scores are standardised separately.

    Each reward is a RewardFunction or a TRL-style callable. `clip` bounds the mixed score (a number c means
    (-c, c)). Running statistics are updated with each batch's finite scores before normalising that batch;
    `state_dict()` / `load_state_dict()` carry them across a resume. info per sample: "components" (raw
    scores by name), "normalized" (when normalize="running"), "component_errors".
    """

    name = "mixture"

    def __init__(self, components: Sequence[tuple[Any, float]], normalize: str = "none",
                 clip: float | tuple[float, float] | None = None, on_error: str = "error", eps: float = 1e-8,
                 name: str = "mixture", normalize_by: str | None = None):
        if not components:
            raise ValueError("RewardMixture needs at least one (reward, weight) pair")
        if normalize not in ("none", "running"):
            raise ValueError(f"RewardMixture: normalize must be 'none' or 'running', got {normalize!r}")
        if on_error not in ("error", "skip_component"):
            raise ValueError(f"RewardMixture: on_error must be 'error' or 'skip_component', got {on_error!r}")
        self.rewards: list[RewardFunction] = []
        self.weights: list[float] = []
        self.names: list[str] = []
        for item in components:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError("RewardMixture components are (reward, weight) pairs")
            reward, weight = as_reward_function(item[0]), float(item[1])
            if not math.isfinite(weight):
                raise ValueError(f"RewardMixture: weight of {reward.name!r} is {weight}; use a finite number")
            base, k = reward.name, 2
            label = base
            while label in self.names:
                label, k = f"{base}_{k}", k + 1
            self.rewards.append(reward)
            self.weights.append(weight)
            self.names.append(label)
        if clip is not None:
            lo, hi = (-abs(float(clip)), abs(float(clip))) if isinstance(clip, (int, float)) else map(float, clip)
            if not lo < hi:
                raise ValueError(f"RewardMixture: clip must be c > 0 or (low, high) with low < high, got {clip!r}")
            clip = (lo, hi)
        self.clip = clip
        self.normalize = normalize
        self.on_error = on_error
        self.eps = eps
        self.name = name
        if normalize_by is not None and normalize != "running":
            raise ValueError("RewardMixture: normalize_by needs normalize='running'")
        self.normalize_by = normalize_by
        self.stats = [RunningMeanStd() for _ in self.rewards]
        # normalize_by="data_source": separate running statistics per (component, column value)
        self.group_stats: list[dict[str, RunningMeanStd]] = [{} for _ in self.rewards]
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {n: s.state_dict() for n, s in zip(self.names, self.stats)},
                "group_stats": {n: {g: s.state_dict() for g, s in groups.items()}
                                for n, groups in zip(self.names, self.group_stats)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, s in zip(self.names, self.stats):
            s.load_state_dict(state["stats"][n])
        for n, groups in zip(self.names, self.group_stats):
            groups.clear()
            for g, st in state.get("group_stats", {}).get(n, {}).items():
                groups[g] = RunningMeanStd()
                groups[g].load_state_dict(st)

    def _normalise(self, k: int, out: RewardOutput, groups: list[str]) -> list[float | None]:
        """Update component k's running statistics (per group) with its valid scores, then standardise them."""
        valid = [i for i, (s, e) in enumerate(zip(out.scores, out.errors)) if s is not None and e is None]
        if self.normalize_by is None:
            stats = {"": self.stats[k]}
        else:
            stats = self.group_stats[k]
        for g in dict.fromkeys(groups):
            stats.setdefault(g, RunningMeanStd()).update([out.scores[i] for i in valid if groups[i] == g])
        return [None if s is None else (s - stats[g].mean) / (stats[g].std + self.eps)
                for s, g in zip(out.scores, groups)]

    def required_columns(self) -> list[tuple[str, ...]]:
        return [c for reward in self.rewards for c in reward.required_columns()]

    def score(self, prompts, completions, **columns) -> RewardOutput:
        n = len(completions)
        outs = []
        for reward, out in zip(self.rewards, score_all(self.rewards, prompts, completions, **columns)):
            if len(out) != n:
                raise ValueError(f"reward {reward.name!r} returned {len(out)} scores for {n} completions")
            outs.append(out)
        normed: list[list[float | None]] = [list(o.scores) for o in outs]
        if self.normalize == "running":
            if self.normalize_by is None:
                groups = [""] * n
            else:
                if columns.get(self.normalize_by) is None:
                    raise ValueError(f"RewardMixture: normalize_by={self.normalize_by!r} needs that column in the batch")
                groups = [str(g) for g in columns[self.normalize_by]]
            with self._lock:
                for k, out in enumerate(outs):
                    normed[k] = self._normalise(k, out, groups)
        scores: list[float | None] = []
        errors: list[str | None] = []
        infos: list[dict[str, Any]] = []
        for i in range(n):
            total, used, err = 0.0, 0, None
            info: dict[str, Any] = {"components": {}, "component_errors": {}}
            if self.normalize == "running":
                info["normalized"] = {}
            for k, out in enumerate(outs):
                name, w = self.names[k], self.weights[k]
                info["components"][name] = out.scores[i]
                if out.info[i]:
                    info.setdefault("component_info", {})[name] = out.info[i]
                if out.errors[i] is not None:
                    info["component_errors"][name] = out.errors[i]
                    if w != 0.0 and self.on_error == "error" and err is None:
                        err = f"{name}: {out.errors[i]}"
                    continue
                if out.scores[i] is None or w == 0.0:
                    continue
                if self.normalize == "running":
                    info["normalized"][name] = normed[k][i]
                total += w * normed[k][i]
                used += 1
            if err is not None:
                scores.append(None)
                errors.append(err)
            elif used == 0 and info["component_errors"] and any(
                    self.weights[self.names.index(c)] != 0.0 for c in info["component_errors"]):
                scores.append(None)
                errors.append("every component errored: " + "; ".join(f"{c}: {e}" for c, e in info["component_errors"].items()))
            elif used == 0:
                scores.append(None)  # no component applies to this sample
                errors.append(None)
            else:
                if self.clip is not None:
                    total = min(max(total, self.clip[0]), self.clip[1])
                scores.append(total)
                errors.append(None)
            infos.append(info)
        token_rewards = self._token_rewards(outs, errors)
        for i, row in enumerate(token_rewards or []):
            if not all(finite_in_float32(v) for v in row) and errors[i] is None:
                scores[i], errors[i] = None, "non-finite token reward (NaN, inf, or beyond the float32 range)"
        metrics = {k: v for o in outs for k, v in o.metrics.items()}  # each component's log_metric values
        return RewardOutput(scores=scores, errors=errors, info=infos, token_rewards=token_rewards, metrics=metrics)

    def _token_rewards(self, outs: list[RewardOutput], errors: list[str | None]) -> list[list[float]] | None:
        """Weighted sum of the components' token rewards (unnormalised), where any component has them."""
        with_tokens = [(w, o) for w, o in zip(self.weights, outs) if o.token_rewards is not None]
        if not with_tokens:
            return None
        rows = []
        for i in range(len(errors)):
            lengths = {len(o.token_rewards[i]) for _, o in with_tokens}
            if len(lengths) > 1:
                raise ValueError(f"RewardMixture: components give token rewards of different lengths {sorted(lengths)} "
                                 f"for sample {i}")
            length = lengths.pop()
            rows.append([math.fsum(w * o.token_rewards[i][t] for w, o in with_tokens) for t in range(length)])
        return rows

    def close(self) -> None:
        for r in self.rewards:
            r.close()


__all__ = ["RewardMixture", "RunningMeanStd"]
