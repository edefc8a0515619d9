"""The update's logged token means do not depend on the micro-batch cut: with responses of mixed lengths,
`policy/entropy` is the mean over the minibatch's response tokens at micro_batch_size 3 as at 16."""
from __future__ import annotations

import pytest
import torch

import align
from align.testing import tiny_run_config
from align.trainer.forward import response_forward


def distinct_chars(prompts, completions, **kwargs):
    return [len(set(c)) / max(len(c), 1) for c in completions]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_entropy_metric_is_the_minibatch_token_mean(tiny_model_path, arithmetic_data, tmp_path):
    trainer = align.Trainer(tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run",
                                            distinct_chars, rollout={"max_new_tokens": 10},
                                            algo={"group_size": 4}, train={"prompts_per_step": 4, "micro_batch_size": 3}))
    trainer.optimizer.step = lambda: None  # every cut below must see the same weights
    step, _ = trainer.phase_generate()
    trainer.phase_score(step)
    b = step.batch
    lengths = torch.tensor([(3 * i) % 10 + 1 for i in range(len(b))])  # 1 .. 10 response tokens
    b.mask = b.mask * (torch.arange(b.mask.shape[1])[None] < lengths[:, None])
    trainer.phase_logprobs(step)
    trainer.phase_advantages(step)
    mini = step.train_rows
    with torch.no_grad():  # one forward of the whole minibatch: the token mean by its definition
        fwd = response_forward(trainer.models.policy, b.input_ids[mini], b.attention_mask[mini], b.mask.shape[1],
                               with_entropy=True)
    mask = step.mask[mini]
    expected = float((fwd.entropy * mask).sum() / mask.sum())
    for micro in (3, len(b)):
        trainer.cfg.train.micro_batch_size = micro
        assert trainer._optimizer_step(step, mini)["policy/entropy"] == pytest.approx(expected, abs=1e-6), micro
