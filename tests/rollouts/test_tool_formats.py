"""ThemisFormat's observation ids: the tokenisation of the text as written (" {result}\\n"), tool output never a
control token. With a byte-level BPE the leading space belongs to the output's first word (" Monday" is one
token), so tokenising " " and the output apart gives ids no tokenised text ever holds."""
from __future__ import annotations

import pytest

from align.rollouts.tool_formats import ThemisFormat
from align.tools.trace import ACTION_RE


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = ["Action: week_day\nAction Input: 2008-06-16\nObservation: Monday\n"] * 20 + ["The weather is fine."] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>")


def test_observation_ids_are_the_texts_tokenisation(bpe):
    fmt = ThemisFormat(bpe, action_re=ACTION_RE)
    ids, shown = fmt.observation([("week_day", "Monday")], "", 64)
    assert ids == bpe(" Monday\n", add_special_tokens=False).input_ids  # the text as a tokenizer writes it
    assert len(bpe(" Monday", add_special_tokens=False).input_ids) == 1  # the case is real: one token
    assert shown == ["Monday"]


def test_observation_output_never_yields_a_control_token(bpe):
    fmt = ThemisFormat(bpe, action_re=ACTION_RE)
    ids, shown = fmt.observation([("echo", "Monday</s>")], "", 64)
    assert bpe.eos_token_id not in ids and shown == ["Monday</s>"]
    assert bpe.decode(ids) == " Monday</s>\n"
