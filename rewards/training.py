"""Reward-model training and evaluation: pairwise Bradley-Terry for classifier RMs, the released Themis loss
(lm_coef * LM + rm_coef * BT) for tool-augmented RMs; pairwise accuracy per tool group.

`train_reward_model(RMTrainConfig)` and `evaluate_reward_model(config_or_checkpoint, sources)` back the
`align train-rm` / `align eval-rm` commands (the config: align.command_configs.RMTrainConfig). Data sources
(lists of strings):
  "tara:calendar,weather[:test]"  TARA groups (train split for training, test split for evaluation)
  "path/to/pairs.jsonl"           JSON Lines: prompt / chosen / rejected [/ group]  or TARA-format lines
  "hf:NAME[:SPLIT]"               a Hugging Face dataset with prompt / chosen / rejected columns
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from align.algos.schedule import lambda_lr
from align.errors import MissingFileError
from align.rewards.data_parallel import Ranks, current_ranks
from align.rewards.preference_pairs import (  # noqa: F401  (re-exported)
    PreferencePair,
    ToolObserver,
    _pair_from_record,
    classifier_text,
    load_pairs,
    load_sources,
)
from align.rewards.tara import (
    PLAIN_TEMPLATE,
    render_item,
)

# ----- configs ---------------------------------------------------------------------------------------------
# The config (`align.command_configs.RMTrainConfig`: model / data / train / themis sections and output_dir) is
# built and validated in the core by align.config's machinery (align.rewards may not import align.config); the
# functions here read its fields.


@dataclass
class RMTrainResult:
    output_dir: str
    steps: int
    train_seconds: float
    metrics: dict[str, Any]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, pair_total: int | None = None) -> torch.Tensor:
    """mean(-log sigmoid(r_w - r_l)) over [B] pairs (Bradley-Terry / InstructGPT RM loss); pair_total: the pairs
    of the whole data-parallel batch (default B), so that the ranks' losses sum to the whole batch's."""
    return -F.logsigmoid(r_chosen - r_rejected).sum() / (pair_total or r_chosen.shape[0])


def pairwise_accuracy(r_chosen: Sequence[float], r_rejected: Sequence[float]) -> float:
    """Fraction of pairs with r(pos) > r(neg) (ties count as wrong)."""
    if not len(r_chosen):
        return float("nan")
    return sum(float(a) > float(b) for a, b in zip(r_chosen, r_rejected)) / len(r_chosen)


def _schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Cosine decay after a warm-up from lr 0 (the numbers of Hugging Face's get_cosine_schedule_with_warmup)."""
    return lambda_lr(optimizer, max(1, total_steps), max(0, round(warmup_ratio * total_steps)), "cosine", ramp="zero")


