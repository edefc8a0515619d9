"""Typed, validated configuration for PPO and GRPO runs.

Every section is a dataclass validated on construction: the field types are checked (ints widen to
floats, nested dicts become sections), then each section's `validate()` checks values. A bad value
raises `ConfigError` with one line that names the dotted key, what is allowed and how to fix it;
an unknown key suggests the closest valid one (that machinery, shared by every command, is
`align.config_schema`). `load_config(path, overrides)` reads YAML or JSON and applies dotted `key=value`
overrides (`train.lr=1e-5`, `reward.functions=[math_verify]`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from align.algo_config import (  # noqa: F401  (re-exported: the algo sections)
    DynamicSamplingConfig,
    GRPOAlgoConfig,
    PPOAlgoConfig,
    RolloutCorrectionConfig,
    _PolicyOptimConfig,
)
from align.config_schema import Section, _to_plain, apply_overrides, build, read_config_file  # noqa: F401  (re-exported)
from align.errors import ConfigError
from align.infra_config import (  # noqa: F401  (re-exported: the infrastructure sections)
    REPORT_TO,
    CheckpointConfig,
    ClusterConfig,
    DistributedConfig,
    LoggingConfig,
)

# ----------------------------------------------------------------------------------------------------
# Sections


@dataclass
class LoraConfig(Section):
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"

    def validate(self) -> None:
        self.check(self.r >= 1, "r", "LoRA rank must be >= 1")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


@dataclass
class ModelConfig(Section):
    path: str = ""  # a Hugging Face model name or a local directory
    # umm: a unified multimodal model whose checkpoint config.json carries an `umm` section (image token ids,
    # image length, instruction); GRPO then samples image tokens (see docs/experiments/gvu.md)
    kind: Literal["causal_lm", "umm"] = "causal_lm"
    # auto: fp32 masters + bf16 autocast + TF32 + bf16 reference and decode copy on CUDA, fp32 on CPU (align.precision);
    # float16 is refused (training it needs a GradScaler)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    tokenizer_path: str = ""  # default: the model path
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    critic: Literal["value_head", "separate"] = "value_head"  # PPO only
    critic_path: str = ""  # separate critic's initial weights (default: the policy path)

    def validate(self) -> None:
        self.check(bool(self.path), "path", "set model.path to a Hugging Face model name or a local checkpoint directory")
        self.check(self.dtype != "float16", "dtype", "float16 would train without a GradScaler (fp16 gradients "
                   "underflow); use auto (bf16 autocast on CUDA) or bfloat16")


@dataclass
class DataConfig(Section):
    path: str = ""  # .jsonl/.json/.parquet/.csv file, saved `datasets` dir or dir of data files, hub name
    split: str = "train"
    prompt_key: str = "prompt"
    chat_template: bool | None = None  # unset: template on message-list prompts; true: strings too; false: text only
    max_prompt_length: int = 256
    shuffle: bool = True

    def validate(self) -> None:
        self.check(bool(self.path), "path", "set data.path to a JSONL file or a dataset")
        self.check(self.max_prompt_length >= 1, "max_prompt_length", "must be >= 1")


@dataclass
class RolloutConfig(Section):
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    min_new_tokens: int = 0  # stop tokens (EOS) are suppressed before this many tokens
    ignore_eos: bool = False
    sampler_backend: Literal["auto", "triton", "torch"] = "auto"
    micro_batch_size: int = 64  # sequences generated together
    # Use the rollout's own log-probs as old_logprobs (skips one forward pass). Valid when the rollout runs
    # the trainer's weights in the trainer's dtype; see docs/engine.md "Log-prob agreement".
    use_rollout_logprobs: bool = False
    # Classifier-free guidance for image tokens (model.kind umm, native Janus): uncond + s * (cond - uncond); 1 = off
    guidance_scale: float = 1.0
    # Partial rollouts (train.max_staleness >= 1, local backend): a response cut by a weight update continues
    # under the new weights from (prompt + prefix), KV cache recomputed; docs/async.md
    partial: bool = False
    partial_chunk_tokens: int = 16  # partial rollouts: tokens decoded between checks for newer weights
    # Tool episodes (docs/tool_use.md): the policy calls tools mid-generation; on when tools or environment is set
    tools: list[str] = field(default_factory=list)  # align.tools names (calculator, python, ...): the built-in env
    environment: str = ""  # "module:Class" of an Environment (built with no arguments), instead of `tools`
    tool_format: Literal["hermes", "themis"] = "hermes"
    tool_chat_template: str = ""  # hermes: "" = the tokenizer's template, "tiny" = the test tokenizer's, or Jinja
    max_turns: int = 8  # policy turns per episode
    max_tool_calls: int = 16  # tool calls per episode
    max_observation_tokens: int = 256  # per tool output (cut with a marker); max_new_tokens counts policy + observation
    tool_timeout_s: float = 30.0  # per call
    tool_workers: int = 16  # bounded pool running the calls

    def validate(self) -> None:
        for k in ("max_turns", "max_tool_calls", "max_observation_tokens", "tool_workers"):
            self.check(getattr(self, k) >= 1, k, "must be >= 1")
        self.check(self.tool_timeout_s > 0, "tool_timeout_s", "must be > 0")
        self.check(not (self.tools and self.environment), "environment",
                   "set either rollout.tools (the built-in environment) or rollout.environment, not both")
        self.check(not self.environment or ":" in self.environment, "environment",
                   "must be 'module:Class' (an importable Environment class)")
        self.check(self.guidance_scale > 0.0, "guidance_scale", "must be > 0 (1 disables guidance)")
        self.check(self.guidance_scale == 1.0 or not self.use_rollout_logprobs, "guidance_scale",
                   "guided rollouts record guided log-probs; set use_rollout_logprobs: false")
        self.check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        self.check(self.temperature >= 0.0, "temperature", "must be >= 0 (0 = greedy)")
        self.check(self.top_k >= 0, "top_k", "must be >= 0 (0 disables top-k)")
        self.check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1] (1 disables top-p)")
        self.check(0.0 <= self.min_p < 1.0, "min_p", "must be in [0, 1) (0 disables min-p)")
        self.check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        self.check(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "must be in [0, max_new_tokens]")
        self.check(self.partial_chunk_tokens >= 1, "partial_chunk_tokens", "must be >= 1")
        if self.use_rollout_logprobs:
            self.check(self.temperature == 1.0, "temperature", "use_rollout_logprobs needs temperature 1 (the rollout "
                       "records temperature-1 log-probs; the trainer's are at the sampling temperature)")


@dataclass
class CuriosityConfig(Section):
    """CD-RLHF intrinsic reward (PAPERS.md §2). eta = 0 reproduces plain PPO exactly. The paper's
    clip(RM score, -2.5, 2.5) is `reward.clip: 2.5`."""

    removed_keys: ClassVar[dict[str, str]] = {
        "score_clip": "set reward.clip instead (e.g. reward.clip: 2.5, the CD-RLHF value; one clip for every algorithm)"}
    eta: float = 0.0
    top_k: int = 1
    lr: float = 1e-5
    squared: bool = False  # the paper's squared L2 loss; the released code uses the plain norm
    whiten_include_padding: bool = False  # the released code lets padding zeros into the whitening statistics

    def validate(self) -> None:
        self.check(self.eta >= 0.0, "eta", "must be >= 0")
        self.check(self.top_k >= 1, "top_k", "must be >= 1")
        self.check(self.lr > 0.0, "lr", "must be > 0")


@dataclass
class OverlongBufferConfig(Section):
    """DAPO's soft over-long punishment (arXiv 2503.14476 eq. 13; verl's `overlong_buffer`): a response longer
    than rollout.max_new_tokens - len gets a penalty growing linearly to -penalty_factor at max_new_tokens,
    added to its score (`align.algos.overlong_penalty`)."""

    enable: bool = False  # off by default
    len: int = 0  # the buffer length L_cache in tokens (1 .. rollout.max_new_tokens when enabled)
    penalty_factor: float = 1.0  # the penalty at the full length L_max

    def validate(self) -> None:
        if self.enable:
            self.check(self.len >= 1, "len", "set the buffer length (tokens, >= 1) when enable is true")
            self.check(self.penalty_factor >= 0.0 and math.isfinite(self.penalty_factor), "penalty_factor",
                       "must be a finite number >= 0")


@dataclass
class RewardConfig(Section):
    # Each entry: a registered name ("math_verify"), {"name": ..., "weight": ..., "kwargs": {...}},
    # an import path "package.module:attr", or (from Python) a callable / RewardFunction.
    functions: list[Any] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # optional, one per function (default 1.0)
    remote_url: str = ""  # score through a running `align serve-rewards`
    remote_token: str = ""
    clip: Union[float, None] = None  # clip scores to [-clip, clip] after mixing (the one score clip; CD-RLHF uses 2.5)
    normalize: Literal["none", "running"] = "none"
    normalize_by: Union[str, None] = None  # with normalize=running: separate statistics per value of this column
    curiosity: Union[CuriosityConfig, None] = None
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)

    def validate(self) -> None:
        self.check(bool(self.functions) or bool(self.remote_url), "functions",
                   "set reward.functions (e.g. [math_verify]) or reward.remote_url")
        for i, item in enumerate(self.functions):
            ok = isinstance(item, (str, dict)) or callable(item)
            if not ok:
                raise ConfigError(f"functions[{i}] = {item!r}: must be a reward name, a mapping {{name, weight, kwargs}} or a callable")
            if isinstance(item, dict):
                unknown = set(item) - {"name", "weight", "kwargs"}
                if unknown or "name" not in item:
                    raise ConfigError(f"functions[{i}] = {item!r}: a mapping needs 'name' and may have 'weight', 'kwargs'")
        if self.weights:
            self.check(len(self.weights) == len(self.functions), "weights", "give one weight per reward function")
        if self.clip is not None:
            self.check(self.clip > 0, "clip", "must be > 0 (or null to disable)")


@dataclass
class TrainConfig(Section):
    steps: int = 10
    prompts_per_step: int = 8
    mini_batch_size: int = 0  # samples per optimizer step; 0 = the whole step's batch
    micro_batch_size: int = 8  # samples per forward/backward (gradient accumulation)
    # token budget of a micro-batch instead of micro_batch_size rows (0 = off); a longer sample gets its own
    max_tokens_per_micro_batch: int = 0
    pack_sequences: bool = False  # several samples per row in the trainer's forwards (no attention across samples)
    lr: float = 1e-5
    critic_lr: float = 0.0  # a separate critic's lr (0 = lr); a value head trains with the policy at lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Bounded staleness: generation runs up to this many weight versions ahead of training (0 = synchronous,
    # today's loop bit for bit); no sample older than this many versions is trained on (docs/async.md)
    max_staleness: int = 0

    def validate(self) -> None:
        self.check(self.steps >= 1, "steps", "must be >= 1")
        self.check(self.max_staleness >= 0, "max_staleness", "must be >= 0 (0 = synchronous)")
        self.check(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        self.check(self.mini_batch_size >= 0, "mini_batch_size", "must be >= 0 (0 = whole batch)")
        self.check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        self.check(self.max_tokens_per_micro_batch >= 0, "max_tokens_per_micro_batch",
                   "must be >= 0 (0 = micro_batch_size rows per micro-batch)")
        self.check(self.lr > 0.0 and math.isfinite(self.lr), "lr", "must be a positive number")
        self.check(self.max_grad_norm > 0.0, "max_grad_norm", "must be > 0")
        self.check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")


@dataclass
class _RunConfig(Section):
    algorithm: ClassVar[str]
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="<unset>"))
    data: DataConfig = field(default_factory=lambda: DataConfig(path="<unset>"))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(functions=["<unset>"]))
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        if self.model.path == "<unset>":  # data.path is checked by the trainer: align.train(cfg, dataset=...) may give it
            raise ConfigError("model.path is required")
        if self.reward.functions == ["<unset>"]:
            raise ConfigError("reward.functions is required (e.g. [math_verify]) unless reward.remote_url is set")
        if self.algo.loss_norm_length is None:  # Dr. GRPO's L defaults to the longest allowed response
            # a copy: an algo section object passed in (maybe shared by several run configs) stays unresolved
            self.algo = dataclasses.replace(self.algo, loss_norm_length=self.rollout.max_new_tokens)
            object.__setattr__(self.algo, "_loss_norm_length_from_rollout", True)  # see as_config
        if self.rollout.guidance_scale != 1.0 and self.model.kind != "umm":
            raise ConfigError(f"rollout.guidance_scale = {self.rollout.guidance_scale}: guidance is for image tokens; "
                              "set model.kind: umm (a native Janus checkpoint) or guidance_scale: 1")
        ob = self.reward.overlong_buffer
        if ob.enable:
            if self.model.kind == "umm":
                raise ConfigError("reward.overlong_buffer.enable = True: image responses have a fixed length; "
                                  "set it to false for model.kind 'umm'")
            if ob.len > self.rollout.max_new_tokens:
                raise ConfigError(f"reward.overlong_buffer.len = {ob.len}: must be <= rollout.max_new_tokens "
                                  f"({self.rollout.max_new_tokens}), the buffer is the end of the allowed length")
        self._validate_rollout_correction()
        if self.rollout.partial and self.train.max_staleness < 1:
            raise ConfigError("rollout.partial = True: only an asynchronous run cuts responses at weight updates; "
                              "set train.max_staleness >= 1 or rollout.partial: false")
        if self.rollout.partial and self.cluster.backend != "local":
            raise ConfigError("rollout.partial = True is implemented for cluster.backend 'local' only; "
                              "set rollout.partial: false with the Ray backend")
        if (self.rollout.tools or self.rollout.environment) and self.rollout.partial:
            raise ConfigError("rollout.tools / rollout.environment (tool episodes) run without rollout.partial "
                              "for now; set rollout.partial: false")

    def _validate_rollout_correction(self) -> None:
        mode = self.algo.rollout_correction.mode  # every run config has an algo section
        if mode == "none":
            return
        if self.rollout.temperature != 1.0:
            raise ConfigError(f"algo.rollout_correction.mode = {mode!r} needs rollout.temperature = 1 (the rollout records "
                              f"temperature-1 log-probs), got {self.rollout.temperature}; set it to 1 or mode to none")
        if self.rollout.use_rollout_logprobs:
            raise ConfigError(f"algo.rollout_correction.mode = {mode!r} compares the rollout's log-probs with the "
                              "trainer's, but rollout.use_rollout_logprobs = true makes them the same; set it to false")

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir.format(name=self.logging.name))

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, **_to_plain(self)}


@dataclass
class PPOConfig(_RunConfig):
    algorithm: ClassVar[str] = "ppo"
    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)

    def validate(self) -> None:
        super().validate()
        if self.model.kind == "umm":
            raise ConfigError("model.kind = 'umm' is trained with GRPO; use algorithm: grpo")


@dataclass
class GRPOConfig(_RunConfig):
    algorithm: ClassVar[str] = "grpo"
    algo: GRPOAlgoConfig = field(default_factory=GRPOAlgoConfig)

    def validate(self) -> None:
        super().validate()
        if self.reward.curiosity is not None:
            raise ConfigError("reward.curiosity (CD-RLHF) needs per-token values: use algorithm: ppo")


CONFIG_CLASSES: dict[str, type[_RunConfig]] = {"ppo": PPOConfig, "grpo": GRPOConfig}


# ----------------------------------------------------------------------------------------------------
# Loading


def config_from_dict(data: dict[str, Any]) -> _RunConfig:
    data = dict(data)
    algorithm = data.pop("algorithm", None)
    if algorithm not in CONFIG_CLASSES:
        raise ConfigError(f"algorithm = {algorithm!r}: set the top-level key algorithm to one of: ppo, grpo")
    return build(CONFIG_CLASSES[algorithm], data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> _RunConfig:
    """Read a YAML/JSON config, apply dotted `key=value` overrides, validate, return PPOConfig | GRPOConfig."""
    data = apply_overrides(read_config_file(path), overrides)
    # Relative data/model paths in a config file are relative to the file when that file exists.
    return config_from_dict(data)


def as_config(config: Any, overrides: list[str] | None = None) -> _RunConfig:
    """Accept a config object, a dict or a path."""
    if isinstance(config, _RunConfig):
        if overrides:
            data = config.to_dict() | _callables(config)
            if getattr(config.algo, "_loss_norm_length_from_rollout", False):
                del data["algo"]["loss_norm_length"]  # a defaulted L follows an overridden rollout.max_new_tokens
            return config_from_dict(apply_overrides(data, overrides))
        return config
    if isinstance(config, dict):
        return config_from_dict(apply_overrides(_copy_sections(config), overrides))
    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    raise ConfigError(f"config must be a PPOConfig, GRPOConfig, dict or path to .yaml/.json; got {type(config).__name__}")


def _copy_sections(data: dict[str, Any]) -> dict[str, Any]:
    """Copy nested mappings (not the leaves, which may be reward objects) so overrides never touch the caller's dict."""
    return {k: _copy_sections(v) if isinstance(v, dict) else v for k, v in data.items()}


def _callables(config: _RunConfig) -> dict[str, Any]:
    """Python-only reward objects survive a round trip through to_dict()."""
    return {"reward": {**config.reward.to_dict(), "functions": list(config.reward.functions)}}
