"""Themis: value head on the final EOS, the released loss, and the trace loop with a scripted policy."""
from __future__ import annotations

import math
import threading

import pytest
import torch
from _tiny import cached

from align.rewards.tara import TOOL_FAILED_OBSERVATION
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
from align.tools import ToolResult

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


class ScriptedPolicy:
    """Emits a tool call until the trace holds `n_calls` observations, then a rationale; records its inputs."""

    def __init__(self, calls: list[tuple[str, str]], work: str = "the answer agrees with the tool."):
        self.calls, self.work, self.seen = calls, work, []

    def __call__(self, texts):
        self.seen.append(list(texts))
        out = []
        for t in texts:
            done = t.count("Observation:")
            if t.endswith("<start_work> Work:"):  # the loop forced the rationale
                out.append(f" {self.work}{EOS}")
            elif done < len(self.calls):
                action, arg = self.calls[done]
                out.append(f"<start_tool> Thought: check it\nAction: {action}\nAction Input: {arg}\n<start_observation>")
            else:
                out.append(f"<start_work> Work: {self.work}{EOS}")
        return out


class RecordingTool:
    def __init__(self, fn, ok=True):
        self.fn, self.ok, self.calls = fn, ok, []
        self.lock = threading.Lock()

    def __call__(self, tool_input, context=None):
        with self.lock:
            self.calls.append((tool_input, dict(context or {})))
        if not self.ok:
            return ToolResult(False, "", "backend said no", 0.01)
        return ToolResult(True, self.fn(tool_input), None, 0.01)


def test_scripted_loop_dispatches_tools_appends_observations_and_scores(themis):
    model, tok = themis
    week_day = RecordingTool(lambda s: "Monday")
    diff = RecordingTool(lambda s: "1759")
    policy = ScriptedPolicy([("Calendar.week_day", "2008-06-16"), ("Calendar.day_difference", "2015-11-05, 2011-01-11")])
    rm = ThemisRewardModel(model=model, tokenizer=tok, generator=policy,
                           tools={"Calendar.week_day": week_day, "Calendar.day_difference": diff}, device="cpu")
    out = rm.score(["Which day is 2008-06-16?"], ["It is Monday"], id=["s0"])
    expected = (user("Which day is 2008-06-16?", "It is Monday")
                + "<start_tool> Thought: check it\nAction: Calendar.week_day\nAction Input: 2008-06-16\n<start_observation> Observation: Monday\n"
                + "<start_tool> Thought: check it\nAction: Calendar.day_difference\nAction Input: 2015-11-05, 2011-01-11\n"
                + "<start_observation> Observation: 1759\n<start_work> Work: the answer agrees with the tool.")
    assert out.info[0]["trace"] == expected[len(user("Which day is 2008-06-16?", "It is Monday")):]
    assert week_day.calls == [("2008-06-16", {"id": "s0", "question": "Which day is 2008-06-16?", "answer": "It is Monday"})]
    assert [c[0] for c in diff.calls] == ["2015-11-05, 2011-01-11"]
    assert out.info[0]["rounds"] == 2 and [c["output"] for c in out.info[0]["tool_calls"]] == ["Monday", "1759"]
    # the generator saw the observation appended before continuing
    assert policy.seen[1][0].endswith("<start_observation> Observation: Monday\n")
    assert out.scores[0] == pytest.approx(_reference_score(model, tok, expected), abs=1e-5)


def test_tool_calls_of_one_round_run_concurrently(themis):
    model, tok = themis
    barrier = threading.Barrier(3, timeout=20)  # deadlocks (BrokenBarrierError) if the calls ran one at a time

    def wait_then_answer(s):
        barrier.wait()
        return s.upper()

    tool = RecordingTool(wait_then_answer)
    rm = ThemisRewardModel(model=model, tokenizer=tok, generator=ScriptedPolicy([("echo", "x")]), tools={"echo": tool},
                           batch_size=2, device="cpu")
    out = rm.score(["q1", "q2", "q3"], ["a1", "a2", "a3"])
    assert len(tool.calls) == 3 and all(i["tool_calls"][0]["output"] == "X" for i in out.info)
    assert all(math.isfinite(s) for s in out.scores)


