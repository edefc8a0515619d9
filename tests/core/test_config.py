"""Config validation: every user mistake is one line that names the key and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import align
from align.config import config_from_dict, load_config
from align.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def base(algorithm="grpo", **sections):
    d = {"algorithm": algorithm, "model": {"path": "m"}, "data": {"path": "d.jsonl"}, "reward": {"functions": ["math_verify"]}}
    d.update(sections)
    return d


def error_of(d) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict(d)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_types():
    cfg = config_from_dict(base(train={"lr": "1e-5", "steps": 3}))
    assert isinstance(cfg, align.GRPOConfig)
    assert cfg.train.lr == pytest.approx(1e-5) and cfg.train.steps == 3
    assert cfg.algo.group_size == 4 and cfg.algo.kl_estimator == "k3"
    ppo = config_from_dict(base("ppo"))
    assert isinstance(ppo, align.PPOConfig) and ppo.algo.lam == 0.95


@pytest.mark.parametrize("sections, needles", [
    ({"algo": {"group_size": 1}}, ["algo.group_size", ">= 2"]),
    ({"rollout": {"top_p": 1.5}}, ["rollout.top_p", "(0, 1]"]),
    ({"rollout": {"temperature": -1}}, ["rollout.temperature", ">= 0"]),
    ({"rollout": {"min_p": 1.0}}, ["rollout.min_p"]),
    ({"train": {"steps": 0}}, ["train.steps", ">= 1"]),
    ({"train": {"steps": "many"}}, ["train.steps", "integer"]),
    ({"train": {"lr": "fast"}}, ["train.lr", "number"]),
    ({"algo": {"advantage": "grpoo"}}, ["algo.advantage", "did you mean 'grpo'", "rloo"]),
    ({"algo": {"loss_agg": "mean"}}, ["algo.loss_agg", "token-mean"]),
    ({"trian": {"steps": 1}}, ["'trian'", "did you mean 'train'"]),
    ({"train": {"setps": 1}}, ["'train.setps'", "did you mean 'train.steps'"]),
    ({"rollout": {"stop": "###"}}, ["rollout.stop", "list"]),
    ({"cluster": {"backend": "slurm"}}, ["cluster.backend", "'local'", "'ray'"]),
    ({"algo": {"advantage": "rloo", "scale": "none"}}, ["algo.scale", "'grpo' only"]),
    ({"rollout": {"use_rollout_logprobs": True, "temperature": 0.7}}, ["rollout.temperature", "use_rollout_logprobs"]),
])
def test_bad_values_name_key_and_fix(sections, needles):
    msg = error_of(base(**sections))
    for needle in needles:
        assert needle in msg, msg


def test_adaptive_kl_needs_a_start_and_a_positive_target():
    assert "algo.kl_coef" in error_of(base("ppo", algo={"kl_target": 0.1, "kl_coef": 0.0}))
    assert "algo.kl_target" in error_of(base("ppo", algo={"kl_target": -1.0}))


def test_algorithm_and_required_keys():
    assert "ppo, grpo" in error_of({**base(), "algorithm": "dpo"})
    d = base()
    del d["model"]
    assert "model.path is required" in error_of(d)
    assert "reward.functions" in error_of(base(reward={"functions": []}))
    assert "use algorithm: ppo" in error_of(base(reward={"functions": ["x"], "curiosity": {"eta": 0.1}}))


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="group_size"):
        align.GRPOConfig(model={"path": "m"}, data={"path": "d"}, reward={"functions": ["f"]}, algo={"group_size": 1})
    cfg = align.PPOConfig(model={"path": "m"}, data={"path": "d"}, reward={"functions": [lambda prompts, completions, **k: [0.0]]})
    assert callable(cfg.reward.functions[0])


def test_load_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base("ppo", train={"steps": 2})))
    cfg = load_config(path, ["train.lr=3e-4", "algo.kl_target=0.1", "rollout.stop=[\"\\n\"]", "logging.name=x"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.algo.kl_target == 0.1
    assert cfg.rollout.stop == ["\n"] and cfg.logging.name == "x" and cfg.train.steps == 2
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_json_config(tmp_path):
    import json

    path = tmp_path / "c.json"
    path.write_text(json.dumps(base(algo={"group_size": 8})))
    assert load_config(path).algo.group_size == 8


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_validates(path):
    data = yaml.safe_load(path.read_text())
    if data.get("algorithm") in ("ppo", "grpo"):
        load_config(path)
    else:  # sft / reward-model configs are validated by their own loaders
        from align.commands import validate_any_config

        validate_any_config(path)


def test_ray_knobs_are_cluster_keys_with_documented_env_overrides():
    """The Ray backend's timeouts, weight sync mode and warm-worker parking are `cluster` keys; the
    ALIGN_RAY_* env vars, when set, override them (a copy: the run's config is not changed)."""
    from align.backends.ray import ENV_OVERRIDES, cluster_settings
    from align.errors import UserError

    base = {"model": {"path": "m"}, "data": {"path": "d"}, "reward": {"functions": ["x"]}}
    cfg = config_from_dict({"algorithm": "grpo", **base, "cluster": {"generate_timeout_s": 30, "weight_sync": "collective",
                                                                      "keep_workers": True, "placement_timeout_s": 5}})
    cc = cfg.cluster
    assert (cc.score_timeout_s, cc.generate_timeout_s, cc.placement_timeout_s, cc.weight_sync, cc.keep_workers) == \
        (600.0, 30.0, 5.0, "collective", True)
    assert cluster_settings(cc, environ={}) == cc
    env = {"ALIGN_RAY_SCORE_TIMEOUT_S": "3", "ALIGN_RAY_GENERATE_TIMEOUT_S": "7.5", "ALIGN_RAY_PLACEMENT_TIMEOUT_S": "9",
           "ALIGN_RAY_WEIGHT_SYNC": "object_store", "ALIGN_RAY_KEEP_WORKERS": "0"}
    got = cluster_settings(cc, environ=env)
    assert (got.score_timeout_s, got.generate_timeout_s, got.placement_timeout_s, got.weight_sync, got.keep_workers) == \
        (3.0, 7.5, 9.0, "object_store", False)
    assert cc.weight_sync == "collective" and cc.keep_workers  # the config itself is untouched
    assert cluster_settings(align.GRPOConfig(**base).cluster, environ={"ALIGN_RAY_KEEP_WORKERS": "1"}).keep_workers
    assert set(ENV_OVERRIDES.values()) <= {f for f in cc.to_dict()}
    with pytest.raises(UserError, match="ALIGN_RAY_WEIGHT_SYNC='nccl'"):
        cluster_settings(cc, environ={"ALIGN_RAY_WEIGHT_SYNC": "nccl"})
    with pytest.raises(UserError, match="ALIGN_RAY_SCORE_TIMEOUT_S = 'soon'"):
        cluster_settings(cc, environ={"ALIGN_RAY_SCORE_TIMEOUT_S": "soon"})
    with pytest.raises(ConfigError, match="cluster.weight_sync"):
        config_from_dict({"algorithm": "grpo", **base, "cluster": {"weight_sync": "nccl"}})
