"""One rank of tests/distributed/test_sharded_checkpoint.py, launched as torchrun would (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment): `python _dcp_worker.py MODEL_DIR OUT_DIR`.

Per rank: the tiny model loaded through align.models.load_models (policy + separate critic), FSDP2
`fully_shard`-ed per decoder layer over the gloo group, AdamW (two groups, as the trainer builds it) after one
step; the full state gathered (reference), a sharded checkpoint saved, the policy's logits on a fixed input;
then fresh, differently initialised models loaded from the checkpoint at 2 ranks and gathered again; and the
same for a LoRA policy's adapter export.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from align.config import LoraConfig, ModelConfig  # noqa: E402
from align.distributed import checkpoint as shards  # noqa: E402
from align.distributed import init_from_env  # noqa: E402
from align.models import load_models  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 3, 7]])
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(model_dir: str, lora: bool = False, noise_seed: int | None = None):
    cfg = ModelConfig(path=model_dir, lora=LoraConfig(enabled=lora, r=4, alpha=8))
    torch.manual_seed(0)  # as the trainer seeds before loading: the value head's (and LoRA's) init is random
    models = load_models(cfg, torch.device("cpu"), need_reference=False, critic=None if lora else "separate")
    if noise_seed is not None:  # a different starting point, so a load that changes nothing cannot pass
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in models.policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    base = models.policy.get_base_model() if lora else models.policy
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(models.policy)
    if models.critic is not None:
        for layer in models.critic.backbone.layers:
            fully_shard(layer)
        fully_shard(models.critic)
    groups = [{"params": models.trainable_parameters(), "lr": 1e-2}]
    if models.critic is not None:
        groups.append({"params": models.critic_parameters(), "lr": 3e-2})
    return models, torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.01)


def one_step(models, optimizer) -> None:
    ids = torch.arange(2, 26).reshape(2, 12) % 30 + 1
    loss = models.policy(input_ids=ids, labels=ids).loss
    if models.critic is not None:
        values = models.critic(ids, torch.ones_like(ids), torch.arange(12).expand(2, 12))
        loss = loss + (values - 1.0).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def gathered(models, optimizer) -> dict:
    container = shards.model_container(models.policy, models.value_head, models.critic)
    model_sd, optim_sd = get_state_dict(container, optimizer, options=FULL)
    return {"model": model_sd, "optim": optim_sd}


def logits(policy) -> torch.Tensor:
    with torch.no_grad():
        return policy(input_ids=IDS).logits.float()


def main(model_dir: str, out: Path) -> None:
    ctx = init_from_env(timeout_s=60, backend="gloo")
    models, optimizer = build(model_dir)
    one_step(models, optimizer)
    reference, policy_logits = gathered(models, optimizer), logits(models.policy)
    trainer_state = {"algorithm": "ppo", "samples_seen": 4, "sampler": {"epoch": 0, "index": 2}}
    ckpt = shards.save_sharded_checkpoint(out / "run", 1, models, models.tokenizer, optimizer, trainer_state,
                                          {"algorithm": "ppo"}, keep_last=2, ctx=ctx)
    fresh, fresh_opt = build(model_dir, noise_seed=7)
    before = gathered(fresh, fresh_opt)
    shards.load_sharded_checkpoint(ckpt, fresh, fresh_opt)
    loaded = gathered(fresh, fresh_opt)

    lora, lora_opt = build(model_dir, lora=True)
    one_step(lora, lora_opt)
    lora_logits = logits(lora.policy)
    ctx.barrier()
    shards.export_pretrained(out / "lora-export", lora.policy, lora.tokenizer, ctx)
    try:  # a data cursor that differs between ranks cannot be stored once: the save refuses it
        shards.check_global_state({"step": 1, "sampler": {"epoch": 0, "index": 2 + ctx.rank}}, ctx)
        refused = ""
    except Exception as err:
        refused = str(err)
    if ctx.is_main:
        torch.save({"refused": refused, "reference": reference, "before": before, "loaded_at_2": loaded, "logits": policy_logits,
                    "lora_logits": lora_logits, "checkpoint": str(ckpt)}, out / "rank0.pt")
    ctx.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
