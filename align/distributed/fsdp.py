"""FSDP2 wrapping of the trainer's models: every decoder layer its own shard group, then the model root.

`shard_models(models, cfg, ctx)` wraps in place (policy, critic, value head, reference) before the optimizer is
built, so the optimizer holds the sharded (DTensor) parameters. FSDP averages gradients over ranks; the trainer's
loss already divides by global counts (align.distributed.batches), so the summed gradient is the one-process
gradient: the divide factor is set to 1. `gathered(model)` holds a model's full weights for generation, where
ranks run different numbers of decoding steps and per-layer all-gathers would not line up.

The output embedding (lm_head, or the tied input embedding: one parameter) is sharded in the model's root unit.
The trainer does not call the LM's forward (hidden states -> fused log-probs, never [N, T, V] logits), so it runs
its teacher-forced pass through `as_root_forward(model, fn)`: FSDP's own pre/post-forward hooks of the root
(public `register_fsdp_forward_method`) gather the head before `fn` reads its weight, reshard it after, gather it
again for backward and reduce-scatter its gradient (summed, like every unit's) at the end of backward.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch
from torch import nn

from align.distributed.context import DistContext


def _fsdp():
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    return fully_shard, FSDPModule, MixedPrecisionPolicy, CPUOffloadPolicy, OffloadPolicy


# the method `as_root_forward` calls on a sharded model; FSDP's forward hooks run around it
_ROOT_FORWARD = "_align_root_forward"


def _run(module: nn.Module, fn: Any) -> Any:
    out = fn()
    # FSDP warns on (and an in-place op would drop the backward hook of) a view returned from a forward
    return tuple(t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t for t in out)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (its `_no_split_modules` classes; else the largest
    ModuleList), each one shard group."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_module(module: nn.Module, cfg: Any, *, reshard_after_forward: bool | None = None) -> nn.Module:
    """fully_shard each decoder layer of `module`, its decoder (embeddings, final norm), then `module` itself (the
    root unit: the output embedding, tied or not, and whatever else is left); gradients are summed over ranks.
    cfg: the run's `distributed` section (mixed_precision, cpu_offload, reshard_after_forward).

    A tied embedding is one parameter, in the root unit: the decoder unit leaves it out, so the root's one
    all-gather serves the embedding lookup and the head, and one reduce-scatter sums both gradients. The root
    gets `_ROOT_FORWARD` registered as an FSDP forward method (see `as_root_forward`)."""
    fully_shard, fsdp_module, mp_policy_cls, cpu_offload_cls, offload_cls = _fsdp()
    from torch.distributed.fsdp import register_fsdp_forward_method

    reshard = cfg.reshard_after_forward if reshard_after_forward is None else reshard_after_forward
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard}
    if cfg.mixed_precision == "bf16":  # bf16 compute copies, fp32 gradient reduction (and fp32 shards in AdamW)
        kwargs["mp_policy"] = mp_policy_cls(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs["offload_policy"] = cpu_offload_cls() if cfg.cpu_offload else offload_cls()
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # peft: the wrapped LM
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    tied = set(head.parameters()) & set(embed.parameters()) if head is not None and embed is not None else set()
    for layer in decoder_layers(module):
        if not isinstance(layer, fsdp_module):
            fully_shard(layer, **kwargs)
    # the trainer calls the decoder itself (inside the root's forward hooks): a shard group of its own
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if isinstance(decoder, nn.Module) and decoder is not module and not isinstance(decoder, fsdp_module):
        fully_shard(decoder, ignored_params=tied, **kwargs)
    fully_shard(module, **kwargs)
    object.__setattr__(module, _ROOT_FORWARD, types.MethodType(_run, module))
    register_fsdp_forward_method(module, _ROOT_FORWARD)
    for m in module.modules():
        if isinstance(m, fsdp_module):
            # the loss divides by global counts already: FSDP's mean over ranks would shrink the gradient N-fold
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM; NCCL zero-copy)
    return module


def as_root_forward(model: nn.Module, fn: Any) -> tuple:
    """`fn()` (a tuple of outputs) run as a forward of a sharded `model`'s root unit: the root's parameters (the
    output embedding) are gathered whole before `fn` reads them and resharded after; backward gathers them again
    and reduce-scatters their gradients. An unsharded model: plain `fn()`, the same tensors."""
    method = getattr(model, _ROOT_FORWARD, None)
    return fn() if method is None else method(fn)


def shard_models(models: Any, cfg: Any, ctx: DistContext) -> Any:
    """Wrap `models` (align.models.PolicyModels) in place for `ctx.world_size` ranks; a no-op in a world of one.
    The reference (a frozen copy) is always resharded after its forward: it is only read, and only once a step."""
    if not ctx.enabled:
        return models
    shard_module(models.policy, cfg)
    if models.reference is not None:
        shard_module(models.reference, cfg, reshard_after_forward=True)
    if models.critic is not None:
        shard_module(models.critic.backbone, cfg)
        shard_module(models.critic, cfg)
    if models.value_head is not None:
        shard_module(models.value_head, cfg)
    return models


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    _, fsdp_module, *_ = _fsdp()
    return [m for m in model.modules() if isinstance(m, fsdp_module)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every shard group all-gathered and kept so until exit: forwards inside run no collective
    (generation: ranks stop after different numbers of tokens). A no-op for a model that is not sharded."""
    groups = fsdp_modules(model)
    before = [_reshards(m) for m in groups]
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m, reshard in zip(groups, before):
            m.reshard()
            m.set_reshard_after_forward(reshard, recurse=False)


def gathered_if_scoring_uses(policy: nn.Module, reward: Any):
    """`gathered(policy)` when a reward scores with the live policy (GvU's understanding reward: `bind_policy`),
    whose forwards differ in number between ranks; otherwise nothing (scoring never touches the policy)."""
    components = getattr(reward, "rewards", [reward])
    if any(hasattr(c, "bind_policy") for c in components):
        return gathered(policy)
    return contextlib.nullcontext(policy)


def _reshards(module: nn.Module) -> bool:
    groups = module._get_fsdp_state()._fsdp_param_groups
    return bool(groups[0]._reshard_after_forward) if groups else True


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, ctx: DistContext) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over every rank's gradients -> the total norm before clipping (a plain tensor).

    Several ranks: the gradients of whole (unsharded) parameters, if any, are first summed over ranks; the norm adds the squares of every rank's shard of the sharded gradients (all-reduced) to
    those of the whole ones (equal on every rank); the clip factor is torch's: min(1, max_norm / (norm + 1e-6))."""
    if not ctx.enabled:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    whole = [g for g in grads if not hasattr(g, "to_local")]
    for g in whole:
        ctx.all_reduce_sum(g)
    from align.distributed.batches import collective_device

    sharded = torch.zeros((), dtype=torch.float64, device=collective_device(ctx))  # offloaded shards: CPU grads
    for g in grads:
        if hasattr(g, "to_local"):
            sharded += g.to_local().double().pow(2).sum().to(sharded.device)
    ctx.all_reduce_sum(sharded)
    total = sharded + sum((g.double().pow(2).sum().to(sharded.device) for g in whole), torch.zeros_like(sharded))
    norm = total.sqrt().float()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if hasattr(g, "to_local") else g).mul_(coef.to(g.device))  # a shard scales in place
    return norm


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a possibly sharded model, on the CPU, on every rank (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not fsdp_modules(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False))
