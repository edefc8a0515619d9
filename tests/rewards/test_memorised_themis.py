"""align.testing.memorised_themis: a tiny Themis checkpoint whose greedy decoding reproduces the given traces and
whose value head orders positive answers above negative ones."""
from __future__ import annotations

from datetime import date, timedelta

import pytest
import torch

from align.rewards.tara import render_themis
from align.rewards.themis import ASSISTANT_HEADER, load_themis
from align.testing import memorised_themis
from align.tools.trace import START_OBSERVATION, ToolCall


def calendar_traces():
    """Two target_day questions, each with a true answer (positive) and one a day off (negative); the
    observation is the true date, computed here with datetime."""
    texts, positive = [], []
    for day, n in [("2023-06-01", 12), ("2021-02-25", 5)]:
        true = (date.fromisoformat(day) + timedelta(days=n)).isoformat()
        wrong = (date.fromisoformat(day) + timedelta(days=n + 1)).isoformat()
        call = ToolCall("Calendar.target_day", f"{day}, {n}", "I need the date.", true)
        for answer, pos in [(true, True), (wrong, False)]:
            rationale = "The answer matches the tool." if pos else "The answer differs from the tool."
            texts.append(render_themis(f"What date is {n} days after {day}?", answer, [call], rationale).text)
            positive.append(pos)
    return texts, positive


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    torch.set_num_threads(1)
    texts, positive = calendar_traces()
    path = memorised_themis(tmp_path_factory.mktemp("themis"), texts, positive)
    model, tok = load_themis(path)
    return model.eval(), tok, texts, positive


def _greedy(model, tok, prefix: str, stop: str) -> str:
    ids = torch.tensor([tok(prefix)["input_ids"]])
    stop_ids = [tok.eos_token_id, tok.convert_tokens_to_ids(stop)]
    out = model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=200, do_sample=False,
                            eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)


def test_greedy_decoding_reproduces_each_trace_around_the_observation(memorised):
    model, tok, texts, _ = memorised
    for text in texts:
        head_end = text.index(ASSISTANT_HEADER) + len(ASSISTANT_HEADER)
        obs_at = text.index(START_OBSERVATION) + len(START_OBSERVATION)
        # the call: from the assistant header to <start_observation>
        assert _greedy(model, tok, text[:head_end], START_OBSERVATION) == text[head_end:obs_at]
        # the rationale, after the observation line the trace loop writes
        obs_end = text.index("\n", obs_at) + 1
        assert _greedy(model, tok, text[:obs_end], START_OBSERVATION) == text[obs_end:] + tok.eos_token


def test_value_head_orders_positives_above_negatives(memorised):
    model, tok, texts, positive = memorised
    scores = []
    for text in texts:  # reference: one unpadded sequence + EOS, v_head . h_last
        ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            h = model.lm.base_model(input_ids=ids).last_hidden_state[0, -1]
            scores.append(float(h @ model.v_head.weight[0]))
    assert min(s for s, p in zip(scores, positive) if p) > max(s for s, p in zip(scores, positive) if not p)


def test_labels_must_hold_both_sides(tmp_path):
    texts, _ = calendar_traces()
    with pytest.raises(ValueError, match="both positives and negatives"):
        memorised_themis(tmp_path, texts, [True] * len(texts))
