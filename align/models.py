"""Loading the policy, its reference, and the PPO critic.

- Policy: any Hugging Face causal LM by name or local path (`AutoModelForCausalLM`), optionally with LoRA.
- Reference: with LoRA, the same model with adapters disabled (no second copy in memory); otherwise a
  frozen copy, made only when something needs it (a KL term, curiosity states).
- Critic: a value head on the policy backbone (one forward gives log-probs and values) or a separate
  backbone + head.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from align.config import ModelConfig
from align.errors import MissingFileError, UserError
from align.precision import (
    DecodeCopy,
    Precision,
    apply_matmul_precision,
    autocast_for,
    mark_autocast,
    resolve_precision,
)


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars (they drown the CLI's own output and error lines)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def model_precision(cfg: ModelConfig, device: torch.device) -> Precision:
    """`align.precision.resolve_precision` for this config (its docstring says what `auto` means where)."""
    return resolve_precision(cfg.dtype, cfg.lora.enabled, device)


def _dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The policy's load dtype: with `auto`, bf16 only where AdamW does not update the weights (a LoRA run's
    frozen base); full fine-tuning keeps fp32 masters (bf16 would round small updates away)."""
    if cfg.dtype == "bfloat16" and not cfg.lora.enabled:
        import warnings

        warnings.warn(f"model.dtype = {cfg.dtype} without LoRA updates {cfg.dtype} weights in place (no fp32 master "
                      "copy): small updates round away; prefer auto (fp32 masters + bf16 autocast on CUDA) or LoRA",
                      stacklevel=2)
    return model_precision(cfg, device).policy


