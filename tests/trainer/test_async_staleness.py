"""Bounded staleness (train.max_staleness, align.trainer.async_rollouts) on a tiny model, local backend.

The reference for k = 1 is the documented schedule written out with the synchronous trainer's own phases: the
batch of step n is generated and scored at the start of step n - 1 (step 0's and 1's both with the initial
weights), so a run with the background thread must equal it exactly (metrics and weights)."""
from __future__ import annotations

import pytest
import torch

import align
from align.errors import ConfigError, UserError
from align.testing import CharFraction, tiny_run_config


def config(model, data, run_dir, k, **train):
    base = {"rollout": {"max_new_tokens": 5},
            "train": {"steps": 3, "prompts_per_step": 2, "lr": 1e-2, "max_staleness": k, **train},
            "algo": {"group_size": 4}}
    return tiny_run_config("grpo", model, data, run_dir, CharFraction(), base)


LEARNED = ("reward/mean", "loss/policy", "train/grad_norm", "rollout/response_length", "policy/entropy")


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.models.policy.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def reference_one_step_off(cfg, steps):
    """The k = 1 schedule by hand on a synchronous (k = 0) trainer: returns per-step metrics and final weights."""
    cfg = {**cfg, "train": {**cfg["train"], "max_staleness": 0}}
    t = align.Trainer(cfg)
    try:
        def job():
            step, m = t.phase_generate()
            m |= t.phase_score(step)
            return step, m

        queue, history = [job()], []
        for _ in range(steps):
            queue.append(job())  # drawn with the weights of this step's start
            step, m = queue.pop(0)
            m |= t.phase_logprobs(step)
            m |= t.phase_advantages(step)
            m |= t.phase_update(step)
            t.phase_sync()
            history.append(m)
        return history, weights(t)
    finally:
        t.close()


def test_k1_equals_the_one_step_off_schedule(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", 1)
    ref_hist, ref_w = reference_one_step_off(config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "r", 1), 3)
    t = align.Trainer(cfg)
    try:
        hist = t.train().history
        got_w = weights(t)
    finally:
        t.close()
    for h, r in zip(hist, ref_hist):
        assert {k: h[k] for k in LEARNED} == {k: r[k] for k in LEARNED}
    assert_same_weights(got_w, ref_w)
    n = 2 * 4
    assert [h["async/staleness_0"] for h in hist] == [n, 0, 0]  # step 0: drawn by version 0, trained at 0
    assert [h["async/staleness_1"] for h in hist] == [0, n, n]
    assert all(h["async/staleness_max"] <= 1 and h["async/in_flight"] <= 1 for h in hist)


def test_k0_is_the_synchronous_loop(tiny_model_path, arithmetic_data, tmp_path):
    """k = 0 builds no queue and no thread, and equals a run of a config without the key (main's config)."""
    cfg0 = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", 0)
    main_cfg = {**cfg0, "train": {k: v for k, v in cfg0["train"].items() if k != "max_staleness"}}
    main_cfg["logging"] = {**cfg0["logging"], "run_dir": str(tmp_path / "b")}
    runs = []
    for c in (cfg0, main_cfg):
        t = align.Trainer(c)
        try:
            assert t._async is None
            runs.append((t.train(max_steps=2).history, weights(t)))
        finally:
            t.close()
    (h0, w0), (h1, w1) = runs
    assert [{k: h[k] for k in LEARNED} for h in h0] == [{k: h[k] for k in LEARNED} for h in h1]
    assert not any(k.startswith("async/") for k in h0[0])
    assert_same_weights(w0, w1)


