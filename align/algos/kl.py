"""KL estimators between the policy and the reference, and the KL-coefficient controllers."""
from __future__ import annotations

import math
from typing import Any

import torch

from align.algos.masked import check_same_shape

__all__ = ["KL_KINDS", "kl_penalty", "FixedKLController", "AdaptiveKLController"]

KL_KINDS = ("k1", "k2", "k3", "abs", "low_var_kl")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || ref) estimate from log-probs of the sampled tokens.

    logp, ref_logp: [B, T] (any equal shapes) -> [B, T]. Gradients flow through both arguments.
    k1 = logp - ref;  k2 = 0.5 (logp - ref)^2;  k3 = exp(ref - logp) - (ref - logp) - 1;  abs = |logp - ref|
    (Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html).
    low_var_kl = k3 with (ref - logp) clamped to [-20, 20] and the result clamped to [-10, 10]
    (verl core_algos.kl_penalty "low_var_kl": kl = ref - logp; ratio = exp(kl); kld = ratio - kl - 1;
    clamp(kld, -10, 10); the inner clamp only guards exp: |kl| >= 20 gives kld >= 19, clamped to 10, either way).
    Our "k3" is Schulman's unclamped k3; verl's "k3" is an alias of its "low_var_kl", the clamped form, so a
    verl config with kl_loss_type k3 ports as kl_estimator: low_var_kl. Padding positions are not masked here:
    mask the result.
    """
    check_same_shape("logp", logp, "ref_logp", ref_logp)
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "abs":
        return (logp - ref_logp).abs()
    if kind == "k3":
        log_ratio = ref_logp - logp
        return torch.exp(log_ratio) - log_ratio - 1
    if kind == "low_var_kl":
        log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)
        return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL kind {kind!r}; choose one of {', '.join(KL_KINDS)}")


def _finite_float(name: str, value: Any) -> float:
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _check_steps(n_steps: Any) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int (samples or steps since the last update), got {n_steps!r}")
    return n_steps


class FixedKLController:
    """A constant KL coefficient. `.value` is the coefficient; `update` does nothing."""

    kind = "fixed"

    def __init__(self, coef: float):
        coef = _finite_float("kl coef", coef)
        if coef < 0:
            raise ValueError(f"kl coef must be >= 0, got {coef}")
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op (validates its arguments); returns the coefficient."""
        _finite_float("current_kl", current_kl)
        _check_steps(n_steps)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"KL controller state is for {state.get('kind')!r}, not {self.kind!r}; match algo.kl_ctl")
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv 1909.08593, sec. 2.2, eq. 2).

    e = clip(current_kl / target - 1, -0.2, 0.2);  value <- value * (1 + e * n_steps / horizon).
    `n_steps` counts what `horizon` counts (samples in Ziegler / TRL / verl: the batch size).
    state_dict() holds value, target and horizon; load_state_dict restores the value (exact resume) and
    keeps this controller's configured target and horizon.
    """

    kind = "adaptive"

    def __init__(self, init_coef: float, target: float, horizon: float):
        init_coef = _finite_float("init_coef", init_coef)
        target = _finite_float("target", target)
        horizon = _finite_float("horizon", horizon)
        if init_coef < 0:
            raise ValueError(f"init_coef must be >= 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient toward the target KL; returns the new coefficient."""
        current_kl = _finite_float("current_kl", current_kl)
        n_steps = _check_steps(n_steps)
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        # n_steps > 5 * horizon could make the factor negative; a KL coefficient never goes below 0.
        self.value *= max(1.0 + error * n_steps / self.horizon, 0.0)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"KL controller state is for {state.get('kind')!r}, not {self.kind!r}; match algo.kl_ctl")
        self.value = float(state["value"])
