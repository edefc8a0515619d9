"""Every row of a RolloutBatch says why it stopped: "eos" (emitted EOS), "stop" (a stop token or stop string),
"length" (hit max_new_tokens); the codes survive select / concat / micro-batching and reach reward functions."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.backends.local import LocalBackend
from align.rewards.base import RewardFunction, RewardOutput
from align.rollouts import RolloutEngine, SamplingParams
from align.rollouts.batch import STOP_LENGTH, STOP_REASONS
from align.rollouts.worker import reward_payload

PROMPTS = ["1+2=", "33+44=", "7", "hello world, ", "abc", "(9*9)="]
T = 8


@pytest.fixture(scope="module")
def qwen(tiny_qwen_path):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen_path).eval(), AutoTokenizer.from_pretrained(tiny_qwen_path)


@pytest.fixture(scope="module")
def greedy(qwen):
    """Greedy rows that never stop: what each row would generate in T steps."""
    model, tok = qwen
    out = RolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=T, temperature=0.0, ignore_eos=True))
    assert out.stop_reasons == ["length"] * len(PROMPTS)
    return out.response_ids.tolist()


def splitting_token(rows: list[list[int]]) -> int:
    """A token of row 0's first three that some other row never generates (so both outcomes occur)."""
    for tok in rows[0][:3]:
        if any(tok not in r for r in rows[1:]):
            return tok
    pytest.fail("every row generates row 0's first tokens: change PROMPTS so the fixture model separates them")


def expected_by_token(rows, token, reason):
    return [reason if token in r else "length" for r in rows]


def test_eos_and_length(qwen, greedy):
    model, tok = qwen
    x = splitting_token(greedy)
    eos_tok = copy.deepcopy(tok)
    eos_tok.eos_token = tok.convert_ids_to_tokens(x)  # this tokenizer's EOS is a token the model emits
    assert eos_tok.eos_token_id == x
    for micro in (64, 2):  # micro-batches are bucketed by length, concatenated and put back in order
        out = RolloutEngine(model, eos_tok, micro_batch_size=micro).generate(
            PROMPTS, SamplingParams(max_new_tokens=T, temperature=0.0))
        assert out.stop_reasons == expected_by_token(greedy, x, "eos")
        for i, r in enumerate(greedy):
            n = r.index(x) + 1 if x in r else T
            assert int(out.mask[i].sum()) == n
        assert out.truncated.tolist() == [x not in r for r in greedy]
        assert out.stop_reason.dtype == torch.long and out.stop_reason.shape == (len(PROMPTS),)


def test_stop_token_is_stop(qwen, greedy):
    model, tok = qwen
    x = splitting_token(greedy)
    out = RolloutEngine(model, tok).generate(
        PROMPTS, SamplingParams(max_new_tokens=T, temperature=0.0, stop_token_ids=[x], ignore_eos=True))
    assert out.stop_reasons == expected_by_token(greedy, x, "stop")


def test_stop_string_is_stop(qwen, greedy):
    model, tok = qwen
    texts = [tok.decode(r, skip_special_tokens=True) for r in greedy]
    stop = next((t[1:3] for t in texts if len(t) >= 3 and any(t[1:3] not in u for u in texts)), None)
    assert stop is not None, "no stop string separates the rows: change PROMPTS so the fixture model separates them"
    out = RolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=T, temperature=0.0,
                                                                     ignore_eos=True, stop=[stop]))
    assert out.stop_reasons == ["stop" if stop in t else "length" for t in texts]
    assert "stop" in out.stop_reasons and "length" in out.stop_reasons


def test_length_rows_reach_max_new_tokens_even_when_sampling(qwen):
    model, tok = qwen
    out = RolloutEngine(model, tok).generate(PROMPTS * 3, SamplingParams(max_new_tokens=4, seed=3))
    lengths = out.mask.sum(-1)
    eos = tok.eos_token_id
    for i, reason in enumerate(out.stop_reasons):
        last = int(out.response_ids[i, int(lengths[i]) - 1])
        if reason == "length":
            assert int(lengths[i]) == 4 and last != eos
        else:
            assert reason == "eos" and last == eos


def test_select_and_concat_carry_stop_reasons(qwen):
    model, tok = qwen
    out = RolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
    out.stop_reason = torch.tensor([0, 1, 2, 0, 1, 2])
    assert out.select([2, 0]).stop_reasons == ["length", "eos"]
    joined = type(out).concat([out.select([0, 1]), out.select([5])], pad_token_id=tok.pad_token_id)
    assert joined.stop_reasons == ["eos", "stop", "length"]
    assert STOP_REASONS[STOP_LENGTH] == "length" and "tool_call" in STOP_REASONS  # reserved for tool use


class Recording(RewardFunction):
    name = "recording"

    def __init__(self):
        self.kwargs = None

    def score(self, prompts, completions, **kwargs):
        self.kwargs = kwargs
        return RewardOutput(scores=[float(r == "length") for r in kwargs["stop_reason"]])


def test_reward_functions_receive_stop_reason(qwen, greedy):
    model, tok = qwen
    x = splitting_token(greedy)
    eos_tok = copy.deepcopy(tok)
    eos_tok.eos_token = tok.convert_ids_to_tokens(x)
    reward = Recording()
    backend = LocalBackend(RolloutEngine(model, eos_tok), reward)
    columns = {"label": list(range(len(PROMPTS)))}
    batch = backend.generate(PROMPTS, columns, torch.arange(len(PROMPTS)),
                             SamplingParams(max_new_tokens=T, temperature=0.0))
    out = backend.score(batch)
    expected = expected_by_token(greedy, x, "eos")
    assert reward.kwargs["stop_reason"] == expected
    assert reward.kwargs["label"] == columns["label"] and len(reward.kwargs["completion_ids"]) == len(PROMPTS)
    assert out.scores == [float(r == "length") for r in expected]
    # the Ray path ships the same keyword arguments to the reward workers
    payload = reward_payload(batch, torch.arange(len(PROMPTS)))
    assert payload["columns"]["stop_reason"] == expected
    assert payload["columns"].keys() == reward.kwargs.keys()