def test_k2_queue_is_bounded_and_versions_within_k(tiny_model_path, arithmetic_data, tmp_path):
    t = align.Trainer(config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", 2, steps=5))
    try:
        seen = []
        for n in range(5):
            step, m = t._async.take()
            assert len(t._async.jobs) == min(2, 4 - n)  # k jobs ahead of the step trained, none past the run's end
            assert (n - step.batch.versions).max() <= 2
            assert step.batch.versions.tolist() == [max(0, n - 2)] * 8  # the documented schedule
            seen.append(m["async/staleness_max"])
            t.phase_logprobs(step)
            t.phase_advantages(step)
            t.phase_update(step)
            t.phase_sync()
        assert seen == [0, 1, 2, 2, 2]
    finally:
        t.close()


def test_forced_stale_group_is_dropped_and_regenerated(tiny_model_path, arithmetic_data, tmp_path):
    t = align.Trainer(config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", 1, steps=3))
    try:
        t.train(max_steps=1)
        queued = t._async.jobs[0]
        queued.done.wait(60)
        step, _ = queued.result
        step.batch.versions[4:] = -3  # the second group: drawn 4 versions ago (more than k = 1)
        prompts = list(step.batch.prompts)
        got, m = t._async.take()
        assert m["async/dropped"] == 4.0
        assert m["async/staleness_max"] <= 1
        assert got.batch.versions.tolist() == [0] * 4 + [1] * 4  # kept group, then the regenerated one
        assert got.batch.prompts == prompts  # same prompts, regrouped: the kept groups first
        assert got.scores.shape == (8,) and bool(got.valid.all())
    finally:
        t.close()


def test_resume_with_a_queue_is_exact(tiny_model_path, arithmetic_data, tmp_path):
    full = align.Trainer(config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "full", 1, steps=4))
    try:
        h_full = full.train().history
        w_full = weights(full)
    finally:
        full.close()
    part_cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "part", 1, steps=4)
    part_cfg["checkpoint"] = {**part_cfg.get("checkpoint", {}), "every": 2}
    first = align.Trainer(part_cfg)
    try:
        first.train(max_steps=2)
    finally:
        first.close()
    again = align.Trainer(part_cfg, resume_from=tmp_path / "part")
    try:
        assert again.step == 2 and len(again._async.jobs) == 1  # the queued batch came back
        h_again = again.train().history
        w_again = weights(again)
    finally:
        again.close()
    assert [{k: h[k] for k in LEARNED} for h in h_again] == [{k: h[k] for k in LEARNED} for h in h_full[2:]]
    assert_same_weights(w_again, w_full)


def test_partial_rollouts_in_the_loop(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", 1, steps=3)
    cfg["rollout"] |= {"partial": True, "partial_chunk_tokens": 1}
    t = align.Trainer(cfg)
    try:
        for n in range(3):
            step, m = t._async.take()
            b = step.batch
            assert b.token_versions is not None
            tv = torch.where(b.mask.bool(), b.token_versions, torch.full_like(b.token_versions, 10**6))
            assert torch.equal(b.versions, tv.min(-1).values)
            assert int(b.token_versions[b.mask.bool()].max()) <= n and m["async/staleness_max"] <= 1
            # versions never decrease along a response
            assert bool((b.token_versions[:, 1:] >= b.token_versions[:, :-1])[b.mask[:, 1:].bool()].all())
            t.phase_logprobs(step)
            t.phase_advantages(step)
            t.phase_update(step)
            t.phase_sync()
    finally:
        t.close()


def test_refusals(tiny_model_path, arithmetic_data, tmp_path):
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", 1)
    cfg["algo"] |= {"dynamic_sampling": {"enable": True, "max_rounds": 3}}
    with pytest.raises(UserError, match="dynamic sampling"):
        align.Trainer(cfg)
    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "b", 0)
    cfg["rollout"] |= {"partial": True}
    with pytest.raises(ConfigError, match="max_staleness"):
        align.Trainer(cfg)
    with pytest.raises(ConfigError, match="max_staleness"):
        align.Trainer(config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "c", -1))


def test_stale_batch_carries_the_drawing_policys_logprobs(tiny_model_path, arithmetic_data, tmp_path):
    """k = 1, step 1 trains on a batch drawn by version 0: its rollout log-probs are version 0's (teacher-forced
    recomputation with the initial weights), not the trainer's; the correction weights see that gap."""
    from align.trainer.forward import response_forward

    cfg = config(tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", 1, steps=2)
    cfg["algo"] |= {"rollout_correction": {"mode": "token_tis"}}
    t = align.Trainer(cfg)
    try:
        w0 = weights(t)
        h = t.train(max_steps=1).history
        step, m = t._async.take()
        b = step.batch
        assert b.versions.tolist() == [0] * 8 and t.step == 1
        m |= t.phase_logprobs(step)
        w1 = weights(t)
        t.models.policy.load_state_dict(w0)
        with torch.no_grad():
            lp0 = response_forward(t.models.policy, b.input_ids, b.attention_mask, b.mask.shape[1]).logprobs
        t.models.policy.load_state_dict(w1)
        keep = b.mask.bool()
        assert torch.allclose(b.logprobs[keep], lp0[keep], atol=1e-4)
        # old log-probs are the trainer's (version 1): the correction compares them with version 0's
        assert torch.allclose(step.old_logprobs[keep] - b.logprobs[keep], (step.old_logprobs - lp0)[keep], atol=1e-4)
        assert float((step.old_logprobs - lp0)[keep].abs().max()) > 1e-3
        assert h[0]["rollout_corr/ratio_max"] == pytest.approx(1.0, abs=1e-3)  # step 0: on-policy
        assert abs(m["rollout_corr/ratio_max"] - 1.0) > 1e-3 or abs(m["rollout_corr/ratio_min"] - 1.0) > 1e-3
    finally:
        t.close()
