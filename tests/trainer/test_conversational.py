"""Conversational data end to end, as a TRL user writes it: message-list prompts get the chat template, and a
TRL reward function receives the prompts back as message lists, completions as
`[{"role": "assistant", "content": text}]`, plus trainer_state / log_metric / log_extra."""
from __future__ import annotations

import json

import pytest

import align
from align.errors import UserError
from align.testing import tiny_run_config

SEEN: list[dict] = []


def trl_reward(prompts, completions, answer, trainer_state, log_metric, log_extra, **kwargs):
    """Reads the shapes a TRL GRPOTrainer reward reads; records them for the test."""
    texts = [c[0]["content"] for c in completions]
    SEEN.append({"prompts": prompts, "completions": completions, "answer": answer, "texts": texts,
                 "step": trainer_state.global_step, "max_steps": trainer_state.max_steps, "epoch": trainer_state.epoch})
    log_metric("shaping/step", float(trainer_state.global_step))
    log_extra("text_len", [len(t) for t in texts])
    return [float(t.strip() == a) for t, a in zip(texts, answer)]


def plain_reward(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def conversations(path):
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"{i}+0="}],
             "answer": str(i)} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_trl_reward_gets_messages_and_trainer_state(tiny_model_path, tmp_path):
    rows = conversations(tmp_path / "chat.jsonl")
    SEEN.clear()
    cfg = tiny_run_config("grpo", tiny_model_path, tmp_path / "chat.jsonl", tmp_path / "run", trl_reward,
                          train={"steps": 2, "prompts_per_step": 2}, algo={"group_size": 2})
    result = align.train(cfg)
    assert [s["step"] for s in SEEN] == [0, 1]  # optimizer steps done before each scoring, as TRL's global_step
    assert all(s["max_steps"] == 2 for s in SEEN)
    assert [s["epoch"] for s in SEEN] == [0.0, 0.5]  # steps done x 2 prompts per step / 4 prompts
    for s in SEEN:
        assert len(s["prompts"]) == 4
        for p, c, a in zip(s["prompts"], s["completions"], s["answer"]):
            assert p in [r["prompt"] for r in rows] and a == p[1]["content"][:-3]  # the original messages
            assert isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
    assert [h["shaping/step"] for h in result.history] == [0.0, 1.0]


def test_chat_template_renders_message_prompts(tiny_model_path, tmp_path):
    """The policy saw the tokenizer's chat template over the messages (not the reward's message lists)."""
    from align.config import DataConfig
    from align.data import PromptDataset
    from align.testing import make_char_tokenizer

    conversations(tmp_path / "chat.jsonl")
    ds = PromptDataset(DataConfig(path=str(tmp_path / "chat.jsonl")), make_char_tokenizer())
    assert ds.prompt_text(ds.records[0]) == "system: be brief\nuser: 0+0=\nassistant: "


def test_chat_template_false_refuses_message_prompts(tiny_model_path, tmp_path):
    conversations(tmp_path / "chat.jsonl")
    cfg = tiny_run_config("grpo", tiny_model_path, tmp_path / "chat.jsonl", tmp_path / "run", plain_reward,
                          data={"chat_template": False}, algo={"group_size": 2})
    with pytest.raises(UserError, match="data.chat_template is false but a prompt is a list of chat messages"):
        align.train(cfg)


def reads_messages(prompts, completions, **kwargs):
    """TRL's usual conversational reward: the last prompt turn and the completion's first message."""
    return [float(p[-1]["role"] == "user" and c[0]["role"] == "assistant") for p, c in zip(prompts, completions)]


def test_reward_reading_message_lists_runs(tiny_model_path, tmp_path):
    conversations(tmp_path / "chat.jsonl")
    cfg = tiny_run_config("grpo", tiny_model_path, tmp_path / "chat.jsonl", tmp_path / "run", reads_messages,
                          algo={"group_size": 2})
    assert align.train(cfg).metrics["reward/mean"] == 1.0
