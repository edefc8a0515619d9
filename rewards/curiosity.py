"""CD-RLHF curiosity: an intrinsic curiosity module (ICM) whose forward-model error pays a per-token bonus.

Source: Sun, Chai et al., "Curiosity-Driven Reinforcement Learning from Human Feedback", ACL 2025
(arXiv 2501.11463), and its released code (ernie-research/CD-RLHF, DeepSpeed-Chat `ppo_trainer.py` /
`rlhf_engine.py`); summary in PAPERS.md §2. The released code's behaviour is the default; the paper's
squared loss is an option.

Where the trainer takes the tensors from (the released code's convention)
-------------------------------------------------------------------------
Let the teacher-forced sequence be `input_ids = cat(prompt_ids, response_ids)` with prompt width P
(left-padded) and response length T (right-padded), and `H = ref_model(input_ids, output_hidden_states=True)
.hidden_states[-1]` ([B, P+T, h], no grad; with LoRA: the policy with adapters disabled).

- states  = H[:, P-1 : P+T]                  [B, T+1, h]
  states[:, t]   = s_t     = hidden state at absolute position P-1+t: the state whose logits sample
                             response token t (the same position whose logits give logprobs[:, t]);
  states[:, t+1] = s_{t+1} = hidden state at the position of response token t (after reading it).
- actions = policy.get_input_embeddings()(response_ids).detach()   [B, T, a]  (a_t = embedding of token t)
- mask    = the response mask [B, T];  topk_hit = rollout's "sampled token within the top-k of its
  sampling distribution" [B, T] bool (`rank < top_k`; see `topk_hit_from_logits`).

(The released code slices `hidden_states[:, start:-1]` / `hidden_states[:, start+1:]` with
`start = prompt_len - 1` and embeds `seq[:, start+1:]`: the same thing.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from align.algos import masked_mean, masked_whiten
from align.algos.masked import as_bool_mask

__all__ = [
    "ICM",
    "CuriosityModule",
    "CuriosityOutput",
    "forward_prediction_error",
    "icm_loss",
    "topk_hit_from_logits",
    "whiten_intrinsic",
]


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ICM(nn.Module):
    """Intrinsic curiosity module without the inverse model (CD-RLHF §3.2; released `rlhf_engine.ICM`).

    phi (encoder):       h -> 2h -> 2h -> h, ReLU between layers.
    f   (forward model): [phi(s_t); a_t] (h + action_size) -> I -> I -> h, ReLU between layers.
    PAPERS.md writes the forward model's input as 2h because the released code has action_size == h;
    any action_size is accepted here. I = the language model's intermediate size.
    """

    def __init__(self, hidden_size: int, action_size: int | None = None, intermediate_size: int | None = None):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size = {hidden_size}: must be >= 1")
        self.hidden_size = hidden_size
        self.action_size = hidden_size if action_size is None else action_size
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        h, a, i = self.hidden_size, self.action_size, self.intermediate_size
        self.encoder = _mlp([h, 2 * h, 2 * h, h])
        self.forward_model = _mlp([h + a, i, i, h])

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B, T+1, h], actions [B, T, a] -> (phi(s_{t+1}) [B, T, h], f(phi(s_t), a_t) [B, T, h]).

        phi is applied once to all T+1 states; gradients flow into phi through both the prediction and the
        target, as in the released code (no stop-gradient on phi(s_{t+1})).
        """
        _check_icm_inputs(states, actions, self.hidden_size, self.action_size)
        phi = self.encoder(states)
        predicted = self.forward_model(torch.cat([phi[:, :-1], actions], dim=-1))
        return phi[:, 1:], predicted


