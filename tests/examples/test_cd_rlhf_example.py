"""examples/cd_rlhf.py: its reward by hand (fast) and the whole experiment at toy size (slow)."""
from __future__ import annotations

import math

import pytest
from cd_rlhf import WordSentimentReward, format_table, run_experiment, word_tokenizer


def test_word_sentiment_reward_by_hand():
    reward = WordSentimentReward()
    got = reward(["p"] * 5, ["good nice kind warm calm", "good bad kind warm calm", "sad bad vile dark poor",
                             "good nice", "goodx nice kind warm calm"])
    # +1 per positive word, -1 per negative or unknown word, mean over 5 slots; not 5 words -> -1
    assert got == pytest.approx([1.0, 3 / 5, -1.0, -1.0, 3 / 5])


def test_word_tokenizer_is_one_token_per_word():
    tok = word_tokenizer()
    ids = tok("five words : good vile").input_ids
    assert len(ids) == 5 and tok.unk_token_id not in ids
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "five words : good vile"


@pytest.mark.slow
def test_experiment_runs_end_to_end(tmp_path):
    results = run_experiment(tmp_path, seeds=[0], eta=0.1, steps=2, prompts_per_step=4, n_samples=2,
                             sentbert=False, sft_epochs=1, n_sft=64)
    assert [(r["eta"], r["seed"]) for r in results["runs"]] == [(0.0, 0), (0.1, 0)]
    assert math.isnan(results["runs"][0]["gate_rate"])  # no curiosity module in the eta = 0 run
    assert 0.0 < results["runs"][1]["gate_rate"] <= 1.0
    table = format_table(results)
    assert "PPO (eta = 0)" in table and "CD-RLHF (eta = 0.1)" in table
    assert (tmp_path / "cd_rlhf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
