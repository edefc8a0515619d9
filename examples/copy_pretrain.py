"""Generic copy pre-training for the tiny random-init backbones of the examples.

A pretrained LM arrives able to copy a span it has seen earlier in its context (induction heads, Olsson et
al. 2022); a random-init 4x128 model does not, and the experiments that need it (a Themis call must carry the
question's date or city, an answer must be read back from a tool's observation) learn the call format but not
the copy within their budget. This module gives the backbone that ability the way it arises in pre-training,
from data that has nothing to do with any task: a span of token ids drawn uniformly from the vocabulary, a
separator, then the same span again, with the loss on the repeat only. No text, entity or test item of any
experiment appears, so nothing can leak from a test split.

    from copy_pretrain import pretrain_copy
    stats = pretrain_copy(model, vocab_ids=range(first_id, len(tok)), steps=400, batch_size=32, lr=1e-3, seed=0)

`stats["copy_loss"]` (nats per repeated token, the last 10 steps) tells whether the skill is there: it starts
near log(len(vocab_ids)) and falls towards 0 once the model copies.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch


def copy_batch(vocab_ids: Sequence[int], batch_size: int, span: tuple[int, int], sep_id: int,
               generator: torch.Generator, sub_vocab: tuple[int, int] | None = None,
               bos_id: int | None = None, prefix: tuple[int, int] | None = None,
               gap: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` rows of `[bos] s sep s` (s: a uniform random span of length in [span[0], span[1]], one
    length per batch so rows need no padding); labels are -100 except on the repeated span (the copy is what
    is learned, the first span is unpredictable by construction).

    `sub_vocab=(lo, hi)`: each row draws its span from its own random subset of k ids, k log-uniform in
    [lo, hi] (capped at len(vocab_ids)). With small k a token recurs within the span (as the digits of a
    date do), so the previous token alone does not say what comes next and the copy has to track its
    position; with the full vocabulary it never has to. `bos_id`: a fixed first token (an attention sink,
    as a task sequence's fixed prefix is).

    `prefix=(lo, hi)` / `gap=(lo, hi)`: random filler tokens (lengths drawn per batch) before the span and
    between the separator and the repeat: `[bos] P s sep G s`. Without them the span always starts at the
    same place and ends at the separator, and a model can copy by position alone (attend to the token
    `n + 1` back): that copy breaks on spans longer than it trained on and on text without the fixed
    layout. With them the span's place and the distance to the repeat vary, so only matching content (an
    induction head: find the earlier occurrence of the current token, emit its successor) copies. With a
    gap the repeat's first token is not labelled (random filler precedes it: nothing says it is coming)."""
    lo, hi = span
    if not 1 <= lo <= hi:
        raise ValueError(f"span must be 1 <= lo <= hi, got {span}")
    vocab = torch.as_tensor(list(vocab_ids), dtype=torch.long)
    if vocab.numel() < 2:
        raise ValueError("vocab_ids must hold at least 2 ids")
    n = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    if sub_vocab is None:
        s = vocab[torch.randint(0, vocab.numel(), (batch_size, n), generator=generator)]
    else:
        klo, khi = sub_vocab
        if not 2 <= klo <= khi:
            raise ValueError(f"sub_vocab must be 2 <= lo <= hi, got {sub_vocab}")
        u = torch.rand(batch_size, generator=generator)
        ks = torch.exp(math.log(klo) + u * (math.log(khi + 1) - math.log(klo))).long().clamp(klo, min(khi, vocab.numel()))
        rows = []
        for k in ks.tolist():
            ids = vocab[torch.randperm(vocab.numel(), generator=generator)[:k]]
            rows.append(ids[torch.randint(0, k, (n,), generator=generator)])
        s = torch.stack(rows)
    sep = torch.full((batch_size, 1), sep_id, dtype=torch.long)
    pre = [] if bos_id is None else [torch.full((batch_size, 1), int(bos_id), dtype=torch.long)]

    def filler(bounds):
        if bounds is None:
            return None
        if not 0 <= bounds[0] <= bounds[1]:
            raise ValueError(f"prefix / gap must be 0 <= lo <= hi, got {bounds}")
        k = int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=generator))
        return vocab[torch.randint(0, vocab.numel(), (batch_size, k), generator=generator)]

    p, gp = filler(prefix), filler(gap)
    head = [*pre, *([p] if p is not None else []), s, sep, *([gp] if gp is not None else [])]
    input_ids = torch.cat([*head, s], dim=1)
    labels = torch.full_like(input_ids, -100)
    start = sum(t.shape[1] for t in head)
    skip = 1 if gp is not None else 0
    labels[:, start + skip:] = s[:, skip:]  # the model predicts token t from tokens < t (HF shifts labels inside the loss)
    return input_ids, labels


