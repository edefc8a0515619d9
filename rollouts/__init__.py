"""Generation: the in-process engine (KV cache, bucketing, batched decode), sampling parameters, the batch type,
and the Ray rollout actor."""
if __name__ != "align.rollouts":  # imported as bare `rollouts` from a checkout: see align/_bare_names.py
    from align._bare_names import hand_over

    hand_over(__name__, __file__)
else:
    from align.rollouts.batch import RolloutBatch
    from align.rollouts.engine import RolloutEngine
    from align.rollouts.params import SamplingParams
    from align.rollouts.worker import RolloutWorker

    __all__ = ["RolloutBatch", "RolloutEngine", "RolloutWorker", "SamplingParams"]
