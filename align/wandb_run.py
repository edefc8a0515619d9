"""`logging.report_to: [wandb]`: one Weights & Biases run per training run, bounded in time and cleaned up.

wandb is optional (pip install wandb). `wandb.init` starts a service process and waits for it; the wait is
bounded by `logging.wandb_init_timeout_s` (a stuck service is an error, never a hang), and `close()` finishes
the run and, when no other run of this process is active, tears the service process down so that nothing
outlives the trainer. WANDB_MODE=offline logs to RUN_DIR/wandb without a server (`wandb sync` uploads later).
The run id is kept in RUN_DIR/wandb_run_id so that `--resume` continues the same wandb run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from align.errors import UserError
from align.redact import redact_secrets

ID_FILE = "wandb_run_id"


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("logging.report_to has wandb, which needs the wandb package: pip install wandb") from None
    return wandb


class WandbRun:
    def __init__(self, run_dir: Path, *, project: str, name: str, config: dict[str, Any], timeout_s: float,
                 resume: bool = False):
        self.wandb = wandb = _import_wandb()
        id_path = Path(run_dir) / ID_FILE
        run_id = id_path.read_text().strip() if resume and id_path.is_file() else None
        try:
            self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=redact_secrets(config),
                                  id=run_id, resume="allow" if run_id else None,
                                  settings=wandb.Settings(init_timeout=float(timeout_s)))
        except Exception as err:  # wandb raises its own CommError / UsageError / TimeoutError kinds
            raise RuntimeError(f"wandb.init failed ({type(err).__name__}: {str(err)[:300]}); within "
                               f"logging.wandb_init_timeout_s={timeout_s}; WANDB_MODE=offline logs without a "
                               "server") from err
        id_path.write_text(str(self.run.id))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()
        if getattr(self.wandb, "run", None) is None:  # no other run of this process needs the service
            teardown = getattr(self.wandb, "teardown", None)
            if teardown is not None:
                teardown()