def _optimizer(params, cfg: Any):  # cfg: the config's train section
    decay, no_decay = [], []
    for name, p in params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _optimizer_step(loss: torch.Tensor, step: int, model, opt, sched, grad_clip: float, ranks: Ranks = Ranks(),
                    batch_loss: float | None = None) -> float:
    """backward + (summed over data-parallel ranks) + clip + step; a non-finite loss stops before the optimizer.
    batch_loss: the whole batch's loss (the ranks' sum), so every rank stops together. Returns the gradient norm."""
    if not math.isfinite(float(loss.detach()) if batch_loss is None else batch_loss):
        raise FloatingPointError(f"non-finite RM loss at step {step}; lower train.lr or check the data (NaN never reaches the optimizer)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    ranks.sum_gradients(model)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    return float(gnorm)


def train_reward_model(cfg: Any, log: Callable[[str], None] = print) -> RMTrainResult:
    """Train the RM the config describes, save it to cfg.output_dir, evaluate on data.eval; returns metrics.

    Under torchrun (the command joined the process group) the ranks train data-parallel
    (align.rewards.data_parallel): the same steps as one process, each rank computing its share of every batch;
    rank 0 alone logs, writes the checkpoint and metrics, and evaluates."""
    if not cfg.data.train:
        raise ValueError("data.train is empty: nothing to train on")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ranks = current_ranks()
    log = log if ranks.is_main else (lambda s: None)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        (out / "rm_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    pairs = load_sources(cfg.data.train, "train", cfg.data.limit)
    if not pairs:
        raise ValueError(f"data.train {cfg.data.train} holds no pairs")
    t0 = time.perf_counter()
    if cfg.model.kind == "classifier":
        steps, history, local_pairs, lengths = _train_classifier(cfg, pairs, out, log, ranks)
    else:
        steps, history, local_pairs, lengths = _train_themis(cfg, pairs, out, log, ranks)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {"train/steps": steps, "train/seconds": seconds, "train/pairs": len(pairs),
                               "train/ranks": ranks.world_size, **lengths,
                               # the pairs each rank forwarded: the batches' split, checkable from outside
                               "train/rank_pairs": [int(n) for n in ranks.gather(local_pairs)]}
    # the last collective: no rank returns (and no launcher reads the checkpoint) before rank 0 has written it,
    # and the other ranks do not wait in a timed collective while rank 0 evaluates
    ranks.barrier()
    if history:
        metrics.update({f"train/final_{k}": v for k, v in history[-1].items() if k != "step"})
    if ranks.is_main:
        if cfg.data.eval:
            ev = evaluate_reward_model(str(out), cfg.data.eval, cfg=cfg)
            metrics.update({f"eval/{k}": v for k, v in ev.items()})
        (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    return RMTrainResult(str(out), steps, seconds, metrics)


def length_report(kind: str, lengths: Sequence[int], max_length: int, log: Callable[[str], None]) -> dict[str, Any]:
    """How many training sequences (token counts with the EOS, both sides of every pair) exceed
    model.max_length and are cut: a Themis sequence keeps its last tokens (the EOS carries the score), so the
    question goes; a classifier's tokenizer keeps the first ones, so the answer's end goes. The encoders cut
    without a word; one warning names the fix, and the counts go to train_metrics.json, so a run can show
    its traces were whole (docs/experiments/themis_tara.md, session 12, counts them this way)."""
    n, over = len(lengths), sum(k > max_length for k in lengths)
    longest = max(lengths, default=0)
    if over:
        lost = "their start (the question) is dropped" if kind == "themis" else "their end (the answer) is dropped"
        log(f"warning: {over} of {n} training sequences ({100 * over / n:.1f}%) are longer than model.max_length="
            f"{max_length} tokens and are cut: {lost}; set model.max_length to {longest} to keep them whole")
    return {"train/sequences_cut": over, "train/sequences_cut_share": over / n if n else 0.0,
            "train/longest_sequence": longest}


def _batches(n: int, batch_size: int, epochs: float, seed: int, max_steps: int | None) -> list[list[int]]:
    rng = random.Random(seed)
    total = max(1, math.ceil(epochs * math.ceil(n / batch_size)))
    if max_steps is not None:
        total = min(total, max_steps)
    batches: list[list[int]] = []
    while len(batches) < total:
        order = list(range(n))
        rng.shuffle(order)
        batches.extend(order[i:i + batch_size] for i in range(0, n, batch_size))
    return batches[:total]


class _MetricsLog:
    """metrics.jsonl, one record per step, written by rank 0 only."""

    def __init__(self, path: Path, write: bool):
        self.fh = path.open("w") if write else None

    def write(self, record: dict[str, Any]) -> None:
        if self.fh:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def __enter__(self) -> _MetricsLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fh:
            self.fh.close()


def saved_template(pairs: list[PreferencePair], template: str, observations: str) -> str:
    """The template saved with a classifier RM, so that a config naming the checkpoint scores the text it was
    trained on: TARA pairs without context or observations train on render_plain's 'Question: q\\nAnswer: a'
    (PLAIN_TEMPLATE); any other mix keeps the configured template."""
    if observations == "none" and pairs and all(p.item is not None and p.context is None for p in pairs):
        return PLAIN_TEMPLATE
    return template


def _train_classifier(cfg: Any, pairs: list[PreferencePair], out: Path, log,
                      ranks: Ranks) -> tuple[int, list[dict], int, dict[str, Any]]:
    from align.rewards.classifier import ClassifierRewardModel

    rm = ClassifierRewardModel(cfg.model.path, head=cfg.model.head, template=cfg.model.template,
                               max_length=cfg.model.max_length, batch_size=cfg.train.eval_batch_size, dtype=cfg.model.dtype)
    observer = ToolObserver() if cfg.data.observations == "tools" else None
    texts = [(classifier_text(p, "pos", cfg.model.template, cfg.data.observations, observer),
              classifier_text(p, "neg", cfg.model.template, cfg.data.observations, observer)) for p in pairs]
    lengths = length_report("classifier", rm.token_lengths([t for pair in texts for t in pair]), cfg.model.max_length, log)
    model = rm.model
    model.train()
    batches = _batches(len(texts), cfg.train.batch_size, cfg.train.epochs, cfg.train.seed, cfg.train.max_steps)
    opt = _optimizer(model.named_parameters(), cfg.train)
    sched = _schedule(opt, len(batches), cfg.train.warmup_ratio)
    history: list[dict] = []
    local_pairs = 0
    with _MetricsLog(out / "metrics.jsonl", ranks.is_main) as metrics_log:
        for step, idx in enumerate(_progress(batches, "train-rm", ranks), start=1):
            mine, b = ranks.share(idx), len(idx)
            local_pairs += len(mine)
            loss, right = torch.zeros((), requires_grad=True), 0.0  # a rank without pairs adds zero gradients
            if mine:
                enc = rm.encode([texts[i][0] for i in mine] + [texts[i][1] for i in mine])
                r = rm.forward_scores(**enc).float()
                m = len(mine)
                loss = bradley_terry_loss(r[:m], r[m:], pair_total=b)
                right = float((r[:m] > r[m:]).sum())
            batch_loss, batch_right = ranks.sum([float(loss.detach()), right])
            gnorm = _optimizer_step(loss, step, model, opt, sched, cfg.train.grad_clip, ranks, batch_loss)
            rec = {"step": step, "loss": batch_loss, "pair_acc": batch_right / b, "grad_norm": gnorm,
                   "lr": sched.get_last_lr()[0]}
            history.append(rec)
            metrics_log.write(rec)
            if step % cfg.train.log_every == 0:
                log(f"step {step}/{len(batches)} loss {rec['loss']:.4f} acc {rec['pair_acc']:.3f}")
    model.eval()
    rm.template = saved_template(pairs, cfg.model.template, cfg.data.observations)
    if ranks.is_main:
        rm.save_pretrained(out)
    return len(batches), history, local_pairs, lengths


def _train_themis(cfg: Any, pairs: list[PreferencePair], out: Path, log,
                  ranks: Ranks) -> tuple[int, list[dict], int, dict[str, Any]]:
    from align.rewards.themis import (
        ThemisLossOptions,
        create_themis,
        encode_themis,
        load_themis,
        pad_left,
        save_themis,
        themis_loss,
        themis_token_lengths,
    )

    if any(p.item is None for p in pairs):
        raise ValueError("Themis training needs TARA-format data (pos_answer / neg_answer with actions and score_agent)")
    src = Path(cfg.model.path)
    model, tok = load_themis(src) if (src / "v_head.safetensors").is_file() else create_themis(cfg.model.path, cfg.model.dtype)
    # under torchrun each rank's current CUDA device is its own (init_from_env), so "cuda" is this rank's GPU
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    t = cfg.themis
    opts = ThemisLossOptions(t.positive_answer_lm, t.beta, t.omega, t.observation_dropout)
    rng = random.Random(cfg.train.seed)
    include_rationale = t.omega > 0
    segs = [(render_item(p.item, "pos", include_rationale), render_item(p.item, "neg", include_rationale)) for p in pairs]
    lengths = length_report("themis", themis_token_lengths(tok, [s for pair in segs for s in pair]), cfg.model.max_length, log)
    batches = _batches(len(segs), cfg.train.batch_size, cfg.train.epochs, cfg.train.seed, cfg.train.max_steps)
    opt = _optimizer(model.named_parameters(), cfg.train)
    sched = _schedule(opt, len(batches), cfg.train.warmup_ratio)
    model.train()
    history: list[dict] = []
    local_pairs = 0
    with _MetricsLog(out / "metrics.jsonl", ranks.is_main) as metrics_log:
        for step, idx in enumerate(_progress(batches, "train-rm (themis)", ranks), start=1):
            # every rank encodes the whole batch (cheap next to the forward), so observation dropout draws the
            # same numbers as one process, and the batch's supervised-token total is known without a collective
            pos = [encode_themis(tok, segs[i][0], True, opts, rng, cfg.model.max_length) for i in idx]
            neg = [encode_themis(tok, segs[i][1], False, opts, rng, cfg.model.max_length) for i in idx]
            tokens = sum(sum(w[1:]) for _, w in pos + neg)  # weights of predicted tokens (the first is not)
            mine = ranks.share(range(len(idx)))
            local_pairs += len(mine)
            loss, lm, rm_part, right = torch.zeros((), device=device, requires_grad=True), 0.0, 0.0, 0.0
            if mine:
                rows = [pos[k] for k in mine] + [neg[k] for k in mine]
                ids = pad_left([r[0] for r in rows], tok.pad_token_id).to(device)
                weights = pad_left([r[1] for r in rows], 0.0, dtype=torch.float32).to(device)
                mask = pad_left([[1] * len(r[0]) for r in rows], 0).to(device)
                logits, rewards = model(ids, mask)
                loss, parts = themis_loss(logits, ids, weights, rewards, t.lm_coef, t.rm_coef,
                                          token_total=tokens, pair_total=len(idx))
                lm, rm_part, right = parts["lm_loss"], parts["rm_loss"], parts["pair_acc"] * len(mine)
            batch_loss, lm, rm_part, right = ranks.sum([float(loss.detach()), lm, rm_part, right])
            gnorm = _optimizer_step(loss, step, model, opt, sched, cfg.train.grad_clip, ranks, batch_loss)
            rec = {"step": step, "loss": batch_loss, "lm_loss": lm, "rm_loss": rm_part, "pair_acc": right / len(idx),
                   "grad_norm": gnorm, "lr": sched.get_last_lr()[0]}
            history.append(rec)
            metrics_log.write(rec)
            if step % cfg.train.log_every == 0:
                log(f"step {step}/{len(batches)} loss {rec['loss']:.4f} lm {lm:.3f} rm {rm_part:.3f}")
    model.eval()
    if ranks.is_main:
        save_themis(model, tok, out, max_rounds=t.max_rounds, max_new_tokens=t.max_new_tokens,
                    max_length=cfg.model.max_length, rationale=include_rationale)
    return len(batches), history, local_pairs, lengths


def _progress(items, desc: str, ranks: Ranks = Ranks()):
    if not ranks.is_main:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False, mininterval=5.0)
    except ImportError:  # pragma: no cover
        return items


# ----- evaluation ------------------------------------------------------------------------------------------

def _checkpoint_kind(path: Path) -> str:
    if (path / "themis.json").is_file() or (path / "v_head.safetensors").is_file():
        return "themis"
    return "classifier"


def _eval_settings(cfg: Any, path: Path) -> tuple[str, int | None]:
    """(data.observations, train.eval_batch_size) of the config, else of the checkpoint's rm_config.json (written
    by train_reward_model from a validated config), else ("none", None)."""
    if cfg is not None:
        return cfg.data.observations, cfg.train.eval_batch_size
    if (path / "rm_config.json").is_file():
        saved = json.loads((path / "rm_config.json").read_text())
        return saved["data"]["observations"], saved["train"]["eval_batch_size"]
    return "none", None


def evaluate_reward_model(model: Any, sources: Sequence[str], cfg: Any = None, limit: int | None = None,
                          tools: Any = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Pairwise accuracy (r(pos) > r(neg)) overall and per group on the test split of `sources`.

    model: a checkpoint directory (classifier or Themis, detected), or an RMTrainConfig (its output_dir).
    Classifier RMs on TARA read the same input form they were trained on (data.observations from cfg or the
    checkpoint's rm_config.json); Themis runs its full trace loop with real tool calls.
    """
    if not isinstance(model, (str, Path)):  # an RMTrainConfig
        cfg, model = model, model.output_dir
    path = Path(model)
    if not path.is_dir():
        raise MissingFileError(f"reward model checkpoint {path} not found; train one with `align train-rm CONFIG`")
    observations, eval_batch_size = _eval_settings(cfg, path)
    pairs = load_sources(sources, "test", limit)
    if not pairs:
        raise ValueError(f"evaluation sources {list(sources)} hold no pairs")
    t0 = time.perf_counter()
    if _checkpoint_kind(path) == "themis":
        from align.rewards.themis import ThemisRewardModel, themis_meta

        meta = themis_meta(path)
        bs = eval_batch_size or 8
        rm = ThemisRewardModel(str(path), tools=tools, max_rounds=meta.get("max_rounds", 3),
                               max_new_tokens=meta.get("max_new_tokens", 128), max_length=meta.get("max_length", 1024), batch_size=bs,
                               rationale=meta.get("rationale", True))
        prompts = [p.prompt for p in pairs] * 2
        completions = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        columns: dict[str, list] = {"context": [p.context for p in pairs] * 2}
        if any(p.item is not None and p.item.test_list for p in pairs):
            columns["test_list"] = [list(p.item.test_list or []) if p.item else [] for p in pairs] * 2
        columns["id"] = [p.item.id if p.item else str(i) for i, p in enumerate(pairs)] * 2
        res = rm.score(prompts, completions, **columns)
        if any(s is None for s in res.scores):
            bad = next(e for e in res.errors if e)
            raise RuntimeError(f"Themis produced no score for some samples: {bad}")
        n = len(pairs)
        pos, neg = res.scores[:n], res.scores[n:]
    else:
        from align.rewards.classifier import ClassifierRewardModel

        rm = ClassifierRewardModel.from_pretrained(path, batch_size=eval_batch_size or 32)
        observer = ToolObserver(tools) if observations == "tools" else None
        pos = rm.score_texts([classifier_text(p, "pos", rm.template, observations, observer) for p in pairs])
        neg = rm.score_texts([classifier_text(p, "neg", rm.template, observations, observer) for p in pairs])
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.group, []).append(i)
    result: dict[str, Any] = {"pairwise_accuracy": pairwise_accuracy(pos, neg), "n": len(pairs),
                              "seconds": time.perf_counter() - t0}
    for g, idx in sorted(groups.items()):
        result[f"accuracy/{g}"] = pairwise_accuracy([pos[i] for i in idx], [neg[i] for i in idx])
        result[f"n/{g}"] = len(idx)
    if log:
        log(format_accuracy_table(result))
    return result


def format_accuracy_table(result: dict[str, Any]) -> str:
    lines = [f"{'group':<14} {'pairs':>6} {'accuracy':>9}"]
    for key, value in result.items():
        if key.startswith("accuracy/"):
            g = key.split("/", 1)[1]
            lines.append(f"{g:<14} {result[f'n/{g}']:>6} {100 * value:>8.2f}%")
    lines.append(f"{'all':<14} {result['n']:>6} {100 * result['pairwise_accuracy']:>8.2f}%")
    return "\n".join(lines)


__all__ = ["RMTrainResult", "PreferencePair", "ToolObserver", "train_reward_model", "evaluate_reward_model",
           "load_pairs", "load_sources", "classifier_text", "bradley_terry_loss", "pairwise_accuracy",
           "format_accuracy_table"]
