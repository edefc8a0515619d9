"""Themis: value head on the final EOS, the released loss, saving and loading (the trace loop: test_themis_traces.py)."""
from __future__ import annotations

import math

import pytest
import torch
from _tiny import cached

from align.rewards.themis import (
    ThemisModel,
    ThemisRewardModel,
    add_themis_tokens,
    create_themis,
    load_themis,
    pad_left,
    parse_action,
    save_themis,
    themis_loss,
)

EOS = "</s>"


@pytest.fixture(scope="module")
def themis(tmp_path_factory):
    base = cached("llama", 1)
    model, tok = create_themis(base)
    return model.eval(), tok


def _reference_score(model: ThemisModel, tok, text: str) -> float:
    """Independent reference: one unpadded sequence + EOS through the decoder, v_head . h_last in float64."""
    ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        h = model.lm.base_model(input_ids=ids).last_hidden_state[0, -1].double()
        return float(h @ model.v_head.weight[0].double())


def user(q: str, a: str) -> str:
    return f"### USER:\nQuestion: {q}\nAnswer: {a}\n### ASSISTANT:\n"


def test_score_is_independent_of_batch_padding(themis):
    model, tok = themis
    rm = ThemisRewardModel(model=model, tokenizer=tok, tools={}, device="cpu")
    texts = ["short", "a much longer text that forces left padding on the short one"]
    batched = rm.score_texts(texts)
    for t, s in zip(texts, batched):
        assert s == pytest.approx(_reference_score(model, tok, t), abs=1e-5)


def test_parse_action_regex():
    assert parse_action("<start_tool> Thought: x\nAction: Calendar.week_day\nAction Input: 2008-06-16\n") == ("Calendar.week_day", "2008-06-16")
    assert parse_action('Action 1: history_weather\nAction 1 Input: "Riyadh, 2023-05-07"') == ("history_weather", "Riyadh, 2023-05-07")
    assert parse_action("Thought: Do I need to use a tool? No\nFinished.") is None


def test_themis_loss_matches_a_float64_reference():
    torch.manual_seed(0)
    b, t, v = 2, 5, 7
    logits = torch.randn(2 * b, t, v)
    ids = torch.randint(0, v, (2 * b, t))
    weights = (torch.rand(2 * b, t) > 0.3).float()
    weights[:, 1] = 1.0
    rewards = torch.randn(2 * b)
    loss, parts = themis_loss(logits, ids, weights, rewards, lm_coef=1.0, rm_coef=0.5)
    num = den = 0.0
    for i in range(2 * b):
        for j in range(1, t):
            if weights[i, j]:
                row = logits[i, j - 1].double()
                num += float(torch.logsumexp(row, 0) - row[ids[i, j]])
                den += 1
    lm = num / den
    rm = sum(math.log1p(math.exp(-(float(rewards[k]) - float(rewards[b + k])))) for k in range(b)) / b
    assert parts["lm_loss"] == pytest.approx(lm, rel=1e-5)
    assert parts["rm_loss"] == pytest.approx(rm, rel=1e-5)
    assert float(loss) == pytest.approx(lm + 0.5 * rm, rel=1e-5)


def test_special_tokens_value_head_and_save_load(themis, tmp_path):
    model, tok = themis
    ids = [tok.convert_tokens_to_ids(t) for t in ("<start_tool>", "<start_observation>", "<start_work>")]
    assert len(set(ids)) == 3 and all(i >= model.lm.config.vocab_size - 3 for i in ids)
    assert model.lm.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.v_head.bias is None and tuple(model.v_head.weight.shape) == (1, model.lm.config.hidden_size)
    assert add_themis_tokens(tok) == ids  # idempotent
    save_themis(model, tok, tmp_path / "ckpt")
    m2, t2 = load_themis(tmp_path / "ckpt")
    assert torch.equal(m2.v_head.weight, model.v_head.weight)
    text = user("q", "a") + "<start_tool> Thought: x"
    assert _reference_score(m2.eval(), t2, text) == pytest.approx(_reference_score(model, tok, text), abs=1e-6)
    with pytest.raises(FileNotFoundError, match="not a Themis checkpoint"):
        load_themis(tmp_path)


def test_pad_left():
    out = pad_left([[1, 2], [3]], 0)
    assert out.tolist() == [[1, 2], [0, 3]]