def pretrain_copy(model: torch.nn.Module, vocab_ids: Sequence[int], steps: int, batch_size: int = 32,
                  lr: float = 1e-3, seed: int = 0, span: tuple[int, int] = (4, 32), sep_id: int | None = None,
                  warmup: int = 20, log: Callable[[str], None] | None = None, log_every: int = 100,
                  sub_vocab: tuple[int, int] | None = None, bos_id: int | None = None,
                  prefix: tuple[int, int] | None = None, gap: tuple[int, int] | None = None) -> dict[str, Any]:
    """`steps` AdamW steps on `copy_batch` rows; trains `model` (an HF causal LM) in place and returns
    {"steps", "copy_loss" (mean of the last 10 steps), "first_loss", "curve": [(step, loss), ...]}.
    Pass `sep_id` (e.g. the tokenizer's newline id) so the separator is a token the model also sees in its
    task; it defaults to the first of `vocab_ids`. `sub_vocab`, `bos_id`, `prefix`, `gap`: see `copy_batch`.

    Settings that make the copy appear within ~1,200 steps (~2 CPU minutes, 1 thread) on a 4 x 128 Llama
    with a 1,024-token vocabulary: span (4, 16), bos_id set, lr 1e-3, warm-up 50, batch 32 (measured in
    docs/experiments/themis_tara.md); longer spans (4, 32) stayed above 4 nats after 600 steps. That copy is
    positional (it fails on spans longer than 16 and without the leading BOS); rows with `prefix` / `gap`,
    which only an induction head solves, had not reached the phase change after 1,200 steps (4.6 nats)."""
    from align.algos.schedule import lambda_lr

    vocab_ids = list(vocab_ids)
    sep = vocab_ids[0] if sep_id is None else int(sep_id)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = lambda_lr(opt, total=steps, warmup=warmup)
    model.train()
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    for step in range(1, steps + 1):
        input_ids, labels = copy_batch(vocab_ids, batch_size, span, sep, g, sub_vocab=sub_vocab, bos_id=bos_id,
                                       prefix=prefix, gap=gap)
        loss = model(input_ids=input_ids, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"copy pre-training loss is {float(loss)} at step {step}: lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            curve.append((step, losses[-1]))
            if log is not None:
                log(f"copy pretrain step {step}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return {"steps": steps, "first_loss": losses[0] if losses else float("nan"),
            "copy_loss": sum(losses[-10:]) / max(1, len(losses[-10:])), "curve": curve}


def pretrain_copy_stages(model: torch.nn.Module, vocab_ids: Sequence[int], stages: Sequence[dict[str, Any]],
                         **common: Any) -> dict[str, Any]:
    """A curriculum: `pretrain_copy` once per stage (each a dict of its keyword overrides on `common`, e.g.
    `{"steps": 800}` then `{"steps": 1600, "prefix": (0, 16), "gap": (0, 16), "warmup": 20}`); each stage
    has its own optimiser and schedule. Positional rows first, then rows with random prefix / gap: from
    scratch the prefix / gap rows sit on a plateau (4.6 nats after 1,200 steps), after the positional
    stage they copy within a few hundred steps (docs/experiments/themis_tara.md, session 7). Returns the
    last stage's keys ("copy_loss" is the last stage's), "first_loss" of the first stage, "steps" in all,
    and "stages": each stage's stats."""
    if not stages:
        raise ValueError("stages must hold at least one stage")
    done: list[dict[str, Any]] = []
    for k, stage in enumerate(stages):
        kw = {**common, **stage}
        kw["seed"] = int(kw.get("seed", 0)) + 1000 * k  # a fresh row stream per stage
        done.append(pretrain_copy(model, vocab_ids, **kw))
    return {**done[-1], "steps": sum(s["steps"] for s in done), "first_loss": done[0]["first_loss"], "stages": done}


def copy_eval(model: torch.nn.Module, vocab_ids: Sequence[int], sep_id: int, bos_id: int | None, n: int = 64,
              seed: int = 999) -> dict[str, float]:
    """Held-out copy loss (nats per repeated token) on fixed rows: "positional" (`[bos] s sep s`, span 16:
    solved by position alone), "content" (random prefix 8-16 and gap 8-16, span 16: only content matching
    copies) and "content_24_no_bos" (the same at span 24 without the leading token: longer than training
    and without its anchor). Sub-vocabulary rows (4-1000 ids), as digits recur."""
    g = torch.Generator().manual_seed(seed)
    rows = {
        "positional": copy_batch(vocab_ids, n, (16, 16), sep_id, g, sub_vocab=(4, 1000), bos_id=bos_id),
        "content": copy_batch(vocab_ids, n, (16, 16), sep_id, g, sub_vocab=(4, 1000), bos_id=bos_id, prefix=(8, 16), gap=(8, 16)),
        "content_24_no_bos": copy_batch(vocab_ids, n, (24, 24), sep_id, g, sub_vocab=(4, 1000), prefix=(8, 16), gap=(8, 16)),
    }
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = {k: float(model(input_ids=x, labels=y).loss) for k, (x, y) in rows.items()}
    model.train(was_training)
    return out


def repeat_copy_loss(model: torch.nn.Module, texts_ids: Sequence[Sequence[int]], header_ids: Sequence[int], sep_id: int,
                     buckets: Sequence[tuple[int, int]] = ((2, 8), (9, 16), (17, 24), (25, 10_000))) -> dict[str, float]:
    """Does the copy carry over to text? Each text (token ids) is written twice, `header t sep t` (no `<s>`
    unless the header has one), and the loss (nats) of predicting the repeat's k-th token (k >= 2: the first
    is unannounced) is averaged per bucket of k. Used on TARA weather test questions (docs/experiments/
    themis_tara.md, session 7: 8-11 nats on k <= 16 for every copy base, although random-id rows copy)."""
    import torch.nn.functional as F

    sums = {f"{lo}-{hi}": [0.0, 0] for lo, hi in buckets}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for t in texts_ids:
            ids = [*header_ids, *t, sep_id, *t]
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0]
            s0 = len(header_ids) + len(t) + 1  # index of the repeat's first token
            # the loss of repeat token k (k = 2..len(t), at position s0 + k - 1) is predicted at position s0 + k - 2
            ce = F.cross_entropy(logits[s0:s0 + len(t) - 1], x[0, s0 + 1:s0 + len(t)], reduction="none").tolist()
            for k, loss in enumerate(ce, start=2):
                for lo, hi in buckets:
                    if lo <= k <= hi:
                        sums[f"{lo}-{hi}"][0] += loss
                        sums[f"{lo}-{hi}"][1] += 1
    model.train(was_training)
    return {k: s / n for k, (s, n) in sums.items() if n}
