"""RolloutWorker: a `RolloutEngine` on its own copy of the policy, in-process or as a Ray actor.

In-process:  w = RolloutWorker(model_spec, tokenizer); w.load_weights(policy.state_dict(), version=0)
As an actor: a = ray.remote(RolloutWorker).options(num_cpus=1, max_restarts=2).remote(model_spec, tokenizer)

Weights are versioned. A new worker (and a restarted one: Ray re-runs the constructor) holds version -1,
weights it built itself, and refuses to sample: `generate(..., expected_version=v)` raises
`StaleWeightsError` unless the worker's version is exactly `v`, so a batch is never sampled with stale
weights unnoticed; every batch records the version that produced it (`RolloutBatch.weights_version`).
The trainer pushes the full state dict once (`kind="full"`) and afterwards LoRA adapters only
(`kind="adapters"`) when LoRA is on. `load_state_dict` copies values, so the worker's weights are bitwise the
trainer's (same dtype on both sides).

Sampling is keyed by global sample ids (counter-based noise, forced on here): which worker draws a sample
and which rows share its batch never change the tokens drawn.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from align.errors import AlignError
from align.rollouts.batch import RolloutBatch
from align.rollouts.engine import RolloutEngine
from align.rollouts.params import SamplingParams


class StaleWeightsError(AlignError, RuntimeError):
    """The worker's weights are not the version the caller asked for (a restart lost them, or a sync is missing)."""

    def __init__(self, have: int, want: int):
        super().__init__(f"rollout worker holds weights version {have}, the trainer expects {want}; push the weights again")
        self.have, self.want = have, want

    def __reduce__(self):  # keep (have, want) across Ray's exception pickling
        return (StaleWeightsError, (self.have, self.want))


@dataclass
class ModelSpec:
    """How a worker builds its policy before the trainer's weights arrive.

    path:   a local directory is loaded with from_pretrained; otherwise the model is built from `config`
            (random init; the trainer's full state dict overwrites it), so workers need no shared filesystem.
    config: the transformers config of the base model.  dtype: the trainer's parameter dtype.
    lora:   a peft LoraConfig when the trainer's policy is a LoRA model (the same adapters are created).
    """

    path: str
    config: Any
    dtype: torch.dtype = torch.float32
    trust_remote_code: bool = False
    lora: Any = None


