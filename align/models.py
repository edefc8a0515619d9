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


def _dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        # bf16 weights only where AdamW does not update them directly: with LoRA the frozen base is bf16 and the
        # adapters train in fp32; full fine-tuning keeps fp32 weights (bf16 would round small updates away)
        return torch.bfloat16 if device.type == "cuda" and cfg.lora.enabled else torch.float32
    if cfg.dtype in ("bfloat16", "float16") and not cfg.lora.enabled:
        import warnings

        warnings.warn(f"model.dtype = {cfg.dtype} without LoRA updates {cfg.dtype} weights in place (no fp32 master "
                      "copy): small updates round away; prefer float32 or LoRA", stacklevel=2)
    return DTYPES[cfg.dtype]


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


def load_causal_lm(path: str | Path, cfg: ModelConfig, device: torch.device, key: str = "model.path") -> nn.Module:
    from transformers import AutoModelForCausalLM

    path = _local_or_hub(path, key)
    if cfg.kind == "umm":
        from align.rollouts.janus import is_janus, load_janus_image_lm

        if is_janus(path):  # HF's native Janus format: image tokens from the generation head
            return load_janus_image_lm(path, _dtype(cfg, device), device, cfg.gradient_checkpointing)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(cfg, device), trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise UserError(f"cannot load a causal LM from {str(path)!r}: {str(err).splitlines()[0]} "
                        "(model.path must be a Hugging Face model name or a directory with config.json and weights)") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model.to(device)


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
        return self.proj(hidden.float()).squeeze(-1)


class SeparateCritic(nn.Module):
    """A critic with its own backbone (the policy's architecture, initialised from `critic_path`)."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = ValueHead(hidden_size)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
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
    tokenizer = load_tokenizer(cfg)
    policy = load_causal_lm(cfg.path, cfg, device)
    reference = None
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg)
    elif need_reference:
        reference = copy.deepcopy(policy).eval()
        reference.requires_grad_(False)
    value_head = separate = None
    if critic == "value_head":
        value_head = ValueHead(hidden_size_of(policy)).to(device)
    elif critic == "separate":
        backbone = load_causal_lm(cfg.critic_path or cfg.path, cfg, device,
                                  "model.critic_path" if cfg.critic_path else "model.path").get_decoder()
        separate = SeparateCritic(backbone, hidden_size_of(policy)).to(device)
    return PolicyModels(policy=policy, tokenizer=tokenizer, reference=reference, value_head=value_head,
                        critic=separate, device=device, lora=cfg.lora.enabled)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone (returns last hidden states, final norm applied) and the lm_head of a causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def needs_full_logits(model: nn.Module) -> bool:
    """Models whose logits are not a plain lm_head(h) (soft-capping, scaling) take the full-logits path."""
    config = model.config
    return bool(getattr(config, "final_logit_softcapping", None)) or getattr(config, "logit_scale", 1.0) not in (None, 1.0)
