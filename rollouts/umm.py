"""Unified multimodal models (UMMs) that generate images as discrete tokens and also read them.

One small interface, two adapters:

    umm.num_image_tokens                                   K, tokens per image
    umm.generate_image_tokens(prompts, temperature=1.0, top_k=0, min_p=0.0, cfg_scale=None, num_samples=1, seed=None)
        -> ImageTokens(ids [N, K], logprobs [N, K])         N = len(prompts) * num_samples, prompt-major
    umm.image_logprobs(prompts, ids [N, K]) -> [N, K]      teacher-forced log-probs of image tokens (GRPO's policy term)
    umm.score_text(ids [N, K], texts) -> list of N [L_i]   teacher-forced log p(T_j | image, instruction, T_<j)

`CausalLMUMM` drives a plain Hugging Face causal LM whose vocabulary holds image tokens (the toy UMM of
examples/toyworld.py; any model saved with a `umm` section in its config.json). `JanusUMM` drives
`transformers`' `JanusForConditionalGeneration` (image tokens come from its generation head; understanding
reads the VQ-decoded image through its vision encoder, as Janus does).

Log-probs are of the raw (temperature-1, unguided, untruncated) conditional policy, the quantity the GRPO
trainer recomputes; sampling may use temperature, top-k, min-p and classifier-free guidance.

The `umm` config section (this module owns the layout: `make_umm_layout` writes it, `umm_layout` reads it):
    num_image_tokens (K), image_token_ids (the ids an image token may take), boi_token_id, eoi_token_id,
    prompt_suffix (appended to a caption to ask for an image, e.g. " <boi>"), instruction (between the image
    and the text in understanding mode, e.g. "\\nDescribe the image in detail.\\n"); optional `format`
    (a version tag) and model-specific extras (the toy world's `grid_size`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from align.algos.positions import position_ids_from_mask

UMM_CONFIG_KEYS = ("num_image_tokens", "image_token_ids", "boi_token_id", "eoi_token_id", "prompt_suffix", "instruction")
UMM_LAYOUT_FORMAT = "align-toy-umm/1"


@dataclass
class ImageTokens:
    """ids: [N, K] image token ids; logprobs: [N, K] their log-probs under the raw conditional policy."""

    ids: torch.Tensor
    logprobs: torch.Tensor


def umm_layout(model_or_config_or_path: Any) -> dict:
    """The `umm` section of a UMM's config (a model, its config, or a saved model directory); a native Janus
    directory (model_type: janus, no `umm` section) gets its layout from align.rollouts.janus.janus_layout."""
    cfg = model_or_config_or_path
    if isinstance(cfg, (str, bytes)) or hasattr(cfg, "__fspath__"):
        from transformers import AutoConfig

        from align.rollouts.janus import is_janus, janus_layout_from_path

        path, cfg = cfg, AutoConfig.from_pretrained(cfg)
        if is_janus(cfg) and not isinstance(getattr(cfg, "umm", None), dict):  # HF's native Janus format
            return janus_layout_from_path(path)
    cfg = getattr(cfg, "config", cfg)
    layout = getattr(cfg, "umm", None)
    if not isinstance(layout, dict):
        raise ValueError("this model's config.json has no `umm` section; write one with "
                         "align.rollouts.umm.make_umm_layout (keys " + ", ".join(UMM_CONFIG_KEYS) + ")")
    missing = [k for k in UMM_CONFIG_KEYS if k not in layout]
    if missing:
        raise ValueError(f"the `umm` config section lacks {', '.join(missing)}; add them (see rollouts.umm)")
    return dict(layout)


def make_umm_layout(tokenizer, image_tokens: Sequence[str], *, boi: str, eoi: str, prompt_suffix: str,
                    instruction: str, num_image_tokens: int, format: str = UMM_LAYOUT_FORMAT, **extra) -> dict:
    """The `umm` config section for a causal LM whose vocabulary holds `image_tokens` (cell / code values in
    order: image_token_ids[v] is the id of value v) and the `boi` / `eoi` markers. `extra` keys (e.g. the toy
    world's grid_size) are kept after the standard ones. Set it as `model.config.umm = layout` before
    `save_pretrained`; `umm_layout` reads it back."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in image_tokens]
    if num_image_tokens < 1 or not ids:
        raise ValueError(f"make_umm_layout: need num_image_tokens >= 1 and image tokens, got {num_image_tokens}, {len(ids)}")
    return {
        "format": format,
        "num_image_tokens": int(num_image_tokens),
        "image_token_ids": ids,
        "boi_token_id": tokenizer.convert_tokens_to_ids(boi),
        "eoi_token_id": tokenizer.convert_tokens_to_ids(eoi),
        "prompt_suffix": prompt_suffix,
        "instruction": instruction,
        **extra,
    }


def umm_generation_spec(model_or_config_or_path: Any, tokenizer: Any = None) -> dict:
    """What a text rollout engine needs to sample exactly one image per prompt:
    allowed_token_ids, num_image_tokens, min_new_tokens = max_new_tokens = K, stop_token_ids = [], prompt_suffix.
    (`tokenizer` is accepted for symmetry with other spec readers; the ids come from the checkpoint's config.)"""
    layout = umm_layout(model_or_config_or_path)
    k = int(layout["num_image_tokens"])
    return {
        "allowed_token_ids": [int(t) for t in layout["image_token_ids"]],
        "num_image_tokens": k,
        "min_new_tokens": k,
        "max_new_tokens": k,
        "stop_token_ids": [],
        "prompt_suffix": layout["prompt_suffix"],
    }


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Run the block under `torch.manual_seed(seed)` without disturbing the caller's RNG (no-op for None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32. logits [..., V], targets [...] -> [...]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def teacher_forced_logprobs(model, rows: Sequence[Sequence[int]], starts: Sequence[int], pad_token_id: int) -> list[torch.Tensor]:
    """log p(row[t] | row[:t]) for t >= start of each row, one right-padded forward pass.

    rows: N token-id lists; starts: N indices (>= 1) where the scored part begins. Returns N tensors [len - start].
    """
    device = next(model.parameters()).device
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long, device=device)
    att = torch.zeros((len(rows), T), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        att[i, :len(r)] = 1
    logits = model(input_ids=ids, attention_mask=att).logits  # [N, T, V]
    lp = _gather_logprobs(logits[:, :-1], ids[:, 1:])  # [N, T-1]: position t-1 predicts token t
    return [lp[i, s - 1:len(r) - 1] for i, (r, s) in enumerate(zip(rows, starts))]


class _AllowedTokens:
    """Logits processor: every token outside `allowed` gets -inf (images contain only image tokens)."""

    def __init__(self, allowed: Sequence[int], vocab_size: int, device):
        self.mask = torch.full((vocab_size,), float("-inf"), device=device)
        self.mask[torch.as_tensor(list(allowed), device=device)] = 0.0

    def __call__(self, input_ids, scores):
        return scores + self.mask[: scores.shape[-1]].to(scores.dtype)


class _ConditionalHalf:
    """Logits processor for Janus without CFG: scores [2N, V] (conditional rows first) -> [N, V]."""

    def __call__(self, input_ids, scores):
        return scores[: scores.shape[0] // 2]


class CausalLMUMM:
    """A causal LM whose vocabulary holds image tokens (e.g. the toy UMM of examples/toyworld.py).

    Text-to-image: `caption + prompt_suffix` then exactly K image tokens.
    Understanding: `<boi> image <eoi> instruction` then the text, teacher-forced.
    """

    def __init__(self, model, tokenizer, layout: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.layout = layout if layout is not None else umm_layout(model)
        self.num_image_tokens = int(self.layout["num_image_tokens"])
        self.image_token_ids = [int(t) for t in self.layout["image_token_ids"]]

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "CausalLMUMM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        return cls(model, AutoTokenizer.from_pretrained(path))

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def prompt(self, caption: str) -> str:
        """The text-to-image prompt for a caption."""
        return caption + self.layout["prompt_suffix"]

    @torch.no_grad()
    def generate_image_tokens(self, prompts: Sequence[str], *, temperature: float = 1.0, top_k: int = 0,
                              min_p: float = 0.0, cfg_scale: float | None = None, num_samples: int = 1,
                              seed: int | None = None) -> ImageTokens:
        """Sample K image tokens per (prompt, sample). Prompts are full prompts (ending in the prompt suffix).

        cfg_scale: classifier-free guidance against the prompt `<boi>` alone (None or 1 = off).
        """
        tok = self.tokenizer
        rows = [ids for ids in self._encode(prompts) for _ in range(num_samples)]
        P = max(len(r) for r in rows)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=self.device)
        att = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=self.device)
        K = self.num_image_tokens
        extra: dict[str, Any] = {}
        if cfg_scale is not None and cfg_scale != 1.0:
            extra["guidance_scale"] = float(cfg_scale)
            extra["negative_prompt_ids"] = torch.full((len(rows), 1), int(self.layout["boi_token_id"]), device=self.device)
        processor = _AllowedTokens(self.image_token_ids, self.model.config.vocab_size, self.device)
        with _seeded(seed):
            out = self.model.generate(
                input_ids=ids, attention_mask=att, do_sample=True, temperature=temperature, top_k=top_k or None,
                top_p=1.0, min_p=min_p or None, max_new_tokens=K, min_new_tokens=K, logits_processor=[processor],
                output_logits=True, return_dict_in_generate=True, pad_token_id=pad, eos_token_id=None, **extra)
        image = out.sequences[:, P:]
        if image.shape[1] != K:
            raise RuntimeError(f"generation returned {image.shape[1]} image tokens, expected {K}")
        # output_logits are the raw conditional logits: log-probs of the temperature-1 policy.
        logits = torch.stack(out.logits, dim=1)  # [N, K, V]
        return ImageTokens(ids=image, logprobs=_gather_logprobs(logits, image))

    def image_logprobs(self, prompts: Sequence[str], image_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log p(image token k | prompt, image_<k) [N, K] (grad flows when enabled)."""
        prompt_rows = self._encode(prompts)
        rows = [p + [int(t) for t in img] for p, img in zip(prompt_rows, image_ids.tolist())]
        lps = teacher_forced_logprobs(self.model, rows, [len(p) for p in prompt_rows], self.tokenizer.pad_token_id)
        return torch.stack(lps)

    def understanding_rows(self, image_ids: torch.Tensor | Sequence[Sequence[int]], texts: Sequence[str]):
        """(rows, starts): `<boi> image <eoi> instruction text` and where the text starts."""
        head_tail = self.tokenizer(self.layout["instruction"], add_special_tokens=False)["input_ids"]
        rows, starts = [], []
        for img, text_ids in zip(torch.as_tensor(image_ids).tolist(), self._encode(texts)):
            if not text_ids:
                raise ValueError("cannot score an empty text")
            head = [int(self.layout["boi_token_id"])] + img + [int(self.layout["eoi_token_id"])] + head_tail
            rows.append(head + text_ids)
            starts.append(len(head))
        return rows, starts

    @torch.no_grad()
    def score_text(self, image_ids, texts: Sequence[str]) -> list[torch.Tensor]:
        """Teacher-forced per-token log p(T_j | image, instruction, T_<j): N tensors [L_i] (float32)."""
        rows, starts = self.understanding_rows(image_ids, texts)
        return teacher_forced_logprobs(self.model, rows, starts, self.tokenizer.pad_token_id)


class JanusUMM:
    """`transformers`' JanusForConditionalGeneration behind the UMM interface.

    Generation: `prompt <boi>` then K = vision_config.num_image_tokens tokens from the generation head
    (Janus' own CFG loop). Understanding: the image tokens are VQ-decoded to pixels, resized to the vision
    encoder's input size and read through the vision encoder at `image_token_id` placeholders:
    `[<boi>] <image>*n [<eoi>] instruction text`.
    """

    def __init__(self, model, tokenizer, instruction: str = "\nDescribe the image in detail.\n",
                 boi_token_id: int | None = None, eoi_token_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.instruction = instruction
        gen_kwargs = getattr(model.generation_config, "generation_kwargs", None) or {}
        self.boi_token_id = boi_token_id if boi_token_id is not None else gen_kwargs.get("boi_token_id")
        if self.boi_token_id is None:
            raise ValueError("JanusUMM needs boi_token_id: pass it or set generation_config.generation_kwargs={'boi_token_id': ...}")
        # Janus' image loop reads boi from generation_kwargs; a reloaded generation config can lose it.
        model.generation_config.generation_kwargs = {**gen_kwargs, "boi_token_id": int(self.boi_token_id)}
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eoi_token_id = eoi_token_id
        self.num_image_tokens = int(model.model.vision_model.config.num_image_tokens)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _prompt_rows(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] + [int(self.boi_token_id)] for p in prompts]

    @torch.no_grad()
    def generate_image_tokens(self, prompts: Sequence[str], *, temperature: float = 1.0, top_k: int = 0,
                              min_p: float = 0.0, cfg_scale: float | None = None, num_samples: int = 1,
                              seed: int | None = None) -> ImageTokens:
        rows = [r for r in self._prompt_rows(prompts) for _ in range(num_samples)]
        P = max(len(r) for r in rows)
        pad = self.model.generation_config.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.pad_token_id or 0)
        ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=self.device)
        att = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=self.device)
        guided = cfg_scale is not None and cfg_scale > 1.0
        with _seeded(seed):
            # Janus' image loop always runs a conditional and an unconditional half; without CFG its processor
            # never merges them (transformers 5.x fails on the shape), so keep the conditional half ourselves.
            image = self.model.generate(
                inputs=ids, attention_mask=att, generation_mode="image", do_sample=True, temperature=temperature,
                top_k=top_k or None, min_p=min_p or None, guidance_scale=float(cfg_scale) if guided else 1.0,
                logits_processor=None if guided else [_ConditionalHalf()])
        # Janus' loop does not return per-step logits: recompute the raw conditional log-probs (teacher-forced).
        return ImageTokens(ids=image, logprobs=self.image_logprobs(prompts if num_samples == 1 else
                                                                   [p for p in prompts for _ in range(num_samples)], image))

    def image_logprobs(self, prompts: Sequence[str], image_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log p(image token k | prompt <boi>, image_<k) from the generation head: [N, K]."""
        m = self.model
        rows = self._prompt_rows(prompts)
        K = image_ids.shape[1]
        P = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows], device=self.device)
        att = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows], device=self.device)
        text_emb = m.get_input_embeddings()(ids)
        img_emb = m.prepare_embeddings_for_image_generation(image_ids.to(self.device))
        emb = torch.cat([text_emb, img_emb.to(text_emb.dtype)], dim=1)
        att = torch.cat([att, torch.ones_like(image_ids, device=self.device)], dim=1)
        pos = position_ids_from_mask(att)
        hidden = m.model.language_model(inputs_embeds=emb, attention_mask=att, position_ids=pos).last_hidden_state
        scores = m.model.generation_head(hidden[:, P - 1:P - 1 + K])  # position P-1+k predicts image token k
        return _gather_logprobs(scores, image_ids.to(self.device))

    def pixel_values(self, image_ids: torch.Tensor) -> torch.Tensor:
        """VQ-decode image tokens and resize to the vision encoder's input: [N, C, S, S] in [-1, 1]."""
        pixels = self.model.decode_image_tokens(image_ids.to(self.device)).permute(0, 3, 1, 2)  # [N, C, H, W]
        size = self.model.config.vision_config.image_size
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        return pixels.clamp(-1.0, 1.0)

    @torch.no_grad()
    def score_text(self, image_ids: torch.Tensor, texts: Sequence[str]) -> list[torch.Tensor]:
        """Teacher-forced per-token log p(T_j | image, instruction, T_<j): N tensors [L_i] (float32)."""
        m = self.model
        n_vis = int(m.config.vision_config.num_image_tokens)
        head = ([self.boi_token_id] if self.boi_token_id is not None else []) + [int(m.config.image_token_id)] * n_vis
        head += [self.eoi_token_id] if self.eoi_token_id is not None else []
        head += self.tokenizer(self.instruction, add_special_tokens=False)["input_ids"]
        text_rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if any(not r for r in text_rows):
            raise ValueError("cannot score an empty text")
        T = len(head) + max(len(r) for r in text_rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(texts), T), pad, dtype=torch.long, device=self.device)
        att = torch.zeros_like(ids)
        for i, r in enumerate(text_rows):
            ids[i, :len(head) + len(r)] = torch.tensor(head + r)
            att[i, :len(head) + len(r)] = 1
        pixels = self.pixel_values(image_ids).to(m.dtype)
        logits = m(input_ids=ids, attention_mask=att, pixel_values=pixels).logits
        lp = _gather_logprobs(logits[:, :-1], ids[:, 1:])
        return [lp[i, len(head) - 1:len(head) + len(r) - 1] for i, r in enumerate(text_rows)]
