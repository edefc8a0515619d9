"""Generation: the in-process engine (KV cache, bucketing, batched decode), sampling parameters, the batch type,
and the Ray rollout actor."""
from align.rollouts.batch import RolloutBatch
from align.rollouts.engine import RolloutEngine
from align.rollouts.params import SamplingParams
from align.rollouts.worker import RolloutWorker

__all__ = ["RolloutBatch", "RolloutEngine", "RolloutWorker", "SamplingParams"]
