"""One local Ray for a test module: 1 torch thread per actor, no dashboard, offline hub; parked rollout workers
released before the shutdown so the next module starts clean."""
from __future__ import annotations

from typing import Iterator


def local_ray(num_cpus: int) -> Iterator:
    import ray

    from align.backends.ray import release_parked_workers

    if ray.is_initialized():  # another module's Ray: start ours with the resources this module plans for
        ray.shutdown()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    try:
        yield ray
    finally:
        release_parked_workers()
        ray.shutdown()
