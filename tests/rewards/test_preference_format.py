"""train-rm reads TRL's preference formats: explicit prompt, and implicit prompt (chosen / rejected only), as
strings and as chat-message lists."""
from __future__ import annotations

import json

import pytest

from align.rewards.training import load_pairs


def _write(tmp_path, rows):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_implicit_prompt_strings_split_at_the_common_prefix(tmp_path):
    # common prefix "Q: sky? A: It is " ends in a space, which TRL's rule leaves with the completions
    path = _write(tmp_path, [{"chosen": "Q: sky? A: It is blue.", "rejected": "Q: sky? A: It is green."}])
    (pair,) = load_pairs(path, "train")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q: sky? A: It is", " blue.", " green.")


def test_implicit_prompt_conversations_split_at_the_common_messages(tmp_path):
    user = {"role": "user", "content": "What color is the sky?"}
    path = _write(tmp_path, [{"chosen": [user, {"role": "assistant", "content": "Blue."}],
                              "rejected": [user, {"role": "assistant", "content": "Green."}]}])
    (pair,) = load_pairs(path, "train")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("user: What color is the sky?\n", "Blue.", "Green.")


def test_explicit_conversational_prompt_is_rendered_not_repr(tmp_path):
    path = _write(tmp_path, [{"prompt": [{"role": "user", "content": "2+2?"}],
                              "chosen": [{"role": "assistant", "content": "4"}],
                              "rejected": [{"role": "assistant", "content": "5"}]}])
    (pair,) = load_pairs(path, "train")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("user: 2+2?\n", "4", "5")


def test_pairs_sharing_nothing_need_a_prompt_column(tmp_path):
    path = _write(tmp_path, [{"chosen": "yes", "rejected": "no"}])
    with pytest.raises(ValueError, match="add a prompt column"):
        load_pairs(path, "train")