def build_policy(spec: ModelSpec, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if spec.path and os.path.isdir(spec.path):
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_config(spec.config, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
    if spec.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, spec.lora)
    model.requires_grad_(False)
    return model.to(device).eval()


class RolloutWorker:
    """Generates shards of a step's prompts with the trainer's weights.

    engine_kwargs: RolloutEngine options (sampler_backend, micro_batch_size, max_prompt_length, gate_top_k).
    device: "auto" takes CUDA when the actor was given a GPU, else the CPU.
    """

    def __init__(self, model_spec: ModelSpec, tokenizer, engine_kwargs: dict[str, Any] | None = None,
                 device: str = "auto", num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._group_device = torch.device("cpu")
        self.samples_generated = 0
        self.reset(model_spec, tokenizer, engine_kwargs)

    def reset(self, model_spec: ModelSpec, tokenizer, engine_kwargs: dict[str, Any] | None = None) -> int:
        """(Re)build the policy and engine for `model_spec`, in this process (torch is already imported, so
        this is much cheaper than a new actor). The worker holds no weights version afterwards (-1)."""
        self.spec = model_spec
        self.model = None
        self.model = build_policy(model_spec, self.device)
        self.tokenizer = tokenizer
        kwargs = dict(engine_kwargs or {})
        kwargs["counter_noise"] = True  # sharding-independent draws (see module docstring)
        self.engine = RolloutEngine(self.model, tokenizer, device=self.device, **kwargs)
        self.version = -1  # nothing pushed yet: generate refuses until the trainer's weights arrive
        return self.version

    # ------------------------------------------------------------------------------------ weights
    def load_weights(self, state: dict[str, torch.Tensor], version: int, kind: str = "full") -> int:
        """Install the trainer's weights (`kind` "full": every tensor of the state dict; "adapters": the
        LoRA adapters from `peft.get_peft_model_state_dict`). Returns the version now held."""
        if kind == "full":
            result = self.model.load_state_dict(state, strict=True)
            del result
        elif kind == "adapters":
            if self.spec.lora is None:
                raise ValueError("adapters were pushed to a rollout worker without LoRA; push kind='full'")
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, state)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"adapter keys the worker's model lacks: {unexpected[:3]}")
        else:
            raise ValueError(f"kind = {kind!r}: use 'full' or 'adapters'")
        self.version = int(version)
        return self.version

    # ------------------------------------------------------------------------------------ collective sync
    def join_weight_group(self, init_method: str, world_size: int, rank: int, backend: str, timeout_s: float = 300) -> int:
        """Join the trainer's torch.distributed group (rank 0 = trainer) for broadcast weight syncs:
        NCCL between GPUs, gloo on CPUs."""
        import datetime

        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self._group_device = self.device if backend == "nccl" else torch.device("cpu")
        return rank

    def leave_weight_group(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def receive_weights(self, version: int, kind: str, meta: list[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
        """Receive the trainer's broadcast (one flat buffer per dtype, in `meta` order) and load it."""
        state = receive_flat(meta, self._group_device)
        return self.load_weights(state, version, kind)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The worker's current weights (CPU copies), for checks that they equal the trainer's."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def weights_version(self) -> int:
        return self.version

    # ------------------------------------------------------------------------------------ sampling
    def generate(self, prompts: list[str], columns: dict[str, list[Any]], sample_ids: torch.Tensor,
                 params: SamplingParams, expected_version: int) -> tuple[RolloutBatch, dict[str, Any]]:
        """One response per prompt. Returns the batch and a reward-ready payload (prompts, completions,
        sample_ids, columns with completion_ids) that a reward worker can take straight from the object store."""
        if self.version != expected_version:
            raise StaleWeightsError(self.version, expected_version)
        batch = self.engine.generate(prompts, params, sample_ids=sample_ids, columns=columns)
        batch.weights_version = self.version
        batch = batch.to("cpu")
        self.samples_generated += len(batch)
        return batch, reward_payload(batch, sample_ids)

    def health(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": self.version, "device": str(self.device),
                "samples_generated": self.samples_generated}


def _dtype_groups(meta: list[tuple[str, tuple[int, ...], torch.dtype]]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, (_name, _shape, dtype) in enumerate(meta):
        groups.setdefault(dtype, []).append(i)
    return groups


def broadcast_flat(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Rank 0's side: broadcast `state` as one flat buffer per dtype (few large messages, not one per tensor)."""
    import torch.distributed as dist

    tensors = list(state.values())
    meta = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    for dtype, idx in _dtype_groups(meta).items():
        buf = torch.cat([tensors[i].detach().reshape(-1).to(device) for i in idx])
        dist.broadcast(buf, src=0)


def receive_flat(meta: list[tuple[str, tuple[int, ...], torch.dtype]], device: torch.device) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    out: dict[str, torch.Tensor] = {}
    for dtype, idx in _dtype_groups(meta).items():
        sizes = [math.prod(meta[i][1]) for i in idx]
        buf = torch.empty(sum(sizes), dtype=dtype, device=device)
        dist.broadcast(buf, src=0)
        for i, part in zip(idx, buf.split(sizes)):
            out[meta[i][0]] = part.view(meta[i][1])
    return {name: out[name] for name, _, _ in meta}


def reward_payload(batch: RolloutBatch, sample_ids: torch.Tensor | list[int] | None) -> dict[str, Any]:
    """What `align.rewards.worker.RewardWorker.score` takes for `batch`; the columns, `completion_ids` and
    `stop_reason` reach the reward as keyword arguments exactly as in the in-process backend."""
    ids = None if sample_ids is None else [int(i) for i in torch.as_tensor(sample_ids).tolist()]
    return {"prompts": list(batch.prompts), "completions": list(batch.completions), "sample_ids": ids,
            "columns": batch.reward_columns()}


__all__ = ["ModelSpec", "RolloutWorker", "StaleWeightsError", "broadcast_flat", "build_policy", "receive_flat",
           "reward_payload"]
