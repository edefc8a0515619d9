"""Training on tool episodes, end to end on the tiny models: the trainer's recomputed log-probs of policy tokens match
the engine's on multi-turn sequences (policy segments sampled by the real RolloutEngine, fixed observation ids
spliced between them); GRPO and PPO steps on tool batches complete, ignore everything at observation positions
(identical weights whatever the rollout log-probs there), and rewards get the trajectory as TRL-style kwargs,
in process and through the Ray reward worker's payload."""
from __future__ import annotations

import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import align
from align.rewards.base import CallableReward
from align.rewards.worker import RewardWorker
from align.rollouts import RolloutEngine, SamplingParams
from align.rollouts.batch import RolloutBatch
from align.rollouts.worker import reward_payload
from align.testing import WrappedBackend, tiny_run_config
from align.trainer.forward import response_forward

LOGPROB_TOL = 1e-4  # docs/engine.md "Log-prob agreement": fp32 CPU tiny models, tests assert < 1e-4


def sample_multi_turn(engine, prompt: list[int], observations: list[list[int]], trailing: list[int] | None,
                      seg_len: int, sample_id: int) -> tuple[list[int], list[float], list[int]]:
    """Policy segments of `seg_len` sampled by the engine, each observation's ids appended after one (and
    `trailing` after the last): -> (response ids, rollout log-probs (0 at observations), tool mask)."""
    ids, resp, lps, tool = list(prompt), [], [], []
    params = SamplingParams(max_new_tokens=seg_len, temperature=1.0, ignore_eos=True, seed=3)
    for k in range(len(observations) + 1):
        out = engine.generate([ids], params, sample_ids=torch.tensor([100 * sample_id + k]))
        keep = out.mask[0].bool()
        seg = out.response_ids[0][keep].tolist()
        resp, lps, tool, ids = resp + seg, lps + out.logprobs[0][keep].tolist(), tool + [0] * len(seg), ids + seg
        obs = observations[k] if k < len(observations) else trailing
        if obs:
            resp, lps, tool, ids = resp + obs, lps + [0.0] * len(obs), tool + [1] * len(obs), ids + obs
    return resp, lps, tool


def padded_batch(prompts: list[list[int]], rows: list[tuple[list[int], list[float], list[int]]]) -> RolloutBatch:
    n, p, t = len(rows), max(map(len, prompts)), max(len(r[0]) for r in rows)
    b = RolloutBatch(prompt_ids=torch.zeros(n, p, dtype=torch.long), prompt_mask=torch.zeros(n, p, dtype=torch.long),
                     response_ids=torch.zeros(n, t, dtype=torch.long), mask=torch.zeros(n, t, dtype=torch.long),
                     logprobs=torch.zeros(n, t), tool_mask=torch.zeros(n, t, dtype=torch.long))
    for i, (prompt, (ids, lps, tool)) in enumerate(zip(prompts, rows)):
        b.prompt_ids[i, p - len(prompt):], b.prompt_mask[i, p - len(prompt):] = torch.tensor(prompt), 1
        k = len(ids)
        b.response_ids[i, :k], b.mask[i, :k] = torch.tensor(ids), 1
        b.logprobs[i, :k], b.tool_mask[i, :k] = torch.tensor(lps), torch.tensor(tool)
    return b


def test_recomputed_logprobs_of_policy_tokens_match_the_engine_on_multi_turn_sequences(tiny_qwen_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_path).eval()
    tok = AutoTokenizer.from_pretrained(tiny_qwen_path)
    engine = RolloutEngine(model, tok)
    enc = [tok(t, add_special_tokens=False).input_ids for t in ("12*34=", "hello ", "(9*9)=")]
    obs = [tok(t, add_special_tokens=False).input_ids for t in (" = 408\n", " ok", "81")]
    rows = [sample_multi_turn(engine, enc[0], [obs[0], obs[1]], None, 4, 0),  # two tool turns
            sample_multi_turn(engine, enc[1], [obs[2]], obs[0], 3, 1),  # ends on an observation
            sample_multi_turn(engine, enc[2], [], None, 5, 2)]  # no tool
    b = padded_batch(enc, rows)
    policy = (b.mask.bool() & ~b.tool_mask.bool())
    with torch.no_grad():
        fwd = response_forward(model, b.input_ids, b.attention_mask, b.response_ids.shape[1])
    diff = (fwd.logprobs - b.logprobs).abs()[policy]
    assert diff.numel() == sum(sum(1 for x in tool if x == 0) for _, _, tool in rows)
    assert float(diff.max()) < LOGPROB_TOL
    # the check sees the observations: other observation ids change the policy tokens after them
    ids = b.response_ids.clone()
    ids[b.tool_mask.bool()] = (ids[b.tool_mask.bool()] + 1) % tok.vocab_size
    with torch.no_grad():
        other = response_forward(model, torch.cat([b.prompt_ids, ids], 1), b.attention_mask, ids.shape[1])
    assert float((other.logprobs - b.logprobs).abs()[policy].max()) > 1e-3


