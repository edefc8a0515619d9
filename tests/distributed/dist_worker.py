"""A training run for the multi-rank tests, on one rank or under torchrun / hand-set RANK variables.

    python dist_worker.py CONFIG.json OUT.pt [CONFIG.json OUT.pt ...]     one process
    torchrun --nproc_per_node 2 dist_worker.py CONFIG.json OUT.pt [...]   the runs one after another, one start-up

Rank 0 writes OUT.pt: the step history, the full (gathered) weights of the policy, value head and critic, and
the layout of its shard of the output embedding.
The reward instances below are importable as `dist_worker:NAME` by the runs' configs (tests put this folder on
PYTHONPATH).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from align.testing import CharFraction, WrappedBackend


class FailingRank(CharFraction):
    """CharFraction, except that rank `rank` dies (os._exit) or stalls (sleeps) on its `call`-th scoring call."""

    def __init__(self, rank=1, call=2, how="die"):
        super().__init__()
        self.rank, self.call, self.how, self.calls = rank, call, how, 0

    def __call__(self, prompts, completions, **kwargs):
        self.calls += 1
        if int(os.environ.get("RANK", "0")) == self.rank and self.calls == self.call:
            if self.how == "die":
                os._exit(17)
            time.sleep(3600)
        return super().__call__(prompts, completions, **kwargs)


class ContentToolEpisodes(WrappedBackend):
    """A Backend around the trainer's own whose batches become tool episodes: response tokens whose id is a
    multiple of 3 (after the first) are observation tokens, with rollout log-probs -30 there, and every row gets
    a trajectory column. Keyed by content, not by row index, so a rank's share of the rows is marked exactly as
    in the one-process run."""

    def generate(self, prompts, columns, sample_ids, params):
        b = self.inner.generate(prompts, columns, sample_ids, params)
        tool = (b.response_ids % 3 == 0) & b.mask.bool()
        tool[:, 0] = False
        b.tool_mask = tool.to(b.mask.dtype)
        b.logprobs = torch.where(tool, torch.full_like(b.logprobs, -30.0), b.logprobs)
        if b.sampling_logprobs is not None:
            b.sampling_logprobs = torch.where(tool, torch.full_like(b.logprobs, -30.0), b.sampling_logprobs)
        b.columns["trajectory"] = [[{"role": "assistant", "content": c}] for c in b.completions]
        return b


def build_trainer(spec: dict):
    """A Trainer from a run config, or from {"config": ..., "backend": "tool_episodes"} (its backend wrapped)."""
    from align.trainer.loop import Trainer

    if "backend" not in spec:
        return Trainer(spec)
    trainer = Trainer(spec["config"])
    trainer.backend = {"tool_episodes": ContentToolEpisodes}[spec["backend"]](trainer.backend)
    return trainer


frac7 = CharFraction("7")
die_rank1_call2 = FailingRank(1, 2, "die")
stall_rank1_call2 = FailingRank(1, 2, "stall")


def main(config_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    from align.distributed.fsdp import full_state_dict

    trainer = build_trainer(json.loads(open(config_path).read()))
    try:
        result = trainer.train()
    finally:
        trainer.close()
    models = trainer.models
    weights = {"policy": full_state_dict(models.policy)}
    if models.value_head is not None:
        weights["value_head"] = full_state_dict(models.value_head)
    if models.critic is not None:
        weights["critic"] = full_state_dict(models.critic)
    from align.models import decoder_and_head

    w = decoder_and_head(models.policy)[1].weight  # the output embedding: sharded in the root unit
    head = {"dtensor": hasattr(w, "to_local"), "rows": tuple(w.shape)[0],
            "local_rows": (w.to_local() if hasattr(w, "to_local") else w).shape[0]}
    if trainer.dist.is_main:
        torch.save({"history": result.history, "weights": weights, "world": trainer.dist.world_size, "head": head},
                   out_path)


if __name__ == "__main__":
    args = sys.argv[1:]
    for i in range(0, len(args), 2):
        main(args[i], args[i + 1])
