"""The rank bookkeeping without processes: row shares, global rows, metric reductions, whitening over ranks,
start-up refusals; and (GPU) FSDP2 with bf16 mixed precision and CPU offload."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from align import algos
from align.config import GRPOConfig
from align.distributed.batches import global_train_rows, local_share, owned_rows, reduce_metrics
from align.distributed.context import DistContext
from align.distributed.setup import check_world
from align.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class TwoRanks(DistContext):
    """Rank `rank` of 2, whose peer holds `peer` (the same shape): all_reduce_sum adds it, gathers return both."""

    peer: object = None

    def all_reduce_sum(self, tensor):
        tensor += self.peer
        return tensor

    def all_gather_objects(self, obj):
        return [obj, self.peer] if self.rank == 0 else [self.peer, obj]


def test_ranks_split_the_cores_between_their_threads(monkeypatch):
    import os

    from align.distributed.context import rank_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert rank_threads() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # more ranks than cores: still one thread each
    assert rank_threads() == 1


def test_each_rank_takes_a_contiguous_share_of_whole_prompts():
    prompts = list(range(8))
    shares = [local_share(DistContext(rank=r, world_size=2), prompts) for r in (0, 1)]
    assert shares == [([0, 1, 2, 3], 0), ([4, 5, 6, 7], 4)]
    assert local_share(DistContext(), prompts) == (prompts, 0)


def test_global_rows_and_the_rows_a_rank_owns():
    # 4 rows per rank; rank 0 trains local rows 1, 3; rank 1 trains local rows 0, 2 (global 4, 6)
    peer_keep = torch.tensor([0, 0, 0, 0, 1, 0, 1, 0], dtype=torch.int32)
    ctx = TwoRanks(rank=0, world_size=2, peer=peer_keep)
    rows = global_train_rows(ctx, torch.tensor([1, 3]), 4)
    assert rows.tolist() == [1, 3, 4, 6]  # sorted, as one process's train_rows
    mini = torch.tensor([6, 1, 4])  # a minibatch in the global shuffled order
    assert owned_rows(DistContext(rank=0, world_size=2), mini, 4).tolist() == [1]
    assert owned_rows(DistContext(rank=1, world_size=2), mini, 4).tolist() == [2, 0]  # global 6, 4 -> local
    assert owned_rows(DistContext(), mini, 4) is mini


def test_logged_metrics_follow_their_reduction_rule():
    mine = {"reward/mean": 0.25, "loss/policy": 0.5, "rollout/tokens": 10.0, "time/step": 1.0, "reward/max": 0.9,
            "reward/min": 0.1, "rollout/logprob_diff_max": 1e-3, "policy/clipfrac": 0.2, "train/grad_norm": 2.0}
    peer = {"reward/mean": 0.25, "loss/policy": -0.125, "rollout/tokens": 14.0, "time/step": 3.0, "reward/max": 0.9,
            "reward/min": 0.1, "rollout/logprob_diff_max": 4e-3, "policy/clipfrac": 0.4, "train/grad_norm": 2.0,
            "reward/sandbox_bwrap": 3.0}
    out = reduce_metrics(TwoRanks(rank=0, world_size=2, peer=peer), mine)
    assert out == {"reward/mean": 0.25, "loss/policy": 0.375, "rollout/tokens": 24.0, "time/step": 3.0,
                   "reward/max": 0.9, "reward/min": 0.1, "rollout/logprob_diff_max": 4e-3,
                   "policy/clipfrac": pytest.approx(0.3), "train/grad_norm": 2.0, "reward/sandbox_bwrap": 3.0}
    assert reduce_metrics(DistContext(), mine) is mine
    # tool episodes: token totals add up over ranks; per-row means and shares are averaged
    tools = {"rollout/policy_tokens": 28.0, "rollout/tool_tokens": 12.0, "rollout/policy_length": 3.5,
             "rollout/tool_rows": 0.5}
    other = {"rollout/policy_tokens": 30.0, "rollout/tool_tokens": 6.0, "rollout/policy_length": 3.75,
             "rollout/tool_rows": 0.25}
    assert reduce_metrics(TwoRanks(rank=1, world_size=2, peer=other), tools) == {
        "rollout/policy_tokens": 58.0, "rollout/tool_tokens": 18.0, "rollout/policy_length": 3.625,
        "rollout/tool_rows": 0.375}


def test_whitening_over_ranks_is_whitening_of_the_whole_batch():
    # two ranks holding the same rows: the global batch is the rows twice; reduce doubles every partial sum
    torch.manual_seed(0)
    x, mask = torch.randn(3, 5), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    want = algos.masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]))[:3]
    got = algos.masked_whiten(x, mask, reduce=lambda t: 2 * t)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    mean = (x * mask).sum() / mask.sum()
    assert torch.isclose(algos.masked_mean(x, mask, reduce=lambda t: 2 * t), mean)
    assert not torch.equal(algos.masked_whiten(x, mask), want)  # the statistics did change with the count


def test_start_up_refusals_are_one_line(tmp_path):
    cfg = GRPOConfig(model={"path": "m"}, data={"path": "d"}, reward={"functions": ["format"]},
                     train={"prompts_per_step": 3})
    with pytest.raises(UserError, match="prompts_per_step = 3 must divide by the world size 2") as err:
        check_world(cfg, DistContext(rank=0, world_size=2))
    assert "\n" not in str(err.value)
    check_world(cfg, DistContext())  # one process: anything goes
    dyn = GRPOConfig(model={"path": "m"}, data={"path": "d"}, reward={"functions": ["format"]},
                     train={"prompts_per_step": 4}, algo={"dynamic_sampling": {"enable": True}})
    with pytest.raises(UserError, match="dynamic_sampling.enable = true is not supported with 2 ranks"):
        check_world(dyn, DistContext(rank=1, world_size=2))
    with pytest.raises(ConfigError, match="distributed.timeout_s = 0"):
        GRPOConfig(model={"path": "m"}, data={"path": "d"}, reward={"functions": ["format"]},
                   distributed={"timeout_s": 0})


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_bf16_mixed_precision_and_cpu_offload_on_gpu(tmp_path):
    """One NCCL rank: bf16 compute, fp32 shards (offloaded to the CPU), an optimizer step changes the weights."""
    import os

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from align.distributed.fsdp import shard_module
    from align.testing import make_tiny_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29655", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("cuda:nccl,cpu:gloo", rank=0, world_size=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m")).cuda()
        cfg = type("D", (), {"mixed_precision": "bf16", "cpu_offload": True, "reshard_after_forward": True})()
        shard_module(model.get_decoder(), cfg)
        layer = model.get_decoder().layers[0]
        shard = next(layer.parameters())
        assert shard.to_local().device.type == "cpu" and shard.dtype == torch.float32
        seen = []
        hook = layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        ids = torch.randint(0, model.config.vocab_size, (2, 8), device="cuda")
        before = shard.to_local().clone()
        opt = torch.optim.AdamW([p for p in model.get_decoder().parameters()], lr=1e-2)
        model.get_decoder()(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()
        opt.step()
        hook.remove()
        assert seen == [torch.bfloat16]
        assert not torch.equal(shard.to_local(), before)
    finally:
        dist.destroy_process_group()
