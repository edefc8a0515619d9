"""A toy visual world for GvU on a CPU: grids of coloured shapes written as image tokens.

An image is a `grid_size x grid_size` grid read row-major; each cell is one image token whose value says
what the cell holds (0 = empty, else one (colour, shape) pair). The renderer draws it, the parser reads it
back (the "detector" of a GenEval-style checker), captions state objects, colours, counts and positions, and
`check` decides whether an image satisfies a caption the way GenEval's six tasks do (Ghosh et al., NeurIPS
2023: single object, two objects, counting, colours, position, colour attribution).

A toy unified multimodal model (UMM) is a tiny Hugging Face causal LM whose vocabulary holds caption
words, one `<img_k>` token per cell value and `<boi>` / `<eoi>`; it is pre-trained briefly on both
directions (caption -> image, image -> caption), more on understanding than on generation, as real UMMs
are, so its understanding branch can be used as a reward for its generation branch (PAPERS.md §3).
The UMM layout (`config.umm` in the saved config.json) is written and read by `align.rollouts.umm` (and read by
`align.rewards.understanding`): the trainer needs only the model path. The tokenizer and the random model come
from `align.testing` (`make_umm_tokenizer`, `tiny_umm`); this module holds only the world.

An example, not part of the library: `import toyworld` with examples/ on sys.path (examples/gvu_toy.py and
the tests do so).
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from align.rollouts.umm import make_umm_layout
from align.testing import make_umm_tokenizer, tiny_umm

COLORS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle")
NUMBERS = {2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
INSTRUCTION = "\nDescribe the image in detail.\n"
BOI, EOI = "<boi>", "<eoi>"
NUM_VALUES = 1 + len(COLORS) * len(SHAPES)  # cell values: 0 = empty, then (colour, shape) pairs
RGB = {"red": (220, 50, 47), "green": (60, 170, 60), "blue": (38, 110, 210), "yellow": (235, 190, 20)}


# ----------------------------------------------------------------------------------------------- cells

def cell_value(color: str, shape: str) -> int:
    """The image-token value of a cell holding a `color` `shape` (1 .. NUM_VALUES - 1)."""
    return 1 + COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


def cell_object(value: int) -> tuple[str, str] | None:
    """(colour, shape) held by a cell value, None for an empty cell."""
    if not 0 <= value < NUM_VALUES:
        raise ValueError(f"cell value {value} outside 0..{NUM_VALUES - 1}")
    if value == 0:
        return None
    c, s = divmod(value - 1, len(SHAPES))
    return COLORS[c], SHAPES[s]


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    row: int
    col: int


def parse_image(values: Sequence[int], grid_size: int) -> list[Detection]:
    """The parser (the checker's detector): row-major cell values [grid_size**2] -> objects with positions."""
    values = [int(v) for v in values]
    if len(values) != grid_size * grid_size:
        raise ValueError(f"an image has {grid_size * grid_size} cells, got {len(values)} values")
    out = []
    for i, v in enumerate(values):
        obj = cell_object(v)
        if obj is not None:
            out.append(Detection(obj[0], obj[1], i // grid_size, i % grid_size))
    return out


def render(values: Sequence[int], grid_size: int, cell_px: int = 32, border: tuple[int, int, int] | None = None):
    """Draw an image (row-major cell values) as a PIL RGB image; `border` colours a frame (e.g. right/wrong)."""
    from PIL import Image, ImageDraw

    size = grid_size * cell_px
    img = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for k in range(1, grid_size):
        draw.line([(k * cell_px, 0), (k * cell_px, size)], fill=(215, 215, 215))
        draw.line([(0, k * cell_px), (size, k * cell_px)], fill=(215, 215, 215))
    pad = max(2, cell_px // 6)
    for d in parse_image(values, grid_size):
        x0, y0 = d.col * cell_px + pad, d.row * cell_px + pad
        x1, y1 = (d.col + 1) * cell_px - pad, (d.row + 1) * cell_px - pad
        fill = RGB[d.color]
        if d.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif d.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    if border is not None:
        draw.rectangle([0, 0, size - 1, size - 1], outline=border, width=max(2, cell_px // 10))
    return img


# --------------------------------------------------------------------------------------------- captions

@dataclass(frozen=True)
class Spec:
    """What a caption asks for. objects: ((colour | None, shape), ...); count for counting; relation for position."""

    task: str
    objects: tuple[tuple[str | None, str], ...]
    count: int | None = None
    relation: str | None = None

    def caption(self) -> str:
        def obj(c, s):
            return f"a {c} {s}" if c else f"a {s}"

        if self.task == "counting":
            (_, s), = self.objects
            return f"{NUMBERS[self.count]} {s}s"
        if self.task == "position":
            return f"{obj(*self.objects[0])} {self.relation} {obj(*self.objects[1])}"
        return " and ".join(obj(c, s) for c, s in self.objects)


def all_specs(task: str) -> list[Spec]:
    """Every caption of one GenEval-style task in this world."""
    if task == "single_object":
        return [Spec(task, ((None, s),)) for s in SHAPES]
    if task == "colors":
        return [Spec(task, ((c, s),)) for c in COLORS for s in SHAPES]
    if task == "counting":
        return [Spec(task, ((None, s),), count=n) for s in SHAPES for n in NUMBERS]
    if task == "two_object":
        return [Spec(task, ((None, a), (None, b))) for a, b in itertools.permutations(SHAPES, 2)]
    if task == "position":
        return [Spec(task, ((None, a), (None, b)), relation=r) for a, b in itertools.permutations(SHAPES, 2) for r in RELATIONS]
    if task == "color_attr":
        return [Spec(task, ((ca, a), (cb, b))) for a, b in itertools.permutations(SHAPES, 2) for ca in COLORS for cb in COLORS]
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def parse_caption(text: str) -> Spec:
    """Inverse of `Spec.caption` (whitespace, case and a trailing ' <boi>' are ignored)."""
    words = text.replace(BOI, " ").lower().split()
    number_of = {v: k for k, v in NUMBERS.items()}

    def obj(ws: list[str]) -> tuple[str | None, str]:
        if len(ws) == 2 and ws[0] == "a" and ws[1] in SHAPES:
            return None, ws[1]
        if len(ws) == 3 and ws[0] == "a" and ws[1] in COLORS and ws[2] in SHAPES:
            return ws[1], ws[2]
        raise ValueError(f"cannot parse caption {text!r}: expected 'a [colour] shape', got {' '.join(ws)!r}")

    if len(words) == 2 and words[0] in number_of and words[1].endswith("s") and words[1][:-1] in SHAPES:
        return Spec("counting", ((None, words[1][:-1]),), count=number_of[words[0]])
    joined = " ".join(words)
    for rel in RELATIONS:
        if f" {rel} " in joined:
            left, right = joined.split(f" {rel} ", 1)
            return Spec("position", (obj(left.split()), obj(right.split())), relation=rel)
    if "and" in words:
        i = words.index("and")
        a, b = obj(words[:i]), obj(words[i + 1:])
        task = "color_attr" if a[0] and b[0] else "two_object"
        if bool(a[0]) != bool(b[0]):
            raise ValueError(f"cannot parse caption {text!r}: give both objects a colour or neither")
        return Spec(task, (a, b))
    c, s = obj(words)
    return Spec("colors" if c else "single_object", ((c, s),))


def _matches(d: Detection, color: str | None, shape: str) -> bool:
    return d.shape == shape and (color is None or d.color == color)


def _related(a: Detection, b: Detection, relation: str) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[relation]


def holds(spec: Spec | str, values: Sequence[int], grid_size: int) -> bool:
    """Is the caption a true statement about the image?

    single_object / colors / two_object / color_attr: each named object is present (with its colour);
    counting: exactly `count` objects of the shape; position: some pair of the two objects stands in the relation.
    """
    spec = parse_caption(spec) if isinstance(spec, str) else spec
    dets = parse_image(values, grid_size)
    if spec.task == "counting":
        (_, shape), = spec.objects
        return sum(d.shape == shape for d in dets) == spec.count
    if spec.task == "position":
        (ca, a), (cb, b) = spec.objects
        return any(_related(x, y, spec.relation) for x in dets if _matches(x, ca, a) for y in dets if _matches(y, cb, b))
    return all(any(_matches(d, c, s) for d in dets) for c, s in spec.objects)


def named_objects(spec: Spec) -> int:
    """How many objects the caption asks for."""
    return spec.count if spec.task == "counting" else len(spec.objects)


def check(spec: Spec | str, values: Sequence[int], grid_size: int, max_extra: int = 2) -> bool:
    """GenEval-style verdict on a generated image: the caption holds (`holds`) and the image shows at most
    `max_extra` objects beyond the ones the caption names.

    The clutter cap stands in for GenEval's object detector, which finds nothing in noise: without it a grid
    of random tokens (about 8 objects in 9 cells) would pass most presence tests. Training scenes carry at
    most 2 extra objects (`scene_for`), so every training image passes.
    """
    spec = parse_caption(spec) if isinstance(spec, str) else spec
    if sum(v != 0 for v in values) > named_objects(spec) + max_extra:
        return False
    return holds(spec, values, grid_size)


def true_specs(values: Sequence[int], grid_size: int) -> dict[str, list[Spec]]:
    """All captions of each task that the image satisfies (enumerated from its objects, not by search)."""
    dets = parse_image(values, grid_size)
    shapes = sorted({d.shape for d in dets}, key=SHAPES.index)
    pairs = sorted({(d.color, d.shape) for d in dets})
    out = {
        "single_object": [Spec("single_object", ((None, s),)) for s in shapes],
        "colors": [Spec("colors", ((c, s),)) for c, s in pairs],
        "counting": [Spec("counting", ((None, s),), count=n) for s in shapes
                     if (n := sum(d.shape == s for d in dets)) in NUMBERS],
        "two_object": [Spec("two_object", ((None, a), (None, b))) for a, b in itertools.permutations(shapes, 2)],
        "position": sorted({Spec("position", ((None, x.shape), (None, y.shape)), relation=r)
                            for x in dets for y in dets if x.shape != y.shape for r in RELATIONS if _related(x, y, r)},
                           key=lambda s: s.caption()),
        "color_attr": [Spec("color_attr", (a, b)) for a, b in itertools.permutations(pairs, 2) if a[1] != b[1]],
    }
    return out


# ---------------------------------------------------------------------------------------------- scenes

def random_scene(rng: random.Random, grid_size: int, min_objects: int = 1, max_objects: int = 4,
                 counting_scenes: float = 0.0) -> list[int]:
    """A scene from the prior: n ~ U{min..max} objects of random colour and shape in distinct random cells.

    With probability `counting_scenes` instead: 2..max_objects objects of one shape (random colours) and up to
    one other object, so that understanding sees many scenes where a count caption is false by one."""
    values = [0] * (grid_size * grid_size)
    if counting_scenes > 0 and rng.random() < counting_scenes:  # no draw when off: keeps the default data stream
        shape = rng.choice(SHAPES)
        k = rng.randint(2, min(max_objects, len(values) - 1))
        cells = rng.sample(range(len(values)), k + 1)
        for cell in cells[:k]:
            values[cell] = cell_value(rng.choice(COLORS), shape)
        if rng.random() < 0.5:
            values[cells[k]] = cell_value(rng.choice(COLORS), rng.choice([s for s in SHAPES if s != shape]))
        return values
    n = rng.randint(min_objects, min(max_objects, grid_size * grid_size))
    for cell in rng.sample(range(len(values)), n):
        values[cell] = rng.randrange(1, NUM_VALUES)
    return values


def scene_for(spec: Spec, rng: random.Random, grid_size: int, max_extra: int = 2) -> list[int]:
    """A scene that satisfies `spec`: the named objects placed at random (colours drawn where the caption
    leaves them open), then up to `max_extra` distractor objects that keep the caption true."""
    cells = grid_size * grid_size
    while True:
        values = [0] * cells
        if spec.task == "counting":
            (_, shape), = spec.objects
            wanted = [(rng.choice(COLORS), shape) for _ in range(spec.count)]
        else:
            wanted = [(c or rng.choice(COLORS), s) for c, s in spec.objects]
        for cell, (c, s) in zip(rng.sample(range(cells), len(wanted)), wanted):
            values[cell] = cell_value(c, s)
        if not holds(spec, values, grid_size):  # a position draw that missed the relation: draw again
            continue
        for _ in range(rng.randint(0, max_extra)):
            empty = [i for i, v in enumerate(values) if v == 0]
            if not empty:
                break
            trial = list(values)
            trial[rng.choice(empty)] = rng.randrange(1, NUM_VALUES)
            if holds(spec, trial, grid_size):
                values = trial
        return values


def sample_spec(rng: random.Random, tasks: Sequence[str] = TASKS) -> Spec:
    """A caption: task uniform, then uniform within the task."""
    return rng.choice(all_specs(rng.choice(list(tasks))))


def geneval_scores(specs: Sequence[Spec], images: Sequence[Sequence[int]], grid_size: int) -> dict[str, float]:
    """GenEval-style accuracy: per task the fraction of images that satisfy their caption, and `overall`
    = the mean of the task accuracies (GenEval's overall score)."""
    if len(specs) != len(images):
        raise ValueError(f"{len(specs)} captions for {len(images)} images")
    per: dict[str, list[bool]] = {}
    for spec, img in zip(specs, images):
        per.setdefault(spec.task, []).append(check(spec, img, grid_size))
    out = {task: sum(v) / len(v) for task, v in per.items()}
    out["overall"] = sum(out.values()) / len(out)
    return out


# ------------------------------------------------------------------------------------- model + tokenizer

def image_token(k: int) -> str:
    return f"<img_{k}>"


def build_tokenizer(extra_words: Sequence[str] = ()):
    """A word-level tokenizer built locally: caption words, the instruction, <boi>/<eoi> and <img_k> tokens.
    `extra_words`: more caption words (e.g. the larger counts and the clutter caption of examples/gvu_captions.py)."""
    words = ["a", "and", "of", "left", "right", "above", "below", "describe", "the", "image", "in", "detail", "."]
    words += list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(NUMBERS.values())
    words += [w for w in extra_words if w not in words]
    return make_umm_tokenizer(words, [image_token(k) for k in range(NUM_VALUES)], boi=BOI, eoi=EOI)


def umm_layout(tokenizer, grid_size: int) -> dict:
    """The `config.umm` section: everything a trainer / reward needs to drive the toy UMM."""
    return make_umm_layout(tokenizer, [image_token(k) for k in range(NUM_VALUES)], boi=BOI, eoi=EOI,
                           prompt_suffix=" " + BOI, instruction=INSTRUCTION, num_image_tokens=grid_size * grid_size,
                           grid_size=grid_size)


def build_toy_umm(grid_size: int = 3, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
                  extra_words: Sequence[str] = ()):
    """A fresh (random) toy UMM: (LlamaForCausalLM with config.umm set, tokenizer)."""
    tokenizer = build_tokenizer(extra_words)
    model = tiny_umm(tokenizer, umm_layout(tokenizer, grid_size), hidden_size=hidden_size, num_layers=num_layers,
                     num_heads=num_heads, seed=seed)
    return model, tokenizer


# ------------------------------------------------------------------------------------------ pre-training

def generation_example(tokenizer, spec: Spec, values: Sequence[int]) -> tuple[list[int], int]:
    """caption <boi> image -> (token ids, index where the supervised part (the image) starts)."""
    layout_ids = [tokenizer.convert_tokens_to_ids(image_token(v)) for v in values]
    prompt = tokenizer(spec.caption() + " " + BOI, add_special_tokens=False)["input_ids"]
    return prompt + layout_ids, len(prompt)


def understanding_example(tokenizer, values: Sequence[int], text: str) -> tuple[list[int], int]:
    """<boi> image <eoi> instruction caption <eos> -> (token ids, index where the caption starts)."""
    image = [tokenizer.convert_tokens_to_ids(image_token(v)) for v in values]
    head = ([tokenizer.convert_tokens_to_ids(BOI)] + image + [tokenizer.convert_tokens_to_ids(EOI)]
            + tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"])
    body = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return head + body, len(head)


def pretraining_batch(tokenizer, rng: random.Random, batch_size: int, grid_size: int, understanding_fraction: float,
                      counting_scenes: float = 0.0):
    """A mixed batch: understanding (a true caption of a prior scene) or generation (a scene drawn for a caption).

    Returns input_ids, attention_mask, labels (-100 outside the supervised part), all [B, T].
    """
    import torch

    rows = []
    for _ in range(batch_size):
        if rng.random() < understanding_fraction:
            values = random_scene(rng, grid_size, counting_scenes=counting_scenes)
            options = [v for v in true_specs(values, grid_size).values() if v]
            rows.append(understanding_example(tokenizer, values, rng.choice(rng.choice(options)).caption()))
        else:
            spec = sample_spec(rng)
            rows.append(generation_example(tokenizer, spec, scene_for(spec, rng, grid_size)))
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch_size, T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, T), dtype=torch.long)
    labels = torch.full((batch_size, T), -100, dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        labels[i, start:len(ids)] = torch.tensor(ids[start:])
    return input_ids, attention_mask, labels


def pretrain(model, tokenizer, steps: int = 1500, batch_size: int = 64, lr: float = 3e-3,
             understanding_fraction: float = 0.8, seed: int = 0, log_every: int = 0,
             counting_scenes: float = 0.0) -> list[float]:
    """Brief next-token pre-training on both directions (more understanding than generation, as in real UMMs).

    Returns the loss of every step. AdamW, linear warm-up then cosine decay.
    """
    import torch

    from align.algos.schedule import lambda_lr

    grid_size = model.config.umm["grid_size"]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    # ramp min(1, (s + 1) / warm) times a cosine over all steps: the shifted ramp over warm - 1 steps, overlapping
    sched = lambda_lr(opt, steps, warm - 1, "cosine", overlap=True)
    model.train()
    losses = []
    for step in range(steps):
        input_ids, attention_mask, labels = pretraining_batch(tokenizer, rng, batch_size, grid_size, understanding_fraction,
                                                              counting_scenes)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
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


def make_toy_umm(out_dir: str | Path, steps: int = 1500, seed: int = 0, grid_size: int = 3,
                 understanding_fraction: float = 0.8, hidden_size: int = 128, log_every: int = 0,
                 counting_scenes: float = 0.0) -> Path:
    """Build, pre-train and save a toy UMM (weights + tokenizer) so `align.train` can load it by path."""
    model, tokenizer = build_toy_umm(grid_size=grid_size, hidden_size=hidden_size, seed=seed)
    losses = pretrain(model, tokenizer, steps=steps, seed=seed, understanding_fraction=understanding_fraction,
                      log_every=log_every, counting_scenes=counting_scenes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"steps": steps, "seed": seed, "final_loss": sum(losses[-50:]) / min(50, len(losses)),
                                                    "understanding_fraction": understanding_fraction,
                                                    "counting_scenes": counting_scenes}, indent=1))
    return out


def image_values(token_ids: Iterable[int], layout: dict) -> list[int]:
    """Image token ids -> cell values (the inverse of the `<img_k>` vocabulary); a non-image id is an error."""
    index = {t: k for k, t in enumerate(layout["image_token_ids"])}
    out = []
    for t in token_ids:
        if int(t) not in index:
            raise ValueError(f"token id {int(t)} is not an image token of this UMM")
        out.append(index[int(t)])
    return out


# ------------------------------------------------------------------------------------------- evaluation

def evaluate_generation(umm, specs: Sequence[Spec], samples_per_prompt: int = 4, seed: int = 0,
                        temperature: float = 1.0, min_p: float = 0.0, top_k: int = 0, cfg_scale: float | None = None,
                        batch_prompts: int = 64) -> tuple[dict[str, float], list[list[int]]]:
    """GenEval-style accuracy of a UMM's images for `specs` (samples_per_prompt each).

    Returns (scores: per task + overall, images: cell values, prompt-major)."""
    layout = umm.layout
    grid = int(layout["grid_size"])
    images: list[list[int]] = []
    for lo in range(0, len(specs), batch_prompts):
        chunk = specs[lo:lo + batch_prompts]
        out = umm.generate_image_tokens([s.caption() + layout["prompt_suffix"] for s in chunk], num_samples=samples_per_prompt,
                                        temperature=temperature, min_p=min_p, top_k=top_k, cfg_scale=cfg_scale, seed=seed + lo)
        images += [image_values(row, layout) for row in out.ids.tolist()]
    expanded = [s for s in specs for _ in range(samples_per_prompt)]
    return geneval_scores(expanded, images, grid), images


def evaluate_understanding(text_logprobs, layout: dict, n: int = 240, distractors: int = 3, seed: int = 0) -> dict[str, float]:
    """Understanding accuracy: for a scene drawn to satisfy a caption, does the GvU score exp(mean log p) rank
    the true caption above `distractors` false captions of the same task (fewer where the task has fewer
    captions: single_object has 2)? Chance = 1 / (1 + distractors) (1/3 for single_object).

    text_logprobs: fn(image_ids: list[list[int]], texts) -> N per-token log-prob tensors (e.g.
    `UnderstandingReward.text_logprobs` or a UMM's `score_text`). Returns per-task and overall accuracy."""
    rng = random.Random(seed)
    grid = int(layout["grid_size"])
    ids_of = layout["image_token_ids"]
    per: dict[str, list[bool]] = {}
    images, texts, groups = [], [], []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        want = min(distractors, len(all_specs(task)) - 1)
        while True:  # redraw until the scene leaves enough false captions of this task
            spec = rng.choice(all_specs(task))
            values = scene_for(spec, rng, grid)
            false = [s for s in all_specs(task) if not holds(s, values, grid)]
            if len(false) >= want:
                break
        options = [spec] + rng.sample(false, want)
        groups.append((task, len(options)))
        for s in options:
            images.append([ids_of[v] for v in values])
            texts.append(s.caption())
    lps = text_logprobs(images, texts)
    pos = 0
    for task, k in groups:
        scores = [float(lp.double().mean()) for lp in lps[pos:pos + k]]
        per.setdefault(task, []).append(max(range(k), key=scores.__getitem__) == 0)
        pos += k
    out = {task: sum(v) / len(v) for task, v in per.items()}
    out["overall"] = sum(out.values()) / len(out)
    return out
