"""A toy UMM whose understanding reward discriminates *within a prompt* (the GvU redesign, docs/experiments/gvu.md).

GRPO's group-normalised advantage compares images drawn for the same caption, so the GvU reward
R(T | I) = exp(mean_j log p(T_j | I, ...)) must rank, for a fixed caption, the images the checker accepts above
those it rejects. The first base model did not: pre-trained on "a random true caption" of prior scenes, it
never saw a four-circle scene paired with "three circles" (no count caption was true of it), so nothing taught
it to make "three" unlikely there, and nothing about clutter. Two changes, both about the captions:

1. Captions can state every count and clutter. Counting captions go up to `max(COUNTS)` ("four circles",
   "five squares", ...) and a scene with many objects is captioned "many shapes"; a caption is true of a scene
   when the world's checker accepts it (`toyworld.check`: exact counts, relations, at most 2 extra objects), so
   "a circle" is not a true caption of a seven-object grid, as a person would not describe it so.
2. Unlikelihood (Welleck et al., 2020) on near-miss false captions: off-by-one and off-by-three counts, swapped
   relations, wrong colours, clutter. For a false caption the loss -log(1 - p) is put on its *decisive* token:
   the first token where the caption stops being a prefix of any true caption of the scene (e.g. "three" for
   "three circles" on four circles; "left" for "a circle left of a triangle" when the circle is right of it).
   Earlier tokens are fine continuations of true captions and must not be pushed down.

An example beside examples/toyworld.py (the world), used by examples/gvu_toy.py (`--recipe discriminative`).
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import toyworld as tw

COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
COUNTS = tuple(COUNT_WORDS)
CLUTTER_CAPTION = "many shapes"
CLUTTER_OBJECTS = 5  # "many shapes" is a true caption of a scene with at least this many objects
EXTRA_WORDS = [w for k, w in COUNT_WORDS.items() if k not in tw.NUMBERS] + CLUTTER_CAPTION.split()
WORLD_CAPTIONS = tuple(s.caption() for task in tw.TASKS for s in tw.all_specs(task))


def _count_caption(k: int, shape: str) -> str:
    return f"{COUNT_WORDS[k]} {shape}s"


@lru_cache(maxsize=50_000)
def true_captions(values: tuple[int, ...], grid_size: int) -> dict[str, tuple[str, ...]]:
    """Every true caption of a scene, by kind: the world's six tasks (accepted by `toyworld.check`), "counts"
    (k >= 4 objects of a shape, at most 2 others) and "clutter" ("many shapes" when >= CLUTTER_OBJECTS objects)."""
    out: dict[str, list[str]] = {}
    for task in tw.TASKS:
        out[task] = [s.caption() for s in tw.all_specs(task) if tw.check(s, values, grid_size)]
    dets = tw.parse_image(values, grid_size)
    out["counts"] = [_count_caption(k, s) for s in tw.SHAPES if (k := sum(d.shape == s for d in dets)) in COUNTS
                     and k not in tw.NUMBERS and len(dets) <= k + 2]
    out["clutter"] = [CLUTTER_CAPTION] if len(dets) >= CLUTTER_OBJECTS else []
    return {k: tuple(v) for k, v in out.items() if v}


@lru_cache(maxsize=50_000)
def _true_prefixes(values: tuple[int, ...], grid_size: int) -> frozenset[tuple[str, ...]]:
    words = [c.split() for caps in true_captions(values, grid_size).values() for c in caps]
    return frozenset(tuple(w[:j]) for w in words for j in range(1, len(w) + 1))


def decisive_index(caption: str, values: Sequence[int], grid_size: int) -> int | None:
    """Index of the first word of `caption` where it stops being a prefix of a true caption of the scene;
    None when the caption is true or a prefix of a true one (then no token of it is wrong)."""
    prefixes = _true_prefixes(tuple(values), grid_size)
    words = caption.split()
    for j in range(len(words)):
        if tuple(words[:j + 1]) not in prefixes:
            return j
    return None


# ---------------------------------------------------------------------------------------- perturbations

def _empty(values):
    return [i for i, v in enumerate(values) if v == 0]


def add_objects(values, rng: random.Random, n: int, shape: str | None = None) -> list[int] | None:
    """n more objects (of `shape`, random colour; else random) in empty cells; None if they do not fit."""
    free = _empty(values)
    if len(free) < n:
        return None
    out = list(values)
    for cell in rng.sample(free, n):
        out[cell] = tw.cell_value(rng.choice(tw.COLORS), shape) if shape else rng.randrange(1, tw.NUM_VALUES)
    return out


def remove_objects(values, rng: random.Random, n: int, shape: str) -> list[int] | None:
    cells = [i for i, v in enumerate(values) if v and tw.cell_object(v)[1] == shape]
    if len(cells) < n:
        return None
    out = list(values)
    for cell in rng.sample(cells, n):
        out[cell] = 0
    return out


def perturbations(spec: tw.Spec, values: Sequence[int], rng: random.Random, grid_size: int) -> dict[str, list[int]]:
    """Near-miss versions of an accepted image, each rejected by the checker (kinds that do not apply or that
    the checker still accepts are left out): counting k-1 / k+1 / k+3, position swapped, colour changed,
    clutter (3 random objects added)."""
    out: dict[str, list[int] | None] = {}
    if spec.task == "counting":
        (_, shape), = spec.objects
        out["count-1"] = remove_objects(values, rng, 1, shape)
        out["count+1"] = add_objects(values, rng, 1, shape)
        out["count+3"] = add_objects(values, rng, 3, shape)
    if spec.task == "position":
        (_, a), (_, b) = spec.objects
        cells_a = [i for i, v in enumerate(values) if v and tw.cell_object(v)[1] == a]
        cells_b = [i for i, v in enumerate(values) if v and tw.cell_object(v)[1] == b]
        swapped = list(values)
        for i, j in zip(cells_a, cells_b):  # swap the named objects' cells pairwise
            swapped[i], swapped[j] = swapped[j], swapped[i]
        out["swap"] = swapped
    if spec.task in ("colors", "color_attr"):
        (c, s) = spec.objects[0]
        recoloured = [tw.cell_value(rng.choice([x for x in tw.COLORS if x != c]), s) if v == tw.cell_value(c, s) else v
                      for v in values]
        out["recolour"] = recoloured
    out["clutter"] = add_objects(values, rng, 3)
    return {k: v for k, v in out.items() if v is not None and not tw.check(spec, v, grid_size)}


# ------------------------------------------------------------------------------------------------ scenes

def training_scene(rng: random.Random, grid_size: int) -> list[int]:
    """The understanding pre-training scene mixture: prior scenes (1-4 objects), counting scenes (1-6 of one
    shape + up to one other), scenes drawn for a caption, their near-miss perturbations, cluttered scenes."""
    u = rng.random()
    if u < 0.3:
        return tw.random_scene(rng, grid_size)
    if u < 0.5:
        shape = rng.choice(tw.SHAPES)
        values = add_objects([0] * grid_size ** 2, rng, rng.randint(1, 6), shape)
        return add_objects(values, rng, 1, rng.choice([s for s in tw.SHAPES if s != shape])) if rng.random() < 0.5 else values
    spec = tw.sample_spec(rng)
    values = tw.scene_for(spec, rng, grid_size)
    if u < 0.7:
        return values
    if u < 0.9:
        pert = perturbations(spec, values, rng, grid_size)
        return rng.choice(list(pert.values())) if pert else values
    return tw.random_scene(rng, grid_size, min_objects=CLUTTER_OBJECTS, max_objects=8)


FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def negative_caption(rng: random.Random, values: Sequence[int], grid_size: int, flip_share: float = 0.3) -> tuple[str, int] | None:
    """A near-miss false caption of the scene and its decisive word index (None if none was found).

    With probability `flip_share` (when the scene has a true position caption) that caption with its relation
    flipped, the swapped-relation negative; else half the time a caption of a shape the scene shows (counts of
    it, relations between shapes present, colours of it), otherwise any world caption that is false."""
    position = true_captions(tuple(values), grid_size).get("position", ())
    if position and rng.random() < flip_share:
        caption = rng.choice(position)
        rel = next(r for r in FLIP if f" {r} " in caption)
        flipped = caption.replace(f" {rel} ", f" {FLIP[rel]} ")
        j = decisive_index(flipped, values, grid_size)
        if j is not None:
            return flipped, j
    shapes = {tw.cell_object(v)[1] for v in values if v}
    for _ in range(20):
        caption = rng.choice(WORLD_CAPTIONS)
        if shapes and rng.random() < 0.5 and not any(s in caption for s in shapes):
            continue
        j = decisive_index(caption, values, grid_size)
        if j is not None:
            return caption, j
    return None


# ----------------------------------------------------------------------------------------- pre-training

def pretraining_batch(tokenizer, rng: random.Random, batch_size: int, grid_size: int, understanding_fraction: float = 0.8,
                      negative_fraction: float = 0.35, position_share: float = 0.0):
    """Rows of three kinds: generation (caption <boi> image, as toyworld), understanding with a true caption
    (likelihood), understanding with a false caption (unlikelihood on its decisive token).

    Returns input_ids, attention_mask, labels (-100 outside the supervised part) [B, T] and the unlikelihood
    targets as (row, position of the decisive token, token id) triples."""
    import torch

    rows, negatives = [], []
    for b in range(batch_size):
        if rng.random() >= understanding_fraction:
            spec = tw.sample_spec(rng)
            rows.append(tw.generation_example(tokenizer, spec, tw.scene_for(spec, rng, grid_size)))
            continue
        values = training_scene(rng, grid_size)
        neg = negative_caption(rng, values, grid_size) if rng.random() < negative_fraction else None
        if neg is None:
            groups = true_captions(tuple(values), grid_size)
            # kinds uniform; `position_share` of the rows a relation caption where one holds (the hardest skill)
            kind = "position" if "position" in groups and rng.random() < position_share else rng.choice(list(groups))
            caption = rng.choice(groups[kind])
            rows.append(tw.understanding_example(tokenizer, values, caption))
            continue
        caption, j = neg
        ids, start = tw.understanding_example(tokenizer, values, caption)
        word_ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        negatives.append((b, start + j, word_ids[j]))
        rows.append((ids, len(ids)))  # nothing supervised by likelihood
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch_size, T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, T), dtype=torch.long)
    labels = torch.full((batch_size, T), -100, dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        labels[i, start:len(ids)] = torch.tensor(ids[start:])
    return input_ids, attention_mask, labels, negatives


def pretraining_loss(logits, labels, negatives, unlikelihood_weight: float = 1.0):
    """Token-mean next-token cross-entropy on the labelled tokens + weight * mean_n -log(1 - p_n) over the
    decisive tokens of the false captions (p_n = p(token | everything before it))."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    shift = labels[:, 1:]
    mask = shift != -100
    nll = -logp[:, :-1].gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = (nll * mask).sum() / mask.sum().clamp(min=1)
    if negatives and unlikelihood_weight:
        rows = torch.tensor([r for r, _, _ in negatives])
        pos = torch.tensor([p - 1 for _, p, _ in negatives])  # the logits one step before the token predict it
        tok = torch.tensor([t for _, _, t in negatives])
        lp = logp[rows, pos, tok]
        # -log(1 - p) from log p, stable near p -> 1: log1p(-exp(lp)), with p capped just below 1.
        loss = loss + unlikelihood_weight * (-torch.log1p(-lp.exp().clamp(max=1 - 1e-6))).mean()
    return loss