def test_failed_and_unknown_tools_give_a_failure_observation(themis):
    model, tok = themis
    rm = ThemisRewardModel(model=model, tokenizer=tok, generator=ScriptedPolicy([("broken", "x"), ("nope", "y")]),
                           tools={"broken": RecordingTool(str, ok=False)}, device="cpu")
    out = rm.score(["q"], ["a"])
    trace = out.info[0]["trace"]
    assert trace.count(f"Observation: {TOOL_FAILED_OBSERVATION}\n") == 2
    calls = out.info[0]["tool_calls"]
    assert calls[0]["error"] == "backend said no" and calls[1]["error"].startswith("unknown tool")
    assert out.scores[0] is not None


def test_a_crashing_tool_raises(themis):
    model, tok = themis

    def crash(tool_input, context=None):
        raise RuntimeError("sandbox died")

    rm = ThemisRewardModel(model=model, tokenizer=tok, generator=ScriptedPolicy([("t", "x")]), tools={"t": crash}, device="cpu")
    with pytest.raises(RuntimeError, match="sandbox died"):
        rm.score(["q"], ["a"])


def test_max_rounds_caps_tool_calls_and_forces_the_rationale(themis):
    model, tok = themis
    tool = RecordingTool(lambda s: "ok")
    policy = ScriptedPolicy([("t", "1"), ("t", "2"), ("t", "3"), ("t", "4")])
    rm = ThemisRewardModel(model=model, tokenizer=tok, generator=policy, tools={"t": tool}, max_rounds=1, device="cpu")
    out = rm.score(["q"], ["a"])
    assert [c[0] for c in tool.calls] == ["1"]
    assert out.info[0]["tool_calls"][-1]["error"] == "tool budget exhausted"
    assert out.info[0]["trace"].endswith("<start_work> Work: the answer agrees with the tool.")


def test_finished_without_tool_appends_start_work(themis):
    model, tok = themis
    seen = []

    def policy(texts):
        seen.append(texts[0])
        if "<start_work>" not in texts[0]:
            return [f"<start_tool> Thought: Do I need to use a tool? No\nFinished.{EOS}"]
        return [f"Work: fine.{EOS}"]

    rm = ThemisRewardModel(model=model, tokenizer=tok, generator=policy, tools={}, device="cpu")
    out = rm.score(["q"], ["a"])
    assert out.info[0]["trace"] == "<start_tool> Thought: Do I need to use a tool? No\nFinished.\n<start_work> Work: fine."
    assert seen[1].endswith("Finished.\n<start_work> ")
    assert out.info[0]["tool_calls"] == []


def test_context_column_goes_into_the_user_part(themis):
    model, tok = themis
    policy = ScriptedPolicy([])
    rm = ThemisRewardModel(model=model, tokenizer=tok, generator=policy, tools={}, device="cpu")
    rm.score(["q"], ["a"], context=["some text"])
    assert policy.seen[0][0] == "### USER:\nContext: some text\nQuestion: q\nAnswer: a\n### ASSISTANT:\n"


def test_real_greedy_generation_runs_end_to_end(themis):
    model, tok = themis
    rm = ThemisRewardModel(model=model, tokenizer=tok, tools={}, max_new_tokens=6, device="cpu")
    out = rm.score(["Which day is 2008-06-16?", "q"], ["Monday", "a longer answer here"])
    assert all(s is not None and math.isfinite(s) for s in out.scores)
    for info, q, a in zip(out.info, ["Which day is 2008-06-16?", "q"], ["Monday", "a longer answer here"]):
        full = user(q, a) + info["trace"]
        assert "<start_work>" in info["trace"]
        assert out.scores[out.info.index(info)] == pytest.approx(_reference_score(model, tok, full), abs=1e-4)


def test_score_is_independent_of_batch_padding(themis):
    model, tok = themis
    rm = ThemisRewardModel(model=model, tokenizer=tok, tools={}, generator=ScriptedPolicy([]), device="cpu")
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
