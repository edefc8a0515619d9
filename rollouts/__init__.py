"""Generation: the in-process engine (KV cache, bucketing, batched decode), sampling parameters, the batch type,
and the Ray rollout actor."""
from rollouts.batch import RolloutBatch
from rollouts.engine import RolloutEngine
from rollouts.params import SamplingParams
from rollouts.worker import RolloutWorker

__all__ = ["RolloutBatch", "RolloutEngine", "RolloutWorker", "SamplingParams"]