SEEN: list[dict] = []


def reward_with_trajectory(prompts, completions, trajectory=None, **kwargs):
    SEEN.append({"completions": list(completions), "trajectory": trajectory})
    return [sum(map(ord, c)) % 7 / 7 for c in completions]  # varied scores: non-zero group advantages


def trajectory_of(text: str) -> list[dict]:
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}
    return [{"role": "assistant", "content": text, "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "content": "408"},
            {"role": "assistant", "content": "408"}]


class ToolEpisodes(WrappedBackend):
    """A Backend around the trainer's own: its batches become tool episodes. In even rows, response positions 1-2
    and the last response token are observation tokens whose rollout log-probs are `fill`; every row gets a
    trajectory column."""

    def __init__(self, inner, fill: float):
        super().__init__(inner)
        self.fill = fill

    def generate(self, prompts, columns, sample_ids, params) -> RolloutBatch:
        b = self.inner.generate(prompts, columns, sample_ids, params)
        tool = torch.zeros_like(b.mask)
        for i in range(0, len(b), 2):
            n = int(b.mask[i].sum())
            if n >= 5:
                tool[i, 1:3], tool[i, n - 1] = 1, 1
        b.tool_mask = tool
        b.logprobs = torch.where(tool.bool(), torch.full_like(b.logprobs, self.fill), b.logprobs)
        if b.sampling_logprobs is not None:
            b.sampling_logprobs = torch.where(tool.bool(), torch.full_like(b.logprobs, self.fill), b.sampling_logprobs)
        b.columns["trajectory"] = [trajectory_of(c) for c in b.completions]
        return b


def run_arm(model, data, run_dir, algorithm: str, fill: float, sections: dict) -> tuple[dict, dict]:
    cfg = tiny_run_config(algorithm, model, data, run_dir, reward_with_trajectory,
                          {"rollout": {"max_new_tokens": 8, "ignore_eos": True}, "train": {"prompts_per_step": 4}},
                          sections)
    trainer = align.Trainer(cfg)
    trainer.backend = ToolEpisodes(trainer.backend, fill)
    metrics = [trainer.train_step() for _ in range(2)]
    weights = {k: v.detach().clone() for k, v in trainer.models.policy.state_dict().items()}
    trainer.backend.close()
    return metrics[-1] | {"first": metrics[0]}, weights


@pytest.mark.parametrize("algorithm,sections", [
    ("grpo", {"algo": {"group_size": 2, "epochs": 2, "kl_coef": 0.05, "entropy_coef": 0.01},
              "rollout": {"use_rollout_logprobs": True}}),  # the rollout's log-probs are the old ones
    ("ppo", {"algo": {"kl_coef": 0.05, "rollout_correction": {"mode": "token_tis"}}}),  # and feed the weights
])
def test_steps_on_tool_batches_ignore_observation_logprobs(tiny_model_path, arithmetic_data, tmp_path,
                                                           algorithm, sections):
    SEEN.clear()
    m0, w0 = run_arm(tiny_model_path, arithmetic_data["prompts"], tmp_path / "a", algorithm, 0.0, sections)
    m1, w1 = run_arm(tiny_model_path, arithmetic_data["prompts"], tmp_path / "b", algorithm, -9.0, sections)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)  # the identical update
    assert m0["train/grad_norm"] == m1["train/grad_norm"]
    assert m0["first"]["advantages/abs_mean" if algorithm == "grpo" else "returns/mean"] != 0  # a real signal
    if algorithm == "ppo":  # trainer-computed old log-probs vs the rollout's, over policy tokens only
        assert m0["rollout/logprob_diff_max"] < 1e-4 and m1["rollout/logprob_diff_max"] < 1e-4
    for m in (m0, m0["first"]):
        assert m["rollout/tool_tokens"] > 0 and m["rollout/policy_tokens"] > 0
        assert m["rollout/policy_tokens"] + m["rollout/tool_tokens"] == m["rollout/tokens"]
        assert "train/skipped" not in m and all(v == v for v in m.values() if isinstance(v, float))
    assert any(not torch.equal(w0[k], v) for k, v in
               AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict().items())  # it did train
    # the reward got the trajectory of every sample (text prompts: completions stay text)
    assert SEEN and all(isinstance(c, str) for s in SEEN for c in s["completions"])
    assert all(s["trajectory"] == [trajectory_of(c) for c in s["completions"]] for s in SEEN)


