"""TRL / OpenRLHF / verl key names get a one-line hint naming align's key; a missing local model path is our
own one-line MissingFileError, not the hub client's "Repo id must be in the form" message."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from align.config import GRPOConfig, PPOConfig, config_from_dict
from align.config_schema import build
from align.errors import ConfigError, MissingFileError
from align.key_names import PEER_KEYS
from align.models import load_causal_lm, load_tokenizer
from align.supervised import SFTConfig

ROOT = Path(__file__).resolve().parents[2]


def _is_key(cls: type, dotted: str) -> bool:
    """Walk dataclass fields (an independent reading of the schema): is `dotted` a leaf key of `cls`?"""
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        cls = typing.get_type_hints(cls)[part]
    return not dataclasses.is_dataclass(cls)


def _nested(dotted: str, value) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


@pytest.mark.parametrize("peer", sorted(PEER_KEYS))
def test_every_peer_name_hints_a_real_align_key(peer):
    who, target = PEER_KEYS[peer]
    cls = GRPOConfig if _is_key(GRPOConfig, target) else PPOConfig
    assert _is_key(cls, target), f"{peer} -> {target}: not a key of GRPOConfig or PPOConfig"
    with pytest.raises(ConfigError) as err:
        build(cls, _nested(peer, 1))
    assert f"`{target}`" in str(err.value) and who in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("data,algorithm,expected", [
    ({"learning_rate": 1e-5}, "grpo", "unknown config key 'learning_rate'; that is TRL's name: align's key is `train.lr`"),
    ({"train": {"learning_rate": 1e-5}}, "grpo", "'train.learning_rate'; that is TRL's name: align's key is `train.lr`"),
    ({"num_generations": 8}, "grpo", "TRL's name: align's key is `algo.group_size`"),
    ({"rollout": {"max_completion_length": 64}}, "grpo", "TRL's name: align's key is `rollout.max_new_tokens`"),
    ({"algo": {"beta": 0.04}}, "grpo", "'algo.beta'; that is TRL's name: align's key is `algo.kl_coef`"),
    ({"n_samples_per_prompt": 8}, "grpo", "OpenRLHF's name: align's key is `algo.group_size`"),
    ({"--init_kl_coef": 0.01}, "ppo", "OpenRLHF's name: align's key is `algo.kl_coef`"),
    ({"data": {"train_files": "x.parquet"}}, "grpo", "'data.train_files'; that is verl's name: align's key is `data.path`"),
])
def test_peer_key_messages(data, algorithm, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        config_from_dict({"algorithm": algorithm, **data})


def test_a_verl_section_lists_its_leaves_in_align_terms():
    verl = {"actor_rollout_ref": {"actor": {"optim": {"lr": 1e-6}, "use_dynamic_bsz": True},
                                  "rollout": {"n": 8, "name": "vllm"}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"algorithm": "grpo", **verl})
    text = str(err.value)
    assert text.startswith("unknown config key 'actor_rollout_ref'; verl keys in align: ")
    assert "`actor_rollout_ref.actor.optim.lr` -> `train.lr`" in text
    assert "`actor_rollout_ref.rollout.n` -> `algo.group_size`" in text
    assert "use_dynamic_bsz" not in text.split("(valid keys")[0]  # no align equivalent: not listed


def test_our_own_typos_still_get_the_close_match():
    with pytest.raises(ConfigError, match=r"'train\.lrr'; did you mean 'train\.lr'\?"):
        config_from_dict({"algorithm": "grpo", "train": {"lrr": 1e-5}})


def test_no_hint_into_a_section_the_config_does_not_have():
    """SFT configs have no `algo` section: TRL's `beta` there must not point at `algo.kl_coef`."""
    with pytest.raises(ConfigError) as err:
        build(SFTConfig, {"beta": 0.1})
    assert "algo." not in str(err.value)


def test_migrating_doc_has_every_row():
    text = (ROOT / "docs" / "migrating.md").read_text()
    section = text.split("## Key names", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([^`]+)` \| (\w+) \| `([^`]+)` \|", section, flags=re.M))
    assert rows == {(peer, who, target) for peer, (who, target) in PEER_KEYS.items()}


# ---- missing local model path ----------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["./models/does-not-exist", "~/no-such-model-dir", "runs/old/checkpoints/final"])
def test_missing_local_model_path_names_the_path(given, tmp_path, monkeypatch):
    from align.config import ModelConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFileError) as err:
        load_tokenizer(ModelConfig(path=given))
    text = str(err.value)
    assert text.startswith(f"model.path = {given!r}: no such directory") and "Repo id" not in text
    with pytest.raises(MissingFileError, match=re.escape(f"model.critic_path = {str(tmp_path / 'gone')!r}")):
        load_causal_lm(tmp_path / "gone", ModelConfig(path="x"), device=None, key="model.critic_path")


def test_an_existing_local_path_and_a_tilde_path_still_load(tiny_model_path, monkeypatch):
    import torch

    from align.config import ModelConfig

    home = tiny_model_path.parent
    monkeypatch.setenv("HOME", str(home))
    tok = load_tokenizer(ModelConfig(path=f"~/{tiny_model_path.name}"))
    model = load_causal_lm(f"~/{tiny_model_path.name}", ModelConfig(path="x"), torch.device("cpu"))
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token_id is not None


def test_trl_names_are_trl_fields():
    """Every name labelled TRL is a field of the installed TRL's GRPOConfig, ModelConfig or ScriptArguments,
    except those of TRL's PPOConfig, which TRL 1.16 no longer ships (kept for users of older TRL)."""
    import trl

    fields = {f.name for cls in (trl.GRPOConfig, trl.ModelConfig, trl.ScriptArguments) for f in dataclasses.fields(cls)}
    old_ppo = {"num_ppo_epochs", "cliprange", "cliprange_value", "kl_coef", "vf_coef", "lam", "response_length"}
    trl_names = {peer for peer, (who, _) in PEER_KEYS.items() if who == "TRL"}
    assert trl_names - old_ppo <= fields, sorted(trl_names - old_ppo - fields)
    assert old_ppo <= trl_names
