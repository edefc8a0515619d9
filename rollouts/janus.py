"""Hugging Face's native Janus format (`JanusForConditionalGeneration`, e.g. Janus-Pro-1B converted) for
`align.train` with `model.kind: umm`.

A native Janus directory has no `umm` section: its layout comes from the checkpoint itself
(`janus_layout`): K = vision_config.num_image_tokens, the image tokens are the VQ codebook
(vq_config.num_embeddings codes), boi = generation_config.generation_kwargs["boi_token_id"] (or the
processor's "<begin_of_image>" token), eoi = "<end_of_image>".

The trainer and the rollout engine speak one token-id space with one lm_head. `JanusImageLM` presents Janus as
such a causal LM: ids [0, V) are text (V = text_config.vocab_size), id V + c is VQ code c (embedded by Janus'
generation embedding + aligner). Its "decoder" is the language model followed by the generation head's
proj_out + activation, its "lm_head" is the generation head's vision_head behind V rows of zero weight and
bias -1e4 (text can never be sampled as an image token and gets probability exp(-1e4) = 0, so log-probs are
exactly those of Janus' codebook softmax). Understanding (`score_text`) reads the VQ-decoded image through
the vision encoder, as Janus does (`JanusUMM`).

Classifier-free guidance (`set_guidance_scale`, `rollout.guidance_scale`): in cached (rollout) forwards the
logits are uncond + s * (cond - uncond), the unconditional branch being Janus' recipe: the same prompt with
every token other than BOS and boi replaced by the pad token, fed the same image tokens, in its own KV cache.
Training forwards (no cache) are never guided: GRPO optimises the raw conditional policy.
"""
from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.rollouts.hf_cache import cache_keyword
from align.rollouts.umm import JanusUMM

JANUS_LAYOUT_FORMAT = "hf-janus/1"
BOI_TOKEN, EOI_TOKEN = "<begin_of_image>", "<end_of_image>"  # JanusProcessor's image start / end tokens
TEXT_LOGIT = -1e4  # logit of a text id at an image position: exp(-1e4) is 0 in float32, no inf/nan in entropy
DEFAULT_INSTRUCTION = "\nDescribe the image in detail.\n"


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Janus' classifier-free guidance: uncond + scale * (cond - uncond) (scale 1 = cond)."""
    return uncond + scale * (cond - uncond)


def is_janus(config: Any) -> bool:
    """True for a JanusConfig (or a model / directory whose config.json says model_type: janus)."""
    if isinstance(config, (str, Path)):
        file = Path(config) / "config.json"
        if file.is_file():
            return json.loads(file.read_text()).get("model_type") == "janus"
        try:  # a hub name: its (cached) config
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(str(config)).model_type == "janus"
        except (OSError, ValueError):
            return False
    return getattr(getattr(config, "config", config), "model_type", None) == "janus"


def janus_layout(config, generation_config=None, tokenizer=None, instruction: str = DEFAULT_INSTRUCTION) -> dict:
    """The `umm` layout of a native Janus checkpoint (see the module docstring)."""
    offset = int(config.text_config.vocab_size)
    codes = int(config.vq_config.num_embeddings)
    gen_kwargs = getattr(generation_config, "generation_kwargs", None) or {}
    boi = gen_kwargs.get("boi_token_id")

    def token(name):
        if tokenizer is None:
            return None
        i = tokenizer.convert_tokens_to_ids(name)
        return None if i is None or i == tokenizer.unk_token_id else int(i)

    boi = int(boi) if boi is not None else token(BOI_TOKEN)
    if boi is None:
        raise ValueError(f"this Janus checkpoint names no boi token: generation_config.json has no "
                         f"generation_kwargs.boi_token_id and the tokenizer has no {BOI_TOKEN}; add one of them")
    eoi = token(EOI_TOKEN)
    boi_text = tokenizer.convert_ids_to_tokens(boi) if tokenizer is not None else BOI_TOKEN
    return {"format": JANUS_LAYOUT_FORMAT, "num_image_tokens": int(config.vision_config.num_image_tokens),
            "image_token_ids": list(range(offset, offset + codes)), "boi_token_id": boi,
            "eoi_token_id": eoi, "prompt_suffix": boi_text, "instruction": instruction, "image_id_offset": offset}


def janus_layout_from_path(path) -> dict:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: fall back to the tokenizer's boi token
        gen = None
    return janus_layout(AutoConfig.from_pretrained(path), gen, AutoTokenizer.from_pretrained(path))


class _OffsetHead(nn.Module):
    """[V text rows: weight 0, bias TEXT_LOGIT] + Janus' vision_head rows; `weight` / `bias` are views built on
    demand (gradients reach vision_head). Not registered as a submodule: it owns no parameters."""

    def __init__(self, vision_head: nn.Linear, offset: int):
        super().__init__()
        object.__setattr__(self, "vision_head", vision_head)
        self.offset = offset

    @property
    def weight(self) -> torch.Tensor:
        w = self.vision_head.weight
        return torch.cat([w.new_zeros(self.offset, w.shape[1]), w])

    @property
    def bias(self) -> torch.Tensor:
        b = self.vision_head.bias
        return torch.cat([b.new_full((self.offset,), TEXT_LOGIT), b])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


class _ImageDecoder(nn.Module):
    """Language model + generation head proj_out + activation: the hidden state the offset head reads."""

    def __init__(self, owner: "JanusImageLM"):
        super().__init__()
        object.__setattr__(self, "owner", owner)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.owner._decode(input_ids, attention_mask, position_ids, **kwargs)


