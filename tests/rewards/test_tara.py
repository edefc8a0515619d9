"""TARA loader and the Themis serialized format (PAPERS.md section 1), checked token for token."""
from __future__ import annotations

import json
import re

import pytest
from _tiny import build_tokenizer

from align.rewards.tara import (
    TARA_FILES,
    ToolCall,
    load_tara,
    parse_actions,
    render_item,
    render_plain,
    replay_steps,
    tara_dir,
)
from align.rewards.themis import ThemisLossOptions, add_themis_tokens, encode_themis

needs_tara = pytest.mark.tara  # skipped without $ALIGN_TARA_DIR; fails the run if it skips with the data present


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = build_tokenizer(tmp_path_factory.mktemp("tok"))
    add_themis_tokens(t)
    return t


def _raw(name: str, idx: int = 0) -> dict:
    with (tara_dir() / name).open() as fh:
        for i, line in enumerate(fh):
            if i == idx:
                return json.loads(line)
    raise IndexError(idx)


@needs_tara
@pytest.mark.parametrize("group,train,test", [("calendar", 320, 106), ("weather", 476, 158), ("multi_tools", 432, 144),
                                              ("calculator", 877, 154), ("code", 486, 189), ("hh_rlhf", 500, 120)])
def test_split_sizes_match_the_readme(group, train, test):
    assert len(load_tara(group, "train")) == train
    assert len(load_tara(group, "test")) == test


@needs_tara
def test_translator_has_no_train_split():
    with pytest.raises(ValueError, match="no train split"):
        load_tara("translator", "train")
    assert len(load_tara("translator", "test")) == 300


def test_unknown_group_names_the_choices():
    with pytest.raises(ValueError, match="unknown TARA group 'calender'.*calendar"):
        load_tara("calender", "train")


@needs_tara
def test_calendar_item_sequence_token_for_token(tok):
    raw = _raw("agent_calendar_test.json", 0)
    item = load_tara("calendar", "test", limit=1)[0]
    for side in ("pos", "neg"):
        a = raw[f"{side}_answer"]
        act = a["actions"]
        # PAPERS.md section 1, written out by hand
        expected = (f"### USER:\nQuestion: {raw['question']}\nAnswer: {a['answer']}\n### ASSISTANT:\n"
                    f"<start_tool> Thought: {act['Thought']}\nAction: {act['Action']}\nAction Input: {act['Action Input']}\n"
                    f"<start_observation> Observation: {act['Observation']}\n"
                    f"<start_work> Work: {a['score_agent']['explanation'].strip()}")
        seg = render_item(item, side)
        assert seg.text == expected
        ids, weights = encode_themis(tok, seg, positive=(side == "pos"))
        assert ids == tok(expected)["input_ids"] + [tok.eos_token_id]
        assert len(weights) == len(ids)
        # the three special tokens are single tokens, each appearing once
        for t in ("<start_tool>", "<start_observation>", "<start_work>"):
            assert ids.count(tok.convert_tokens_to_ids(t)) == 1
        assert ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")


def _released_string_trace(actions: str) -> str:
    """The released main.py transformation of a string-form trace (an independent reference)."""
    tool = actions.replace("\n\n", "\n").replace("Thought: \n", "Thought: ")
    for marker, word in (("<start_observation> ", "Observation"), ("<start_tool> ", "Thought:")):
        starts = [m.start() for m in re.finditer(word, tool)]
        for n, s in enumerate(starts):
            s += len(marker) * n
            tool = tool[:s] + marker + tool[s:]
    return tool


@needs_tara
def test_multi_tool_item_sequence_matches_the_released_rendering(tok):
    raw = _raw("agent_multi_tools_test_action.json", 3)
    item = load_tara("multi_tools", "test", limit=4)[3]
    a = raw["neg_answer"]
    expected = "\n".join(["### USER:", f"Question: {raw['question']}", f"Answer: {a['answer']}", "### ASSISTANT:",
                          _released_string_trace(a["actions"]), f"<start_work> Work: {a['score_agent']['explanation'].strip()}"]).strip()
    seg = render_item(item, "neg")
    assert seg.text == expected
    assert len(item.neg.steps) == 2 and item.neg.steps[0].action == "Calendar.target_day"
    ids, _ = encode_themis(tok, seg, positive=False)
    assert ids == tok(expected)["input_ids"] + [tok.eos_token_id]
    assert ids.count(tok.convert_tokens_to_ids("<start_tool>")) == 2