def pretrain(model, tokenizer, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
             unlikelihood_weight: float = 1.0, log_every: int = 0, position_share: float = 0.0) -> list[float]:
    """toyworld.pretrain with the discriminative captions and the unlikelihood term (same optimiser, schedule)."""
    import torch

    from align.algos.schedule import lambda_lr

    grid_size = model.config.umm["grid_size"]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = lambda_lr(opt, steps, max(1, steps // 20) - 1, "cosine", overlap=True)
    model.train()
    losses = []
    for step in range(steps):
        input_ids, attention_mask, labels, negatives = pretraining_batch(tokenizer, rng, batch_size, grid_size,
                                                                         position_share=position_share)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = pretraining_loss(logits, labels, negatives, unlikelihood_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"pretrain step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    model.eval()
    return losses


def build_opt_umm(grid_size: int = 3, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    """A fresh toy UMM on OPT (learned absolute position embeddings) instead of Llama (rotary only).

    Why: the rotary Llama base never learned where a cell is (its p("left" | image, "a circle") did not move
    when the circle moved from the left to the right column, docs/experiments/gvu.md): rotary encodings touch
    only the attention scores, so a cell's column must be inferred from attention patterns, which 2-4 layers
    did not learn in 3,000 steps. A learned position embedding puts the cell index in the token's vector."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = tw.build_tokenizer(EXTRA_WORDS)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, ffn_dim=2 * hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, max_position_embeddings=128, word_embed_proj_dim=hidden_size,
                       do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    config.umm = tw.umm_layout(tokenizer, grid_size)
    torch.manual_seed(seed)
    return OPTForCausalLM(config), tokenizer


def make_discriminative_umm(out_dir: str | Path, steps: int = 1500, seed: int = 0, grid_size: int = 3,
                            hidden_size: int = 128, num_layers: int = 2, unlikelihood_weight: float = 1.0,
                            position_share: float = 0.0, arch: str = "llama", log_every: int = 0) -> Path:
    """Build, pre-train (discriminative captions + unlikelihood) and save a toy UMM (`arch`: llama | opt)."""
    if arch == "opt":
        model, tokenizer = build_opt_umm(grid_size=grid_size, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    else:
        model, tokenizer = tw.build_toy_umm(grid_size=grid_size, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                                            extra_words=EXTRA_WORDS)
    losses = pretrain(model, tokenizer, steps, seed=seed, unlikelihood_weight=unlikelihood_weight, log_every=log_every,
                      position_share=position_share)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"recipe": "discriminative", "steps": steps, "seed": seed,
                                                    "unlikelihood_weight": unlikelihood_weight, "num_layers": num_layers, "arch": arch,
                                                    "hidden_size": hidden_size, "position_share": position_share,
                                                    "final_loss": sum(losses[-50:]) / min(50, len(losses))}, indent=1))
    return out
