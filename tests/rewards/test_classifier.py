"""Classifier reward model: sequence-classification and value-head scoring against independent forwards."""
from __future__ import annotations

import pytest
import torch
from _tiny import cached

from align.rewards.base import RewardFunction
from align.rewards.classifier import ClassifierRewardModel, ValueHeadModel, last_token_index


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    return cached("llama", 1)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return cached("bert", 2)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]


def test_causal_lm_gets_a_value_head_on_the_last_token(lm_path):
    rm = ClassifierRewardModel(str(lm_path), device="cpu")
    assert rm.head == "value_head" and isinstance(rm.model, ValueHeadModel)
    assert rm.model.v_head.bias is None
    prompts, completions = ["Question: which day?", "q"], [" Monday, it is Monday indeed", " a"]
    scores = rm(prompts, completions)
    for p, c, s in zip(prompts, completions, scores):
        ids = torch.tensor([rm.tokenizer(p + c)["input_ids"]])
        with torch.no_grad():  # reference: unpadded single sequence, last hidden state . v_head in float64
            h = rm.model.backbone(input_ids=ids).last_hidden_state[0, -1].double()
            ref = float(h @ rm.model.v_head.weight[0].double())
        assert s == pytest.approx(ref, abs=1e-5)


def test_encoder_sequence_classification_matches_the_hf_forward(bert_path):
    rm = ClassifierRewardModel(str(bert_path), template="{prompt} || {completion}", device="cpu", batch_size=2)
    assert rm.head == "sequence_classification"
    prompts, completions = ["a", "bb bb", "c c c c c c"], ["x", "y y", "z"]
    scores = rm.score(prompts, completions).scores
    for p, c, s in zip(prompts, completions, scores):
        enc = rm.tokenizer(f"{p} || {c}", return_tensors="pt")
        with torch.no_grad():
            ref = float(rm.model(**enc).logits[0, 0])
        assert s == pytest.approx(ref, abs=1e-5)


def test_save_and_load_round_trip_keeps_scores(lm_path, bert_path, tmp_path):
    for path in (lm_path, bert_path):
        rm = ClassifierRewardModel(str(path), template="Q: {prompt}\nA: {completion}", max_length=64, device="cpu")
        with torch.no_grad():
            for p in rm.model.parameters():
                p.add_(0.01)  # make sure trained weights (not the base checkpoint) are what comes back
        before = rm(["p1", "p2"], ["c1", "c2 longer"])
        out = tmp_path / path.name
        rm.save_pretrained(out)
        again = ClassifierRewardModel.from_pretrained(out, device="cpu")
        assert again.head == rm.head and again.template == rm.template and again.max_length == 64
        assert again(["p1", "p2"], ["c1", "c2 longer"]) == pytest.approx(before, abs=1e-5)


def test_a_config_that_names_the_checkpoint_gets_its_saved_template_and_length(lm_path, tmp_path):
    """`{name: classifier_rm, kwargs: {model_path}}` (the registry's path, as a training config names the RM)
    reads the template / max_length / add_eos the checkpoint was trained with, as from_pretrained does;
    an explicit keyword still wins."""
    from align.rewards.registry import get_reward

    rm = ClassifierRewardModel(str(lm_path), template="Question: {prompt}\nAnswer: {completion}", max_length=16,
                               add_eos=True, device="cpu")
    rm.save_pretrained(tmp_path / "rm")
    named = get_reward("classifier_rm", model_path=str(tmp_path / "rm"), device="cpu")
    assert (named.template, named.max_length, named.add_eos) == (rm.template, 16, True)
    long = "x" * 200  # cut at the saved 16 tokens: the score is the one the trained RM gives
    assert named(["q"], [long]) == pytest.approx(rm(["q"], [long]), abs=1e-6)
    override = get_reward("classifier_rm", model_path=str(tmp_path / "rm"), template="{prompt}|{completion}",
                          device="cpu")
    assert override.template == "{prompt}|{completion}" and override.max_length == 16


def test_is_a_reward_function_and_validates_arguments(lm_path):
    rm = ClassifierRewardModel(str(lm_path), device="cpu")
    assert isinstance(rm, RewardFunction) and rm.name == "classifier_rm"
    with pytest.raises(ValueError, match="head="):
        ClassifierRewardModel(str(lm_path), head="mlp")
    with pytest.raises(ValueError, match="template"):
        ClassifierRewardModel(str(lm_path), template="{prompt}")
    with pytest.raises(ValueError, match="completions"):
        rm.score(["a", "b"], ["c"])
