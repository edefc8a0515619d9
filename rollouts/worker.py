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

    path:   a local directory is loaded with from_pretrained; otherwise the model is built from `config` on the
            worker's device with no weight init (the trainer's full state dict overwrites every weight), so
            workers need no shared filesystem.
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
        # Every weight is overwritten by the trainer's push before the first batch (version -1 refuses to sample),
        # so a random init is wasted work: minutes for a 7B model on an actor's one CPU thread (GPU_READINESS
        # F13). Build on the target device with the init skipped; buffers computed in __init__ (rotary
        # frequencies, which are not in the state dict) are still computed.
        from transformers.initialization import no_init_weights

        with torch.device(device), no_init_weights():
            model = AutoModelForCausalLM.from_config(spec.config, dtype=spec.dtype,
                                                     trust_remote_code=spec.trust_remote_code)
    if spec.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, spec.lora)
    model.requires_grad_(False)
    return model.to(device).eval()


class RolloutWorker:
    """Generates shards of a step's prompts with the trainer's weights.

    engine_kwargs: RolloutEngine options (sampler_backend, micro_batch_size, max_prompt_length, gate_top_k).
    device: "auto" takes CUDA when the actor was given a GPU, else the CPU.
    episodes: for tool episodes, a picklable `tokenizer -> driver` factory (align.tool_env.episodes_factory):
            the worker builds the driver, thread pool and tool timeouts included, in its own process, and
            runs `driver(engine, prompts, params, ...)` instead of `engine.generate`. A factory, not an
            import, because align.rollouts may not import align.tools (the tools live in align core's reach).
    """

    def __init__(self, model_spec: ModelSpec, tokenizer, engine_kwargs: dict[str, Any] | None = None,
                 device: str = "auto", num_threads: int | None = None, episodes=None):
        if num_threads:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._channel = None  # the trainer's broadcast group, when joined
        self.samples_generated = 0
        self.episodes = None
        self.reset(model_spec, tokenizer, engine_kwargs, episodes)

    def reset(self, model_spec: ModelSpec, tokenizer, engine_kwargs: dict[str, Any] | None = None,
              episodes=None) -> int:
        """(Re)build the policy, engine and episode driver for `model_spec`, in this process (torch is already
        imported, so this is much cheaper than a new actor). The worker holds no weights version afterwards (-1)."""
        self.close()
        self.spec = model_spec
        self.model = None
        self.model = build_policy(model_spec, self.device)
        self.tokenizer = tokenizer
        kwargs = dict(engine_kwargs or {})
        kwargs["counter_noise"] = True  # sharding-independent draws (see module docstring)
        self.engine = RolloutEngine(self.model, tokenizer, device=self.device, **kwargs)
        self.episodes = episodes(tokenizer) if episodes is not None else None
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
    def join_weight_group(self, host: str, port: int, world_size: int, rank: int, backend: str, timeout_s: float = 300) -> int:
        """Join the trainer's private broadcast group (rank 0 = trainer; `align.rollouts.weight_buckets`):
        NCCL between GPUs, gloo on CPUs. Not the default process group: this process stays free for others."""
        from align.rollouts.weight_buckets import WeightChannel

        self.leave_weight_group()
        device = self.device if backend == "nccl" else torch.device("cpu")
        self._channel = WeightChannel(host, port, rank, world_size, backend, timeout_s, device)
        return rank

    def leave_weight_group(self) -> None:
        channel, self._channel = getattr(self, "_channel", None), None
        if channel is not None:
            channel.close()

    def receive_weights(self, version: int, kind: str, entries: list, buckets: list) -> int:
        """Receive the trainer's bucketed broadcast straight into this model's tensors (`kind` "full": the state
        dict; "adapters": the LoRA adapters). Bounded by the group's timeout; a failed receive leaves the worker
        holding no version (-1), so it refuses to sample until the trainer pushes the weights again."""
        from align.rollouts.weight_buckets import receive_buckets

        if getattr(self, "_channel", None) is None:
            raise RuntimeError("receive_weights: this worker is not in a weight group (join_weight_group first)")
        if kind == "adapters":
            if self.spec.lora is None:
                raise ValueError("adapters were pushed to a rollout worker without LoRA; push kind='full'")
            from peft import get_peft_model_state_dict

            targets = get_peft_model_state_dict(self.model)  # views of the adapter parameters
        else:
            targets = self.model.state_dict()  # views of the parameters and buffers
        self.version = -1  # partially written weights are no version
        receive_buckets(targets, entries, buckets, self._channel)
        self.version = int(version)
        return self.version

    def device_uuid(self) -> str:
        """The GPU's uuid ("" on the CPU): two NCCL ranks on one GPU are refused ("Duplicate GPU detected")."""
        if self.device.type != "cuda":
            return ""
        return str(torch.cuda.get_device_properties(self.device).uuid)

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
        if self.episodes is not None:  # tool_mask and columns["trajectory"] travel with the batch
            batch = self.episodes(self.engine, prompts, params, sample_ids=sample_ids, columns=columns)
        else:
            batch = self.engine.generate(prompts, params, sample_ids=sample_ids, columns=columns)
        batch.weights_version = self.version
        batch = batch.to("cpu")
        self.samples_generated += len(batch)
        return batch, reward_payload(batch, sample_ids)

    def close(self) -> None:
        """Stop the episode driver's tool pool (the actor may be parked and reset for another run)."""
        driver, self.episodes = self.episodes, None
        if driver is not None:
            driver.close()

    def health(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": self.version, "device": str(self.device),
                "samples_generated": self.samples_generated}


def reward_payload(batch: RolloutBatch, sample_ids: torch.Tensor | list[int] | None) -> dict[str, Any]:
    """What `align.rewards.worker.RewardWorker.score` takes for `batch`; the columns, `completion_ids` and
    `stop_reason` reach the reward as keyword arguments exactly as in the in-process backend."""
    ids = None if sample_ids is None else [int(i) for i in torch.as_tensor(sample_ids).tolist()]
    return {"prompts": list(batch.prompts), "completions": list(batch.completions), "sample_ids": ids,
            "columns": batch.reward_columns()}


__all__ = ["ModelSpec", "RolloutWorker", "StaleWeightsError", "build_policy", "reward_payload"]