@needs_tara
def test_every_string_trace_round_trips():
    for group in ("multi_tools", "hh_rlhf"):
        name = TARA_FILES[group][0]
        items = load_tara(group, "train")
        with (tara_dir() / name).open() as fh:
            raws = [json.loads(line) for line in fh]
        for item, raw in zip(items, raws):
            for side, ans in (("pos", item.pos), ("neg", item.neg)):
                assert ans.render_trace() == _released_string_trace(raw[f"{side}_answer"]["actions"]).strip()


def test_no_tool_trace_and_context():
    steps, raw = parse_actions("Thought: Do I need to use a tool? No\nFinished.")
    assert steps == () and raw == "Thought: Do I need to use a tool? No\nFinished."
    assert render_plain("q?", "a.", "ctx") == "Context: ctx\nQuestion: q?\nAnswer: a."
    steps, _ = parse_actions({"Thought": "t", "Action": "calculator", "Action Input": "<<1+1=2>>2", "Observation": "ok"})
    assert steps == (ToolCall(thought="t", action="calculator", action_input="<<1+1=2>>2", observation="ok"),)
    with pytest.raises(ValueError):
        parse_actions(["not", "a", "trace"])


def _supervised_text(tok, ids, weights, keep=lambda w: w > 0) -> str:
    return tok.decode([i for i, w in zip(ids, weights) if keep(w)], skip_special_tokens=False)


@needs_tara
def test_released_masking_positive_negative_beta_omega(tok):
    item = load_tara("multi_tools", "test", limit=1)[0]
    # negatives: supervised text starts at "### ASSISTANT:"; positives at "Answer:"
    ids, w = encode_themis(tok, render_item(item, "neg"), positive=False)
    assert _supervised_text(tok, ids, w).startswith("### ASSISTANT:\n<start_tool> Thought:")
    assert "Answer:" not in _supervised_text(tok, ids, w)
    ids, w = encode_themis(tok, render_item(item, "pos"), positive=True)
    sup = _supervised_text(tok, ids, w)
    assert sup.startswith(f"Answer: {item.pos.answer}\n### ASSISTANT:") and "Question:" not in sup
    ids, w = encode_themis(tok, render_item(item, "pos"), positive=True, opts=ThemisLossOptions(positive_answer_lm=False))
    assert _supervised_text(tok, ids, w).startswith("### ASSISTANT:")
    # beta = 0: the observation text (up to the next <start_tool> / <start_work>) is masked, the token kept
    ids, w = encode_themis(tok, render_item(item, "neg"), positive=False, opts=ThemisLossOptions(beta=0.0))
    sup = _supervised_text(tok, ids, w)
    assert sup.count("<start_observation>") == 2 and "Observation:" not in sup and "humidity: " not in sup
    masked_after_question = _supervised_text(tok, ids[len(ids) // 4:], w[len(w) // 4:], keep=lambda x: x == 0)
    assert item.neg.steps[1].observation.strip() in masked_after_question
    assert sup.endswith("</s>") and "<start_work> Work:" in sup
    # omega = 0: no rationale in the sequence at all
    seg = render_item(item, "neg", include_rationale=False)
    assert "<start_work>" not in seg.text and seg.text.endswith(item.neg.steps[-1].observation)
    # released quirk: beta=0 without a rationale masks through the EOS
    ids, w = encode_themis(tok, seg, positive=False, opts=ThemisLossOptions(beta=0.0))
    assert w[-1] == 0.0 and ids[-1] == tok.eos_token_id


@needs_tara
def test_observation_dropout_masks_whole_observations(tok):
    import random

    item = load_tara("weather", "test", limit=1)[0]
    seg = render_item(item, "pos")
    full_ids, full_w = encode_themis(tok, seg, positive=True)
    ids, w = encode_themis(tok, seg, positive=True, opts=ThemisLossOptions(observation_dropout=0.999999), rng=random.Random(0))
    diff = [i for i, (a, b) in enumerate(zip(full_w, w)) if a != b]
    assert ids == full_ids and diff
    assert "Observation: The weather" in tok.decode([ids[i] for i in diff])


@needs_tara
def test_replay_with_the_real_tools_reproduces_the_gold_observations():
    from align import tools  # was importorskip("tools"), the pre-namespace name: it skipped this test

    def call(action, tool_input, context):
        res = tools.get_tool(action)(tool_input, context=context)
        assert res.ok, res.error
        return res.output

    for group in ("calendar", "weather", "multi_tools"):
        for item in load_tara(group, "test", limit=5):
            assert replay_steps(item, "neg", call) == item.neg.steps