def conversational_batch() -> RolloutBatch:
    n, t = 2, 3
    return RolloutBatch(prompt_ids=torch.ones(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                        response_ids=torch.ones(n, t, dtype=torch.long), mask=torch.ones(n, t, dtype=torch.long),
                        logprobs=torch.zeros(n, t), tool_mask=torch.tensor([[0, 1, 0], [0, 0, 0]]),
                        prompts=["what is 12*34?", "hi"], completions=["408", "hello"],
                        columns={"prompt_messages": [[{"role": "user", "content": "what is 12*34?"}], None],
                                 "trajectory": [trajectory_of("<tool_call>...</tool_call>"), None]})


def test_conversational_completions_are_the_trajectory_in_process_and_through_the_ray_worker_payload():
    got = []

    def fn(prompts, completions, **kwargs):
        got.append((prompts, completions, kwargs.get("trajectory")))
        return [1.0] * len(completions)

    def named_only(prompts, completions, completion_ids):  # neither trajectory nor **kwargs: still callable
        return [0.0] * len(completions)

    batch = conversational_batch()
    CallableReward(fn).score(batch.prompts, batch.completions, **batch.reward_columns())
    payload = pickle.loads(pickle.dumps(reward_payload(batch, None)))  # what a Ray reward actor receives
    RewardWorker(fn).score(payload)
    assert CallableReward(named_only).score(batch.prompts, batch.completions, **batch.reward_columns()).scores == [0.0, 0.0]
    assert len(got) == 2 and got[0] == got[1]
    prompts, completions, trajectory = got[0]
    assert prompts == [[{"role": "user", "content": "what is 12*34?"}], "hi"]
    # TRL 1.x tool-calling GRPO: a conversational completion is the response's whole message list
    assert completions == [trajectory_of("<tool_call>...</tool_call>"), "hello"]
    assert trajectory == [trajectory_of("<tool_call>...</tool_call>"), None]


@pytest.mark.parametrize("train", [{"micro_batch_size": 3},  # two micro-batches: token-mean shares of policy tokens
                                   {"pack_sequences": True, "max_tokens_per_micro_batch": 40}])  # packed, by budget
def test_kl_and_entropy_metrics_are_means_over_policy_tokens(tiny_model_path, arithmetic_data, tmp_path, train):
    cfg = tiny_run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run", reward_with_trajectory,
                          rollout={"max_new_tokens": 8, "ignore_eos": True}, algo={"group_size": 2, "kl_coef": 0.05},
                          train={"prompts_per_step": 2, **train})
    trainer = align.Trainer(cfg)
    trainer.backend = ToolEpisodes(trainer.backend, -9.0)
    step, _ = trainer.phase_generate()
    trainer.phase_score(step)
    kl_metric = trainer.phase_logprobs(step)["kl/mean"]
    trainer.phase_advantages(step)
    b = step.batch
    with torch.no_grad():
        fwd = response_forward(trainer.models.policy, b.input_ids, b.attention_mask, b.response_ids.shape[1],
                               with_entropy=True)
    kl, ent = [], []
    for i in range(len(b)):
        for t in range(b.response_ids.shape[1]):
            if b.mask[i, t] and not b.tool_mask[i, t]:
                kl.append(float(b.logprobs[i, t]) - float(step.ref_logprobs[i, t]))  # one update: old = rollout's
                ent.append(float(fwd.entropy[i, t]))
    assert int(b.tool_mask.sum()) > 0 and len(kl) == int(b.mask.sum() - b.tool_mask.sum())
    assert kl_metric == pytest.approx(sum(kl) / len(kl), rel=1e-5, abs=1e-7)
    out = trainer.phase_update(step)
    assert out["policy/entropy"] == pytest.approx(sum(ent) / len(ent), rel=1e-4)
    trainer.backend.close()