class JanusImageLM(nn.Module):
    """`JanusForConditionalGeneration` as a causal LM over text ids + offset VQ codes (module docstring)."""

    def __init__(self, janus, tokenizer, layout: dict | None = None):
        super().__init__()
        self.janus = janus
        self.tokenizer = tokenizer
        self.layout = layout or janus_layout(janus.config, janus.generation_config, tokenizer)
        janus.config.umm = self.layout  # the trainer, the reward and the sampling spec read it from the config
        self.offset = int(self.layout["image_id_offset"])
        self.guidance_scale = 1.0
        self._uncond_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine cache -> uncond cache
        object.__setattr__(self, "_head", _OffsetHead(janus.model.generation_head.vision_head, self.offset))
        object.__setattr__(self, "_decoder", _ImageDecoder(self))
        self._lm_cache_kw = cache_keyword(janus.model.language_model)
        gen = janus.generation_config
        self.bos_token_id = gen.bos_token_id if gen.bos_token_id is not None else tokenizer.bos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # --- what the trainer and the engine read -------------------------------------------------------
    @property
    def config(self):
        return self.janus.config

    @property
    def generation_config(self):
        return self.janus.generation_config

    def get_decoder(self):
        return self._decoder

    def get_output_embeddings(self):
        return self._head

    def get_input_embeddings(self):
        return self.janus.get_input_embeddings()

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PEFT's causal-LM wrapper looks it up
        raise NotImplementedError("JanusImageLM is sampled by align's rollout engine, not by generate()")

    def gradient_checkpointing_enable(self, **kwargs):
        self.janus.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, *args, **kwargs):
        return self.janus.save_pretrained(*args, **kwargs)

    def set_guidance_scale(self, scale: float) -> None:
        if scale <= 0:
            raise ValueError(f"guidance scale must be > 0, got {scale}")
        self.guidance_scale = float(scale)

    # --- forward ------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_text = input_ids < self.offset
        text = self.janus.get_input_embeddings()(input_ids.clamp(max=self.offset - 1))
        image = self.janus.prepare_embeddings_for_image_generation((input_ids - self.offset).clamp(min=0))
        return torch.where(is_text.unsqueeze(-1), text, image.to(text.dtype))

    def _decode(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        lm = self.janus.model.language_model
        kw = {self._lm_cache_kw: cache} if cache is not None else {}
        out = lm(inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=use_cache, **kw)
        head = self.janus.model.generation_head
        return BaseModelOutputWithPast(last_hidden_state=head.activation_fn(head.proj_out(out.last_hidden_state)),
                                       past_key_values=getattr(out, "past_key_values", None))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, logits_to_keep: int = 0, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        cache = cache if cache is not None else past_key_values
        hidden = self._decode(input_ids, attention_mask, position_ids, cache=cache, use_cache=use_cache).last_hidden_state
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self._head(hidden[:, keep])
        if cache is not None and self.guidance_scale != 1.0:
            uncond = self._head(self._uncond_hidden(input_ids, attention_mask, position_ids, cache)[:, keep])
            logits = cfg_combine(logits, uncond, self.guidance_scale)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def unconditional_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Janus' unconditional prompt: every token that is neither BOS nor boi becomes the pad token."""
        keep = (input_ids == self.bos_token_id) | (input_ids == int(self.layout["boi_token_id"]))
        return input_ids.masked_fill(~keep, self.pad_token_id)

    def _uncond_hidden(self, input_ids, attention_mask, position_ids, cache):
        # A prefill (more than one new token: a Janus image prompt holds at least text + boi) starts a fresh
        # unconditional cache of the engine's kind; decode steps feed it the same image token as the
        # conditional branch. Host-side shapes only, so a captured CUDA-graph step replays the same ops.
        # A static cache is reused (reset) per engine cache: a captured graph holds its buffers' addresses.
        if input_ids.shape[1] > 1 or cache not in self._uncond_caches:
            from transformers import DynamicCache, StaticCache

            if isinstance(cache, StaticCache):
                uncond = self._uncond_caches.get(cache)
                if uncond is None:
                    uncond = StaticCache(config=self.config, max_cache_len=cache.get_max_length())
                uncond.reset()
            else:
                uncond = DynamicCache(config=self.config)
            self._uncond_caches[cache] = uncond
            input_ids = self.unconditional_ids(input_ids)
        return self._decode(input_ids, attention_mask, position_ids, cache=self._uncond_caches[cache],
                            use_cache=True).last_hidden_state

    # --- understanding (the GvU reward) ---------------------------------------------------------------
    def score_text(self, image_ids, texts) -> list[torch.Tensor]:
        """Teacher-forced log p(T_j | image, instruction, T_<j) with Janus' vision encoder; image_ids are the
        offset ids this model samples."""
        umm = JanusUMM(self.janus, self.tokenizer, instruction=self.layout["instruction"],
                       boi_token_id=int(self.layout["boi_token_id"]), eoi_token_id=self.layout["eoi_token_id"])
        return umm.score_text(torch.as_tensor(image_ids) - self.offset, texts)


def load_janus_image_lm(path, dtype: torch.dtype, device: torch.device, gradient_checkpointing: bool = False) -> JanusImageLM:
    """Load a native Janus directory as a `JanusImageLM` (layout from `janus_layout_from_path`)."""
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    janus = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = JanusImageLM(janus, tokenizer, janus_layout_from_path(path))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        janus.config.use_cache = False
    return model.to(device)