def _check_icm_inputs(states: torch.Tensor, actions: torch.Tensor, hidden_size: int, action_size: int) -> None:
    if states.dim() != 3 or actions.dim() != 3:
        raise ValueError(f"states must be [B, T+1, h] and actions [B, T, a]; got {tuple(states.shape)} and {tuple(actions.shape)}")
    b, t1, h = states.shape
    if h != hidden_size:
        raise ValueError(f"states have hidden size {h} but the ICM was built for {hidden_size}")
    if actions.shape[0] != b or actions.shape[1] != t1 - 1:
        raise ValueError(f"actions {tuple(actions.shape)} must be [B, T, a] for states {tuple(states.shape)} = [B, T+1, h] "
                         "(states = ref hidden states at positions P-1 .. P+T-1)")
    if actions.shape[2] != action_size:
        raise ValueError(f"actions have size {actions.shape[2]} but the ICM was built for action_size {action_size}")


def forward_prediction_error(next_phi: torch.Tensor, predicted: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Per-token curiosity 0.5 * ||phi(s_{t+1}) - f(phi(s_t), a_t)||_2 ([B, T, h] x2 -> [B, T]).

    squared=True gives the paper's 0.5 * ||.||_2^2; the released code uses the plain L2 norm.
    Source: CD-RLHF eq. (4); released `intrinsic_reward` / `ICM_loss`.
    """
    diff = next_phi - predicted
    if squared:
        return 0.5 * diff.pow(2).sum(dim=-1)
    return 0.5 * torch.linalg.vector_norm(diff, ord=2, dim=-1)


def icm_loss(next_phi: torch.Tensor, predicted: torch.Tensor, mask: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """L_ICM = sum_t err_t * m_t / sum_t m_t with err_t = 0.5 * ||f(phi(s_t), a_t) - phi(s_{t+1})||_2 (0-dim).

    Over all rows and tokens of the batch; padding contributes nothing; an empty mask gives 0.
    Source: CD-RLHF eq. (5); released `ICM_loss` (L2 norm, not squared).
    """
    err = forward_prediction_error(next_phi, predicted, squared=squared)
    return masked_mean(err, as_bool_mask(mask))


def whiten_intrinsic(raw: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, include_padding: bool = False) -> torch.Tensor:
    """(r - mean) / sqrt(var + eps) over the batch's response tokens; [B, T] -> [B, T], 0 at padding.

    mean and the biased variance (torch.var(unbiased=False), as the released `whiten`) are taken over the
    masked entries: `align.algos.masked_whiten(raw, mask, unbiased=False)`. include_padding=True reproduces the released code exactly: there the raw reward is
    multiplied by the mask and whitened over the whole [B, T] tensor, so padding zeros enter the statistics
    (and the result depends on how much padding the batch has). Source: released `ppo_trainer.whiten`.
    """
    keep = as_bool_mask(mask)
    if include_padding:
        # the released code: plain (unmasked) statistics of the masked-to-zero [B, T] tensor
        zero = torch.zeros((), dtype=raw.dtype, device=raw.device)
        masked = torch.where(keep, raw, zero)
        mean = masked.mean()
        var = (masked - mean).pow(2).mean()
        return torch.where(keep, (masked - mean) * torch.rsqrt(var + eps), zero)
    return masked_whiten(raw, keep, eps=eps, unbiased=False)


def topk_hit_from_logits(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each sampled token is among the top-k of its sampling distribution ([B, T, V], [B, T] -> bool [B, T]).

    rank = number of vocabulary entries with a strictly larger logit; hit = rank < k (a token tied with the
    k-th largest counts as a hit). Temperature and top-k / top-p truncation do not change the order of the
    surviving tokens, so raw or processed logits give the same answer for a sampled token.
    Source: released `_generate_sequence` (`torch.topk(probs, cdrlhf_topk)` membership test).
    """
    if k < 1:
        raise ValueError(f"top_k = {k}: must be >= 1")
    chosen = logits.gather(-1, tokens.long().unsqueeze(-1))
    rank = (logits > chosen).sum(dim=-1)
    return rank < k


@dataclass
class CuriosityOutput:
    """What `CuriosityModule.compute` returns; every tensor is detached.

    intrinsic: [B, T] whitened error * gate (0 at padding and where the sampled token was in the top-k)
    raw_error: [B, T] 0.5 * ||phi(s_{t+1}) - f(phi(s_t), a_t)|| before whitening (0 at padding)
    gate:      [B, T] float, 1 where the bonus is paid (response token NOT in the top-k), else 0
    metrics:   flat dict with `curiosity/...` keys
    """

    intrinsic: torch.Tensor
    raw_error: torch.Tensor
    gate: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As DeepSpeed-Chat's get_optimizer_grouped_parameters: no weight decay on biases.
    decay = [p for n, p in module.named_parameters() if not n.endswith("bias")]
    no_decay = [p for n, p in module.named_parameters() if n.endswith("bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CuriosityModule:
    """The ICM, its own optimizer, and the CD-RLHF intrinsic reward (PAPERS.md §2).

    Per PPO step the trainer calls `compute(...)` (intrinsic reward from the ICM as it is before this
    step's update, as in the released code), builds the token rewards with `align.algos.shaped_token_rewards`, and
    calls `update(...)` once on the same batch. `state_dict()` / `load_state_dict()` cover the ICM and its
    optimizer for an exact resume.

    Optimizer: AdamW, as the released code (DeepSpeed FusedAdam, whose default is the AdamW update) with
    betas (0.9, 0.95), weight decay 0.1 on weights and 0 on biases, and gradient clipping at 1.0 (the
    DeepSpeed-Chat training config). The released linear warm-up/decay schedule is not reproduced: the
    learning rate is constant. PAPERS.md only fixes lr = 1e-5.

    Construction never draws from the global torch RNG (the weights come from a private generator seeded
    with `seed`), so building the module does not change the policy's sampling.
    """

    def __init__(self, hidden_size: int, action_size: int | None = None, intermediate_size: int | None = None,
                 lr: float = 1e-5, top_k: int = 1, eta: float = 0.04, seed: int | None = None,
                 squared: bool = False, whiten_include_padding: bool = False, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), max_grad_norm: float | None = 1.0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if top_k < 1:
            raise ValueError(f"top_k = {top_k}: must be >= 1")
        if lr <= 0:
            raise ValueError(f"lr = {lr}: must be > 0")
        if eta < 0:
            raise ValueError(f"eta = {eta}: must be >= 0")
        self.top_k, self.eta, self.lr = int(top_k), float(eta), float(lr)
        self.squared, self.whiten_include_padding = bool(squared), bool(whiten_include_padding)
        self.max_grad_norm = max_grad_norm
        self.seed = 0 if seed is None else int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            icm = ICM(hidden_size, action_size, intermediate_size)
        self.icm = icm.to(device=device, dtype=dtype)
        self.optimizer = torch.optim.AdamW(_weight_decay_groups(self.icm, weight_decay), lr=self.lr, betas=betas)
        self.num_updates = 0

    # -- shapes / devices ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.icm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.icm.parameters()).dtype

    def to(self, device: torch.device | str) -> "CuriosityModule":
        """Move the ICM and its optimizer state to `device`."""
        self.icm.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(device)
        return self

    def _prepare(self, states: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _check_icm_inputs(states, actions, self.icm.hidden_size, self.icm.action_size)
        if tuple(mask.shape) != tuple(actions.shape[:2]):
            raise ValueError(f"mask {tuple(mask.shape)} must be [B, T] = {tuple(actions.shape[:2])}")
        to = dict(device=self.device, dtype=self.dtype)
        return states.detach().to(**to), actions.detach().to(**to), as_bool_mask(mask).to(self.device)

    # -- the intrinsic reward -----------------------------------------------------------------------
    def compute(self, states: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor,
                topk_hit: torch.Tensor) -> CuriosityOutput:
        """Intrinsic reward for one rollout batch (no gradient, no update).

        states [B, T+1, h] = ref last hidden states at positions P-1 .. P+T-1 (see the module docstring);
        actions [B, T, a] = policy input embeddings of the response tokens; mask [B, T];
        topk_hit [B, T] bool = the sampled token was in the top-`top_k` of its sampling distribution.
        r_i = whiten(0.5 * ||phi(s_{t+1}) - f(phi(s_t), a_t)||_2) over the masked tokens, detached, then
        gated: kept only where the token is a response token and NOT a top-k hit.
        Source: CD-RLHF eqs. (4), (6); released `intrinsic_reward` and `in_top_k` gate.
        """
        states, actions, keep = self._prepare(states, actions, mask)
        if tuple(topk_hit.shape) != tuple(keep.shape):
            raise ValueError(f"topk_hit {tuple(topk_hit.shape)} must be [B, T] = {tuple(keep.shape)}")
        with torch.no_grad():
            next_phi, predicted = self.icm(states, actions)
            raw = forward_prediction_error(next_phi, predicted, squared=self.squared)
            raw = torch.where(keep, raw, torch.zeros((), dtype=raw.dtype, device=raw.device))
            if not bool(torch.isfinite(raw).all()):
                raise FloatingPointError("curiosity: non-finite ICM prediction error (check the reference hidden states for NaN/inf)")
            whitened = whiten_intrinsic(raw, keep, include_padding=self.whiten_include_padding)
            gate = (keep & ~as_bool_mask(topk_hit).to(keep.device)).to(raw.dtype)
            intrinsic = whitened * gate
        n_tokens = max(int(keep.sum()), 1)
        n_gated = int(gate.sum())
        metrics = {
            "curiosity/gate_rate": n_gated / n_tokens,
            "curiosity/intrinsic_mean": float(intrinsic.sum()) / max(n_gated, 1),
            "curiosity/error_mean": float(raw.sum()) / n_tokens,
        }
        return CuriosityOutput(intrinsic=intrinsic, raw_error=raw, gate=gate, metrics=metrics)

    # -- training ------------------------------------------------------------------------------------
    def loss(self, states: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_ICM on one batch, with gradient into the ICM (0-dim)."""
        states, actions, keep = self._prepare(states, actions, mask)
        next_phi, predicted = self.icm(states, actions)
        return icm_loss(next_phi, predicted, keep, squared=self.squared)

    def update(self, states: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """One optimizer step of L_ICM on the batch; returns {"curiosity/icm_loss", "curiosity/icm_grad_norm"}.

        A non-finite loss or gradient raises FloatingPointError before the optimizer runs.
        """
        self.icm.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(states, actions, mask)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"curiosity: ICM loss is {float(loss.detach())}; the optimizer step was not taken")
        loss.backward()
        params = [p for p in self.icm.parameters() if p.grad is not None]
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        if not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError("curiosity: non-finite ICM gradient; the optimizer step was not taken")
        self.optimizer.step()
        self.num_updates += 1
        return {"curiosity/icm_loss": float(loss.detach()), "curiosity/icm_grad_norm": float(grad_norm)}

    # -- checkpoints -----------------------------------------------------------------------------------
    def _shape(self) -> dict[str, int]:
        return {"hidden_size": self.icm.hidden_size, "action_size": self.icm.action_size,
                "intermediate_size": self.icm.intermediate_size}

    def state_dict(self) -> dict[str, Any]:
        """ICM weights, optimizer state (moments and step counts) and the update count."""
        return {"icm": self.icm.state_dict(), "optimizer": self.optimizer.state_dict(),
                "num_updates": self.num_updates, "shape": self._shape()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` saved; a checkpoint of a differently sized ICM is refused."""
        missing = {"icm", "optimizer", "num_updates", "shape"} - set(state)
        if missing:
            raise KeyError(f"curiosity checkpoint lacks {sorted(missing)}; was it written by CuriosityModule.state_dict()?")
        if dict(state["shape"]) != self._shape():
            raise ValueError(f"curiosity checkpoint has ICM sizes {dict(state['shape'])} but this run builds {self._shape()}")
        self.icm.load_state_dict(state["icm"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_updates = int(state["num_updates"])
