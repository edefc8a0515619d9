"""Typed configs of the commands beside `align train` / `align sft`: reward-model training and evaluation
(`align train-rm` / `align eval-rm`), the reward service (`align serve-rewards`) and the diversity evaluation
(`align eval-diversity`).

They live in the core, not in align.rewards (which may not import align.config), and are built by the one config
machinery of align.config: the same YAML / JSON files, dotted `--set key=value` overrides, type checks, close-
match suggestions for unknown keys and ConfigError. align.rewards.training receives the built object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from align.config import RewardConfig, Section, apply_overrides, build, read_config_file
from align.diversity import DEFAULT_EAD_VOCAB_SIZE
from align.errors import ConfigError

# ----------------------------------------------------------------------------------------------------
# align train-rm / align eval-rm


@dataclass
class RMModelConfig(Section):
    kind: Literal["classifier", "themis"] = "classifier"
    path: str = ""  # HF checkpoint (local dir or hub name); themis: a causal LM or a Themis dir
    head: Literal["auto", "sequence_classification", "value_head"] = "auto"  # classifier only
    template: str = "{prompt}\n{completion}"  # classifier text for prompt/chosen/rejected pairs
    max_length: int = 512
    dtype: Union[str, None] = None

    def validate(self) -> None:
        self.check(bool(self.path), "path", "set model.path to a Hugging Face model name or a local checkpoint directory")
        self.check(self.max_length >= 16, "max_length", "too small; use >= 16")


@dataclass
class RMDataConfig(Section):
    # each source: a JSONL file (prompt / chosen / rejected [/ group] or TARA lines), "tara:GROUP,...[:SPLIT]",
    # or "hf:NAME[:SPLIT]"; a single string is one source
    train: Union[list[str], str] = field(default_factory=list)
    eval: Union[list[str], str] = field(default_factory=list)
    observations: Literal["none", "tools", "gold"] = "none"  # classifier on TARA: question + answer | run the tools | gold
    limit: Union[int, None] = None  # at most this many pairs per source (quick runs)

    def validate(self) -> None:
        self.train = [self.train] if isinstance(self.train, str) else self.train
        self.eval = [self.eval] if isinstance(self.eval, str) else self.eval
        if self.limit is not None:
            self.check(self.limit >= 1, "limit", "must be >= 1 (or null for all)")


@dataclass
class RMOptimConfig(Section):
    epochs: float = 1.0
    batch_size: int = 8  # pairs per step
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03  # cosine schedule, warm-up over this fraction of the steps
    grad_clip: float = 1.0
    seed: int = 0
    max_steps: Union[int, None] = None
    eval_batch_size: int = 32
    log_every: int = 10
    threads: Union[int, None] = None  # torch.set_num_threads

    def validate(self) -> None:
        self.check(self.epochs > 0, "epochs", "must be > 0")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.check(self.lr > 0, "lr", "must be > 0")
        self.check(0 <= self.warmup_ratio < 1, "warmup_ratio", "use a value in [0, 1)")
        self.check(self.grad_clip > 0, "grad_clip", "must be > 0")
        self.check(self.log_every >= 1, "log_every", "must be >= 1")


@dataclass
class ThemisTrainConfig(Section):
    """Released defaults: loss = 1.0 * LM + 0.5 * BT, beta = omega = 1, positives supervise the answer."""

    lm_coef: float = 1.0
    rm_coef: float = 0.5
    beta: float = 1.0  # 0: mask observation text (keep <start_observation>)
    omega: float = 1.0  # 0: drop the rationale from the sequence
    positive_answer_lm: bool = True
    observation_dropout: float = 0.0  # the paper uses 0.01
    max_rounds: int = 3
    max_new_tokens: int = 128

    def validate(self) -> None:
        for key in ("lm_coef", "rm_coef", "beta", "omega"):
            self.check(getattr(self, key) >= 0, key, "must be >= 0")
        self.check(0 <= self.observation_dropout < 1, "observation_dropout", "must be in [0, 1)")


@dataclass
class RMTrainConfig(Section):
    model: RMModelConfig = field(default_factory=lambda: RMModelConfig(path="<unset>"))
    data: RMDataConfig = field(default_factory=RMDataConfig)
    train: RMOptimConfig = field(default_factory=RMOptimConfig)
    themis: ThemisTrainConfig = field(default_factory=ThemisTrainConfig)
    output_dir: str = "runs/rm"

    def validate(self) -> None:
        if self.model.path == "<unset>":
            raise ConfigError("the 'model' section (kind, path) is required, e.g. model: {kind: classifier, path: NAME}")
        if self.model.kind == "classifier" and not self.data.train and not self.data.eval:
            raise ConfigError("data.train (or data.eval) is empty: list JSONL files, 'tara:GROUP,...' or 'hf:NAME'")
        if self.model.kind == "themis" and self.data.observations != "none":
            raise ConfigError("data.observations applies to classifier RMs; Themis calls its tools itself (drop it)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RMTrainConfig:
        return build(cls, data)


def load_rm_config(path: str | Path, overrides: list[str] | None = None) -> RMTrainConfig:
    """An RM config file (YAML / JSON, or a checkpoint's rm_config.json) with dotted overrides, validated."""
    return build(RMTrainConfig, apply_overrides(read_config_file(path), overrides))


# ----------------------------------------------------------------------------------------------------
# align serve-rewards


@dataclass
class ServeSettings(Section):
    """The `serve:` section; null (the default) leaves the service's own default."""

    host: Union[str, None] = None  # default 127.0.0.1; any other host needs a token
    port: Union[int, None] = None  # default 8000
    token: Union[str, None] = None  # default $ALIGN_REWARD_TOKEN
    # off loopback without a token, for clients that send no header (OpenRLHF); warns at start-up
    no_auth: Union[bool, None] = None
    on_error: Union[str, None] = None  # /get_reward: "fail" (default: an errored sample fails the batch) | "value:X"
    max_batch_size: Union[int, None] = None
    max_wait_ms: Union[float, None] = None
    max_body_bytes: Union[int, None] = None
    max_concurrency: Union[int, None] = None
    max_samples_per_request: Union[int, None] = None
    request_timeout_s: Union[float, None] = None
    # resource limits (docs/security.md, "Scoring service limits")
    reward_timeout_s: Union[float, None] = None  # one reward call before /health says "stuck" (default request_timeout_s)
    max_buffered_body_bytes: Union[int, None] = None  # all request bodies held at once (default 128 MiB)
    max_connections: Union[int, None] = None  # open connections (default 1024); the longest-idle one makes room
    header_timeout_s: Union[float, None] = None  # a request's headers must arrive within this (default 10)
    body_timeout_s: Union[float, None] = None  # its body within this after the headers (default 60)
    keep_alive_s: Union[float, None] = None  # idle keep-alive connection (default 5)
    backlog: Union[int, None] = None  # kernel accept queue / one accept burst (default 256)
    idempotency_cache_size: Union[int, None] = None  # responses kept for request_id retries (default 1024) ...
    idempotency_cache_bytes: Union[int, None] = None  # ... and their JSON bytes (default 64 MiB); 0 turns it off
    log_lines_per_interval: Union[int, None] = None  # log lines of one kind per interval (default 20) ...
    log_interval_s: Union[float, None] = None  # ... (default 10 s); the rest are counted, not written
    trace_chars: Union[int, None] = None  # /get_reward: each sample's reward trace in extra_logs.trace (default 0: off)

    _POSITIVE = ("max_batch_size", "max_body_bytes", "max_concurrency", "max_samples_per_request",
                 "max_buffered_body_bytes", "max_connections", "backlog", "log_lines_per_interval",
                 "request_timeout_s", "reward_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s",
                 "log_interval_s")

    def validate(self) -> None:
        for key in self._POSITIVE:
            if getattr(self, key) is not None:
                self.check(getattr(self, key) > 0, key, "must be > 0")
        for key in ("idempotency_cache_size", "idempotency_cache_bytes", "max_wait_ms", "trace_chars"):
            if getattr(self, key) is not None:
                self.check(getattr(self, key) >= 0, key, "must be >= 0")
        if self.port is not None:
            self.check(0 <= self.port <= 65535, "port", "use a port in 0..65535")
        if self.on_error is not None:
            self.check(self.on_error == "fail" or (self.on_error.startswith("value:") and _finite(self.on_error[6:])),
                       "on_error", "use 'fail' or 'value:X' with X a finite number, e.g. value:0")

    def given(self) -> dict[str, Any]:
        """The settings that are set (not null)."""
        return {k: v for k, v in self.to_dict().items() if v is not None}


@dataclass
class ServeRewardsConfig(Section):
    # a registered name / "module:attr", {name, kwargs}, or a training config's {functions: [...], weights, ...}
    # section (then a RewardConfig); null: --reward names it
    reward: Any = None
    serve: ServeSettings = field(default_factory=ServeSettings)

    def validate(self) -> None:
        reward = self.reward
        if isinstance(reward, dict) and "functions" in reward:
            self.reward = build(RewardConfig, reward, "reward")
            if self.reward.remote_url:
                raise ConfigError("reward.remote_url is set; a reward service cannot score through itself (drop it)")
        elif isinstance(reward, dict) and (set(reward) - {"name", "kwargs"} or "name" not in reward):
            raise ConfigError("the 'reward' section needs 'name' (and optional 'kwargs') or 'functions'")
        elif reward is not None and not isinstance(reward, (str, dict, RewardConfig)):
            raise ConfigError(f"reward = {reward!r}: give a reward name, {{name, kwargs}} or {{functions: [...]}}")


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


SERVE_SECTIONS = ("reward", "serve")  # a training config's other sections (model, data, ...) are ignored


def load_serve_config(path: str | Path | None, overrides: list[str] | None = None) -> ServeRewardsConfig:
    """CONFIG of serve-rewards (or none) with dotted overrides (`--set serve.port=9000`), validated."""
    data = read_config_file(path) if path else {}
    data = apply_overrides({k: v for k, v in data.items() if k in SERVE_SECTIONS}, overrides)
    return build(ServeRewardsConfig, data)


# ----------------------------------------------------------------------------------------------------
# align eval-diversity


@dataclass
class DiversityEvalConfig(Section):
    checkpoint: str = ""  # a HF model directory, a checkpoint (RUN/checkpoints/step-N) or a run directory
    prompts: str = ""  # JSONL file, one object per line with the prompt under prompt_key
    prompt_key: str = "prompt"  # a string or a list of chat messages
    n: int = 10  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    limit: Union[int, None] = None  # only the first LIMIT prompts
    batch_size: int = 64  # sequences decoded together
    seed: int = 0
    device: str = "cpu"
    sentbert: bool = True  # false: skip the SentBERT metric (no encoder is loaded)
    ead_vocab_size: int = DEFAULT_EAD_VOCAB_SIZE  # V in EAD (256000, as the CD-RLHF evaluation)
    output: Union[str, None] = None  # write samples and metrics to this JSON file

    def validate(self) -> None:
        self.check(bool(self.checkpoint), "checkpoint", "give the model directory, checkpoint or run directory")
        self.check(bool(self.prompts), "prompts", "set --prompts to a JSONL file with one prompt per line")
        self.check(self.n >= 2, "n", "diversity needs at least 2 samples per prompt (set --n 2 or more)")
        self.check(self.temperature > 0, "temperature", "must be > 0 (diversity of greedy decoding is trivial)")
        self.check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self.check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.check(self.ead_vocab_size >= 1, "ead_vocab_size", "must be >= 1")
        if self.limit is not None:
            self.check(self.limit >= 1, "limit", "must be >= 1")


def load_diversity_config(path: str | Path | None, given: dict[str, Any], overrides: list[str] | None = None
                          ) -> DiversityEvalConfig:
    """The config file (if any), then the flags given on the command line, then `--set` overrides."""
    data = read_config_file(path) if path else {}
    data.update({k: v for k, v in given.items() if v is not None})
    return build(DiversityEvalConfig, apply_overrides(data, overrides))
