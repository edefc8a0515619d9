"""Run logging: `metrics.jsonl` (one flat `phase/name -> float` dict per step), optional TensorBoard,
a progress line, `plot_run` (reward / KL / loss curves to PNG), and the diversity metrics of CD-RLHF."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from align.errors import UserError


def __getattr__(name: str) -> Any:
    # diversity pulls nltk / sentence-transformers: load it only when asked for
    if name == "diversity":
        from align.diversity import diversity

        return diversity
    raise AttributeError(f"module 'align.metrics' has no attribute {name!r}")


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = False, resume: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard = true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, float(v), step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be re-run)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; give the run directory of an `align train` run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PLOT_KEYS = (("reward/mean", "reward"), ("kl/mean", "KL to reference"), ("loss/policy", "policy loss"),
             ("rollout/response_length", "response length"))


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a PNG of the run's reward, KL, loss and length curves; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    panels = [(k, title) for k, title in PLOT_KEYS if any(r.get(k) is not None for r in records)]
    if not panels:
        raise UserError(f"{run_dir}: metrics.jsonl holds none of {', '.join(k for k, _ in PLOT_KEYS)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
