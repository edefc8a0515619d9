"""One rank of tests/distributed/test_resume_world_size.py, launched as torchrun launches
`align.cli train` (RANK / WORLD_SIZE / MASTER_* set): `python _resume_worker.py MODEL DATA ROOT`.

The documented SPMD launch: `align.distributed.init_from_env()`, then a Trainer in every rank; rank 0 writes the
run's per-step history and the final policy + value head weights (gathered from any sharding) to OUT.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

import align  # noqa: E402
from align.distributed import checkpoint as shards  # noqa: E402
from align.distributed import init_from_env  # noqa: E402
from align.testing import tiny_run_config  # noqa: E402

STEPS = 3
SAVED_AT = 2


def odd_digits(prompts, completions, **kwargs):  # varies within a batch, so every step updates the policy
    return [float(sum(ch in "13579" for ch in c)) for c in completions]


def run_config(model: str, data: str, run_dir: str) -> dict:
    base = {"train": {"steps": STEPS, "prompts_per_step": 4, "lr": 1e-3, "mini_batch_size": 2},
            "rollout": {"max_new_tokens": 4},
            "checkpoint": {"every": SAVED_AT, "save_final": False}}
    return tiny_run_config("ppo", model, data, run_dir, odd_digits, base)


def final_weights(trainer) -> dict[str, torch.Tensor]:
    """Collective: the policy's and value head's full weights (rank 0; the others get an empty dict)."""
    container = shards.model_container(trainer.models.policy, trainer.models.value_head, trainer.models.critic)
    return get_model_state_dict(container, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def run(model: str, data: str, run_dir: Path, out: Path, ctx, resume: Path | None = None) -> None:
    trainer = align.Trainer(run_config(model, data, str(run_dir)), resume_from=resume)
    try:
        assert trainer.step == (0 if resume is None else SAVED_AT)
        result = trainer.train(max_steps=SAVED_AT if resume is None else None)
        weights = final_weights(trainer)
    finally:
        trainer.close()
    if ctx.is_main:
        torch.save({"history": result.history, "weights": weights, "world_size": ctx.world_size}, out)
    ctx.barrier()


def resume_copy(model: str, data: str, source: Path, name: str, root: Path, ctx) -> None:
    """A fresh Trainer per rank resumes a copy of `source` (so each resume writes only its own run)."""
    if ctx.is_main:
        shutil.copytree(source, root / name)
    ctx.barrier()
    run(model, data, root / name, root / f"{name}.pt", ctx, resume=root / name)


def main(model: str, data: str, root: Path, one_process_run: Path) -> None:
    """root/run: 2 steps, checkpointed; then, in the same launch (to start the ranks once), the last step
    resumed from a copy of it and from a copy of `one_process_run` (a one-process run's step-2 checkpoint)."""
    ctx = init_from_env(timeout_s=120, backend="gloo")
    run(model, data, root / "run", root / "first.pt", ctx)
    resume_copy(model, data, root / "run", "resumed-at-2", root, ctx)
    resume_copy(model, data, one_process_run, "one-process-resumed-at-2", root, ctx)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