def _local_or_hub(path: str | Path, key: str) -> str:
    """`path` as given, unless it can only mean a local directory that is not there: then one line naming it.

    A string that is not a valid hub repo id (absolute or ./ ../ ~ paths, more than one `/`, a backslash, ...)
    can only be a local path; without this check a missing one surfaces as the hub client's
    "Repo id must be in the form 'repo_name' ..." message, which names neither the key nor the fix."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(path)
    local = Path(text).expanduser()
    if local.exists():
        return str(local)
    looks_local = isinstance(path, Path) or text.startswith(("./", "../", "~", "/", ".\\", "..\\"))
    if not looks_local:
        try:
            validate_repo_id(text)
        except HFValidationError:
            looks_local = True
    if looks_local:
        raise MissingFileError(f"{key} = {text!r}: no such directory (give a model directory with config.json, "
                               f"or a hub name like 'Qwen/Qwen2.5-0.5B-Instruct')")
    return text


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    quiet_transformers()
    path = _local_or_hub(cfg.tokenizer_path or cfg.path, "model.tokenizer_path" if cfg.tokenizer_path else "model.path")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise UserError(f"cannot load a tokenizer from {path!r}: {str(err).splitlines()[0]} "
                        "(set model.path / model.tokenizer_path to a model directory or hub name)") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"tokenizer at {path!r} has neither a pad nor an eos token; add one to the tokenizer")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | Path, cfg: ModelConfig, device: torch.device, key: str = "model.path",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """dtype: the load dtype (default: the policy's, `_dtype`)."""
    from transformers import AutoModelForCausalLM

    path = _local_or_hub(path, key)
    dtype = dtype or _dtype(cfg, device)
    if cfg.kind == "umm":
        from align.rollouts.janus import is_janus, load_janus_image_lm

        if is_janus(path):  # HF's native Janus format: image tokens from the generation head
            return load_janus_image_lm(path, dtype, device, cfg.gradient_checkpointing)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise UserError(f"cannot load a causal LM from {str(path)!r}: {str(err).splitlines()[0]} "
                        "(model.path must be a Hugging Face model name or a directory with config.json and weights)") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model = model.to(device)
    check_head_path(model)
    return model


def apply_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class ValueHead(nn.Module):
    """v = w . h + b on the backbone's last hidden state; initialised small so early values are ~0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [...]
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # fp32 values under a bf16 autocast
            return self.proj(hidden.float()).squeeze(-1)


class SeparateCritic(nn.Module):
    """A critic with its own backbone (the policy's architecture, initialised from `critic_path`)."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = ValueHead(hidden_size)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        with autocast_for(self):  # fp32 master weights, bf16 compute on CUDA (`align.precision`)
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
        return self.head(hidden)


@dataclass
class PolicyModels:
    """Everything the trainer holds of the model side."""

    policy: nn.Module  # a causal LM, possibly a peft.PeftModel
    tokenizer: object
    reference: nn.Module | None  # a frozen copy; None when LoRA provides the reference, or none is needed
    value_head: ValueHead | None  # on the policy backbone
    critic: SeparateCritic | None  # a separate critic
    device: torch.device
    lora: bool
    precision: Precision | None = None
    decode: DecodeCopy | None = None  # a bf16 copy the rollout engine decodes from (CUDA, fp32 masters)

    @property
    def decode_model(self) -> nn.Module:
        """What the in-process rollout engine runs: the bf16 decode copy, or the policy itself."""
        return self.decode.model if self.decode is not None else self.policy

    def refresh_decode(self) -> None:
        """Copy the current policy weights into the decode copy (in place; a no-op without one)."""
        if self.decode is not None:
            self.decode.refresh()

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[nn.Module]:
        """Yields the module whose outputs are the reference policy's."""
        if self.lora:
            with self.policy.disable_adapter():
                yield self.policy
        elif self.reference is not None:
            yield self.reference
        else:
            raise RuntimeError("no reference model was loaded; the trainer asked for one although nothing needs it")

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return params

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters()) if self.critic is not None else []


def hidden_size_of(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size


def load_models(cfg: ModelConfig, device: torch.device, *, need_reference: bool, critic: str | None) -> PolicyModels:
    """Load the policy (+LoRA), the reference if needed, and a critic (`critic`: None | value_head | separate)."""
    precision = model_precision(cfg, device)
    apply_matmul_precision(precision)
    tokenizer = load_tokenizer(cfg)
    policy = load_causal_lm(cfg.path, cfg, device)
    reference = None
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg)
    elif need_reference:
        # frozen: no optimizer state, no master copy needed, so it is held in the reference dtype (bf16 on CUDA)
        reference = copy.deepcopy(policy).eval().to(precision.reference)
        reference.requires_grad_(False)
        mark_autocast(reference, precision.autocast)
    mark_autocast(policy, precision.autocast)
    value_head = separate = None
    if critic == "value_head":
        value_head = ValueHead(hidden_size_of(policy)).to(device)
    elif critic == "separate":
        # fully trained: fp32 master weights whatever the policy's dtype (F9), bf16 compute under the autocast
        backbone = load_causal_lm(cfg.critic_path or cfg.path, cfg, device,
                                  "model.critic_path" if cfg.critic_path else "model.path",
                                  dtype=precision.critic).get_decoder()
        separate = mark_autocast(SeparateCritic(backbone, hidden_size_of(policy)).to(device), precision.autocast)
    decode = DecodeCopy(policy, precision.decode) if precision.decode is not None else None
    return PolicyModels(policy=policy, tokenizer=tokenizer, reference=reference, value_head=value_head,
                        critic=separate, device=device, lora=cfg.lora.enabled, precision=precision, decode=decode)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone (returns last hidden states, final norm applied) and the lm_head of a causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) that the model's forward applies to lm_head(h), from its config: Cohere multiplies by
    `logit_scale`, Granite divides by `logits_scaling`, Gemma-2/3 soft-cap at `final_logit_softcapping`
    (`align.kernels.transform_logits` applies them in the same order)."""
    config = model.config
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, float(softcap) if softcap else None


def _head_path_mismatch(model: nn.Module) -> str | None:
    """Why `transform_logits(lm_head(decoder(x)))` does not reproduce the model's own logits on a short probe,
    or None when it does."""
    from align.kernels import transform_logits

    try:
        decoder, head = decoder_and_head(model)
        weight = head.weight
        ids = (torch.arange(8, device=weight.device) * 7919 % model.config.get_text_config().vocab_size)[None]
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):  # both sides in the weights' dtype
            full = model(input_ids=ids, use_cache=False).logits.float()
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            ours = transform_logits(torch.nn.functional.linear(hidden, weight, head.bias).float(), *logit_transform(model))
    except Exception as err:  # noqa: BLE001 - a model without the decoder / head split, or a forward that needs more inputs
        return f"{type(err).__name__}: {err}"
    tol = (1e-4 if weight.dtype == torch.float32 else 2e-2) * (1.0 + float(full.abs().max()))
    if ours.shape != full.shape or bool((ours - full).abs().max() > tol):
        return "its logits are not lm_head(hidden) with a known scale / soft-cap"
    return None


def check_head_path(model: nn.Module) -> bool:
    """Whether the trainer's lm_head path reproduces the model's own logits (`_head_path_mismatch`).

    The trainer computes log-probs from the hidden states and the lm_head (fused, chunked) and the rollout
    engine samples from the model's own logits; an architecture that changes its logits in a way
    `logit_transform` does not know (Granite's logits_scaling was one) would make the two disagree silently.
    The result is kept on the model: False sends the trainer to the model's full logits (`needs_full_logits`)."""
    import warnings

    reason = _head_path_mismatch(model)
    if reason is not None:
        warnings.warn(f"{type(model).__name__}: {reason}; the trainer computes log-probs from the model's full "
                      "[N, T, V] logits (more memory than the fused lm_head path)", stacklevel=2)
    model._align_full_logits = reason is not None
    return reason is None


def needs_full_logits(model: nn.Module) -> bool:
    """Models whose logits `check_head_path` (run by `load_causal_lm`) could not reproduce take the full-logits
    path; a model built by hand and never checked uses lm_head(h) with its config's `logit_transform`."""
    return bool(getattr(model, "_align_full_logits", False))
