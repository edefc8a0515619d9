"""What a trainer needs to run as one of several ranks: start-up checks, rank-0-only logging, collective failures
as one line, and the zero-weight pass a rank owes when it holds none of a micro-batch's rows."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from align.distributed.context import DistContext, DistributedError
from align.distributed.ray_trainers import rollouts_colocated
from align.errors import UserError


def check_world(cfg: Any, ctx: DistContext) -> None:
    """One-line errors for what a multi-rank run does not support (docs/distributed.md "Limits")."""
    if not ctx.enabled:
        return
    w = ctx.world_size
    if cfg.train.prompts_per_step % w:
        raise UserError(f"train.prompts_per_step = {cfg.train.prompts_per_step} must divide by the world size {w} "
                        "(each rank takes whole prompt groups); set it to a multiple of the number of ranks")
    dynamic = getattr(cfg.algo, "dynamic_sampling", None)
    if dynamic is not None and dynamic.enable:
        raise UserError(f"algo.dynamic_sampling.enable = true is not supported with {w} ranks yet (refill rounds "
                        "would differ between ranks); set it to false or train on one rank")
    curiosity = cfg.reward.curiosity
    if curiosity is not None and curiosity.eta > 0:
        raise UserError(f"reward.curiosity is not supported with {w} ranks yet (its ICM is not sharded); "
                        "set reward.curiosity.eta = 0 or train on one rank")
    if cfg.cluster.backend == "ray" and not rollouts_colocated(cfg):  # the question Trainer._make_backend asks
        raise UserError(f"cluster.backend = 'ray' is not supported under torchrun ({w} ranks): each rank "
                        "generates its own share in-process; set cluster.backend: local")
    if getattr(cfg.train, "max_staleness", 0):
        raise UserError(f"train.max_staleness = {cfg.train.max_staleness} is not supported with {w} ranks yet; "
                        "set it to 0 or train on one rank")


class NullLogger:
    """The metrics logger of ranks other than 0: rank 0 alone writes the run's files."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def collective_errors(ctx: DistContext) -> Iterator[None]:
    """A failed or timed-out collective (a rank died, stalled past distributed.timeout_s, or its connection
    dropped) becomes one DistributedError line naming this rank; a world of one passes errors through."""
    import torch.distributed as dist

    try:
        yield
    except (dist.DistError, RuntimeError) as err:
        if not ctx.enabled or isinstance(err, DistributedError) or not _is_collective_failure(err):
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise DistributedError(f"rank {ctx.rank}/{ctx.world_size}: a collective failed ({first}); another rank "
                               "died or stalled past distributed.timeout_s: see that rank's log") from None


def _is_collective_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    # a peer that died drops its connections; one that stalls lets the collective time out
    return any(s in text for s in ("timed out", "timeout", "connection", "closed by peer", "reset by peer"))


def zero_weight_pass(trainer: Any, step: Any, response_len: int) -> None:
    """One forward/backward of the trainer's loss on local row 0, times 0: it adds nothing to any gradient but
    runs every sharded module's all-gather and reduce-scatter, matching a busier rank's micro-batch."""
    from align.trainer.forward import position_ids_from_mask, response_forward

    models, b = trainer.models, step.batch
    row = torch.zeros(1, dtype=torch.long, device=b.input_ids.device)
    fwd = response_forward(models.policy, b.input_ids[row], b.attention_mask[row], response_len,
                           value_head=models.value_head, with_entropy=True, temperature=trainer.logprob_temperature)
    if models.critic is not None:
        att = b.attention_mask[row]
        fwd.values = models.critic(b.input_ids[row], att, position_ids_from_mask(att))[:, -response_len - 1:-1]
    old = step.old_logprobs[row] if step.old_logprobs is not None else fwd.logprobs.detach()
    loss, _ = trainer.algo.loss(fwd, step, row, old, 1.0, 1.0)
    (loss * 0.0).backward()


@torch.no_grad()
def idle_logprob_pass(trainer: Any, step: Any, want_old: bool) -> None:
    """The logprobs phase's forwards (policy, critic, reference, as configured) on local row 0, outputs dropped:
    a rank with fewer chunks than the busiest one (token-budget micro-batches) still joins every all-gather."""
    from align.trainer.forward import position_ids_from_mask, response_forward

    models, b = trainer.models, step.batch
    t = b.response_ids.shape[1]
    ids, att = b.input_ids[:1], b.attention_mask[:1]
    if want_old or trainer.algo.uses_critic:
        response_forward(models.policy, ids, att, t, value_head=models.value_head,
                         temperature=trainer.logprob_temperature)
    if models.critic is not None:
        models.critic(ids, att, position_ids_from_mask(att))
    if trainer.algo.needs_reference or trainer.curiosity is not None:
        with models.reference_mode() as ref_model:
            response_forward(ref_model, ids, att, t, temperature=trainer.logprob_temperature)
