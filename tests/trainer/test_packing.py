"""Sequence packing and token-budget micro-batches: the plan (partitions within the budget) and the packed forward
(per-sample outputs equal a forward of each unpadded sequence alone) on Llama / Qwen2 / GPT-2 / OPT-style models."""
from __future__ import annotations

import random

import pytest
import torch

from align.config import TrainConfig
from align.errors import ConfigError
from align.trainer.micro_batches import in_row_order, metric_weight, micro_batches
from align.trainer.packing import PackedCausalLM, first_fit_decreasing, pack, packed_call


def test_first_fit_decreasing_is_a_partition_within_capacity():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 15))]
        cap = rng.randint(1, 20)
        bins = first_fit_decreasing(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        for b in bins:
            assert b == sorted(b)  # input order inside a bin
            assert sum(lengths[i] for i in b) <= cap or len(b) == 1  # only a lone item may exceed the budget
        # no two bins could be merged into one (a first-fit packing never leaves two bins at most half full)
        loads = sorted(sum(lengths[i] for i in b) for b in bins)
        assert len(loads) < 2 or loads[0] + loads[1] > cap
    # a case where the optimum is known: total 20 in bins of 10 -> 2 bins
    assert len(first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10)) == 2
    assert first_fit_decreasing([30, 2, 3], 10) == [[0], [1, 2]]  # the long one alone, not an error


def _engine_layout(prompt_lens, response_lens, p_width, t_width, vocab, seed=0):
    """Rows as the rollout engine lays them out: prompt left-padded to p_width, response right-padded to t_width."""
    g = torch.Generator().manual_seed(seed)
    n = len(prompt_lens)
    ids = torch.zeros(n, p_width + t_width, dtype=torch.long)
    att = torch.zeros(n, p_width + t_width, dtype=torch.long)
    seqs = []
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        prompt = torch.randint(3, vocab, (p,), generator=g)
        resp = torch.randint(3, vocab, (r,), generator=g)
        ids[i, p_width - p:p_width], att[i, p_width - p:p_width] = prompt, 1
        ids[i, p_width:p_width + r], att[i, p_width:p_width + r] = resp, 1
        seqs.append(torch.cat([prompt, resp]))
    return ids, att, seqs


def test_micro_batches_cut_by_tokens():
    ids, att, _ = _engine_layout([3, 5, 2, 4, 1, 6], [4, 1, 6, 2, 7, 3], 6, 7, 20)
    rows = torch.tensor([5, 0, 3, 1, 4, 2])
    lengths = att.sum(-1)
    plan = micro_batches(rows, att, 4, 12, pack_sequences=True)
    assert sorted(torch.cat(plan).tolist()) == sorted(rows.tolist())
    assert all(int(lengths[m].sum()) <= 12 for m in plan)
    # real lengths 7 6 8 6 8 9: only the two 6s fit one budget of 12, so five micro-batches is the optimum
    assert sorted(sorted(lengths[m].tolist()) for m in plan) == [[6, 6], [7], [8], [8], [9]]
    # a budget below every sample: each alone (no error), longest first, ties in minibatch order
    assert [m.tolist() for m in micro_batches(rows, att, 4, 5, pack_sequences=True)] == [[5], [4], [2], [0], [3], [1]]
    # unpacked rows all cost the padded width 13: a budget of 40 is 3 rows, in order
    assert [m.tolist() for m in micro_batches(rows, att, 4, 40, pack_sequences=False)] == [[5, 0, 3], [1, 4, 2]]
    # budget 0: today's fixed micro_batch_size
    assert [m.tolist() for m in micro_batches(rows, att, 4, 0, pack_sequences=True)] == [[5, 0, 3, 1], [4, 2]]


def test_outputs_return_to_row_order_and_token_weights():
    plan = [torch.tensor([2, 0]), torch.tensor([3]), torch.tensor([1])]
    chunks = [torch.tensor([[20.0], [0.0]]), torch.tensor([[30.0]]), torch.tensor([[10.0]])]
    assert in_row_order(chunks, plan).flatten().tolist() == [0.0, 10.0, 20.0, 30.0]
    mini = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    assert metric_weight(mini[:1], mini) == pytest.approx(2 / 6)
    assert metric_weight(mini[:0], mini[:0]) == 0.0


def test_config_validates_the_budget():
    assert TrainConfig(max_tokens_per_micro_batch=0, pack_sequences=True).pack_sequences
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch"):
        TrainConfig(max_tokens_per_micro_batch=-1)
    with pytest.raises(ConfigError, match="pack_sequences"):
        TrainConfig(pack_sequences="yes")


def _tiny(arch: str, impl: str):
    import transformers as tf

    vocab = 40
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    else:
        cfg = tf.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    model.set_attn_implementation(impl)
    return model, vocab


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_packed_forward_equals_each_sequence_alone(arch, impl):
    # OPT is the reason for the explicit 4D mask: its mask ignores position ids, so position-id-only packing
    # would let samples attend to each other (measured: outputs off by ~1)
    model, vocab = _tiny(arch, impl)
    ids, att, seqs = _engine_layout([6, 2, 1, 5, 2], [5, 1, 2, 3, 6], 7, 6, vocab)  # lengths 11 3 3 8 8
    rows = pack(ids, att, varlen=False)
    assert tuple(rows.input_ids.shape) == (3, 13)  # rows of the padded width 13: [11], [8, 3], [8, 3]
    decoder = model.get_decoder()
    with torch.no_grad():
        hidden = packed_call(decoder, ids, att, varlen=False, output="last_hidden_state")
        logits = PackedCausalLM(model)(input_ids=ids, attention_mask=att).logits
        for i, seq in enumerate(seqs):
            keep = att[i].bool()
            alone = decoder(input_ids=seq[None]).last_hidden_state[0]  # no padding, no mask, default positions
            torch.testing.assert_close(hidden[i][keep], alone, rtol=0, atol=2e-6)
            torch.testing.assert_close(logits[i][keep], model(input_ids=seq[None]).logits[0], rtol=0, atol=2e-6)
            assert (hidden[i][~keep] == 0).all()  # padding is never computed


def test_varlen_layout_is_one_row_with_restarting_positions():
    ids, att, seqs = _engine_layout([2, 3], [2, 1], 3, 2, 20)
    rows = pack(ids, att, varlen=True)
    assert rows.attention_mask is None
    assert rows.input_ids.tolist() == [torch.cat(seqs).tolist()]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]


@pytest.mark.gpu
def test_flash_attention_varlen_equals_each_sequence_alone():
    """The GPU path: flash-attention's varlen kernel through packed position ids (bf16 tolerance)."""
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="flash_attention_2",
                                                dtype=torch.bfloat16).cuda().eval()
    ids, att, seqs = _engine_layout([3, 7, 1, 5], [5, 1, 6, 3], 7, 6, 40)
    ids, att = ids.cuda(), att.cuda()
    lm = PackedCausalLM(model)
    assert lm.varlen
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=att).logits
        for i, seq in enumerate(seqs):
            alone = model(input_ids=seq[None].cuda()).logits[0]
            torch.testing.assert_close(logits[i][att[i].bool()].float(), alone.float(), rtol=0, atol=3e-2)
