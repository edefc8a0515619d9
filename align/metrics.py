"""Run logging: `metrics.jsonl` (one flat `phase/name -> float` dict per step), optional TensorBoard / wandb,
completions tables, a progress line, `plot_run` (reward / KL / loss curves to PNG), and the diversity metrics of CD-RLHF."""
from __future__ import annotations

import html
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


COMPLETIONS_FILE = "completions.jsonl"


class MetricsLogger:
    """Step metrics to each reporter of `logging.report_to`: jsonl (RUN_DIR/metrics.jsonl), tensorboard
    (RUN_DIR/tb), wandb (align.wandb_run); completions tables to RUN_DIR/completions.jsonl (always, when
    asked for), TensorBoard text and a wandb Table."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, resume: bool = False, *,
                 report_to: tuple[str, ...] | list[str] = ("jsonl",), wandb: dict[str, Any] | None = None):
        reporters = list(dict.fromkeys([*report_to, *(["tensorboard"] if tensorboard else [])]))
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.completions_path = self.run_dir / COMPLETIONS_FILE
        self.jsonl = "jsonl" in reporters
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            for path in (self.path, self.completions_path):
                if path.exists():
                    path.unlink()
        self.writer = None
        self.wandb = None
        if "tensorboard" in reporters:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.report_to has tensorboard, which needs the tensorboard package: "
                                "pip install tensorboard") from None
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self._wandb_args = None
        if "wandb" in reporters:
            self._wandb_args = wandb or {"project": "align", "name": self.run_dir.name, "config": {}, "timeout_s": 90.0}
            self._open_wandb(resume)

    def _open_wandb(self, resume: bool) -> None:
        from align.wandb_run import WandbRun

        self.wandb = WandbRun(self.run_dir, resume=resume, **self._wandb_args)

    def _wandb(self):
        """The wandb run; after close() (Trainer.train ends, a time-boxed job calls it again) the same run resumes."""
        if self.wandb is None and self._wandb_args is not None:
            self._open_wandb(resume=True)
        return self.wandb

    @classmethod
    def for_run(cls, run_dir: Path, logging_cfg: Any, config: dict[str, Any], resume: bool = False) -> MetricsLogger:
        return cls(run_dir, resume=resume, report_to=logging_cfg.reporters,
                   wandb={"project": logging_cfg.wandb_project, "name": logging_cfg.name, "config": config,
                          "timeout_s": logging_cfg.wandb_init_timeout_s})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.jsonl:
            record = {"step": step, **{k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, float(v), step)
        if self._wandb_args is not None:
            self._wandb().log(step, metrics)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """One completions table: a line per row in completions.jsonl, TensorBoard text, a wandb Table."""
        with self.completions_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self.writer is not None:
            self.writer.add_text("completions", completions_markdown(rows), step)
        if self._wandb_args is not None:
            columns = list(dict.fromkeys(k for row in rows for k in _flat(row)))
            self._wandb().log_table(step, "completions", columns, [[_flat(row).get(c) for c in columns] for row in rows])

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be re-run)."""
        for path in (self.path, self.completions_path):
            if path.exists():
                keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """{"rewards": {"f": 1.0}} -> {"reward/f": 1.0}: one column per reward function."""
    out = {k: v for k, v in row.items() if k != "rewards"}
    out |= {f"reward/{name}": v for name, v in (row.get("rewards") or {}).items()}
    return out


def _cell(value: Any) -> str:
    # policy text is hostile: HTML-escaped, no table breaks (TensorBoard renders markdown)
    text = "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
    return html.escape(text).replace("|", "&#124;").replace("\r", "").replace("\n", "<br>")


def completions_markdown(rows: list[dict[str, Any]]) -> str:
    flat = [_flat(row) for row in rows]
    columns = list(dict.fromkeys(k for row in flat for k in row))
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in flat]
    return "\n".join(lines)


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
