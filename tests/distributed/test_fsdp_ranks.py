"""2 FSDP2 ranks (torchrun, gloo, CPU) take the step one process takes; a dead or stalled rank ends the run.

The reference is a separately run one-process Trainer (in this pytest process); the 2-rank run is a torchrun
subprocess whose rank 0 saves its history and the gathered full weights. Tolerances: the math is exact (global
denominators, global minibatch order, summed gradients); what remains is float32 rounding from different padded
widths and summation orders (~1e-7 relative), which AdamW's normalised steps carry into the weights.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.testing import tiny_run_config

HERE = Path(__file__).parent
REPO = HERE.parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
sys.path.insert(0, str(HERE))  # the runs' rewards are `dist_worker:NAME`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict[str, str]:
    # a PYTHONPATH already set (e.g. a pre-change checkout) comes before this checkout
    path = [str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), str(REPO)]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}


def run_config(algorithm, model, data, run_dir, **extra):
    """algorithm: grpo | ppo | grpo-lora (LoRA with the adapter-off reference, and gradient checkpointing)."""
    if algorithm == "grpo-lora":
        extra = {"model": {"lora": {"enabled": True, "r": 4}, "gradient_checkpointing": True}, **extra}
        algorithm = "grpo"
    train = {"steps": 3, "prompts_per_step": 4, "lr": 1e-3, "micro_batch_size": 2, "device": "cpu",
             "max_grad_norm": 0.5}  # clipping is active: the global norm and the clip factor are checked too
    algo = {"group_size": 4, "kl_coef": 0.05} if algorithm == "grpo" else {"epochs": 2, "kl_coef": 0.05}
    if algorithm == "ppo":
        train["mini_batch_size"] = 2  # 2 of 4 rows: some minibatches lie on one rank, the other runs zero-weight passes
    else:
        train["mini_batch_size"] = 8
    cfg = tiny_run_config(algorithm, model, data, run_dir, {"name": "dist_worker:frac7"},
                          {"rollout": {"max_new_tokens": 6}, "train": train, "algo": algo,
                           "distributed": {"timeout_s": 60}})
    for section, values in extra.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def one_process(cfg) -> dict:
    from dist_worker import build_trainer

    from align.distributed.fsdp import full_state_dict

    trainer = build_trainer(cfg)
    try:
        history = trainer.train().history
    finally:
        trainer.close()
    weights = {"policy": full_state_dict(trainer.models.policy)}
    if trainer.models.value_head is not None:
        weights["value_head"] = full_state_dict(trainer.models.value_head)
    return {"history": history, "weights": weights}


def two_ranks(cfgs: list[dict], tmp_path: Path, timeout_s: float = 240) -> list[dict]:
    """Each config run by 2 torchrun ranks, one after another in the same processes (one start-up)."""
    args = []
    for i, cfg in enumerate(cfgs):
        path = tmp_path / f"cfg{i}.json"
        path.write_text(json.dumps(cfg))
        args += [str(path), str(tmp_path / f"out{i}.pt")]
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(HERE / "dist_worker.py"), *args]
    proc = subprocess.run(cmd, env=rank_env(), capture_output=True, text=True, timeout=timeout_s, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [torch.load(tmp_path / f"out{i}.pt", weights_only=True) for i in range(len(cfgs))]
    assert all(r["world"] == 2 for r in results)
    return results


def close(a: float, b: float, rel: float = 1e-5, floor: float = 1e-7) -> bool:
    # relative 1e-5, plus an absolute 1e-7 for values that are ~0 by construction (GRPO's policy loss over
    # group-centred advantages is a sum of cancelling terms, ~1e-4, whose float32 rounding is ~1e-8)
    return abs(a - b) <= rel * abs(b) + floor


KEYS = {"grpo-lora": ["reward/mean", "loss/policy", "loss/kl", "train/grad_norm", "rollout/tokens", "kl/mean"],
        "grpo": ["reward/mean", "reward/std", "loss/policy", "loss/kl", "train/grad_norm", "rollout/tokens", "kl/mean"],
        "ppo": ["reward/mean", "loss/policy", "loss/value", "train/grad_norm", "kl/mean", "rollout/tokens"]}


@pytest.mark.timeout(420)
def test_two_ranks_take_the_one_process_steps(tiny_model_path, arithmetic_data, tmp_path):
    """3 GRPO steps (reference copy sharded, KL in the loss), 3 PPO steps (value head, 2 epochs of 2-row
    minibatches), 3 GRPO steps with LoRA and gradient checkpointing: per-step reward, loss and grad norm within 1e-5 relative, final weights within 1e-5."""
    prompts = arithmetic_data["prompts"]
    algorithms = ("grpo", "ppo", "grpo-lora")
    refs = [one_process(run_config(a, tiny_model_path, prompts, tmp_path / f"{a}-1")) for a in algorithms]
    (tmp_path / "two").mkdir()
    gots = two_ranks([run_config(a, tiny_model_path, prompts, tmp_path / f"{a}-2") for a in algorithms], tmp_path / "two")
    for algorithm, ref, got in zip(algorithms, refs, gots):
        assert len(ref["history"]) == len(got["history"]) == 3
        for step, (r, g) in enumerate(zip(ref["history"], got["history"]), start=1):
            for key in KEYS[algorithm]:
                assert close(g[key], r[key]), (algorithm, step, key, g[key], r[key])
            assert g["train/samples"] == r["train/samples"]  # a count: summed over ranks, exactly
        # the output embedding is sharded too: rank 0 holds ceil(V / 2) of its V rows (FSDP2 splits dim 0)
        assert got["head"]["dtensor"], got["head"]
        assert got["head"]["local_rows"] == -(-got["head"]["rows"] // 2) < got["head"]["rows"], got["head"]
        assert got["weights"].keys() == ref["weights"].keys()
        for part, want in ref["weights"].items():
            have = got["weights"][part]
            assert have.keys() == want.keys()
            worst = max(float((have[k].float() - want[k].float()).abs().max()) for k in want)
            assert worst <= 1e-5, (algorithm, part, worst)
        # rank 0 alone wrote the run's files, with the global step metrics
        lines = [json.loads(x) for x in (tmp_path / f"{algorithm}-2" / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2, 3]
        assert close(lines[-1]["reward/mean"], ref["history"][-1]["reward/mean"])


@pytest.mark.slow  # ~40 s; the token-count reduction it caught is also pinned by test_rank_math (default suite)
@pytest.mark.timeout(300)
def test_two_ranks_train_tool_episodes_as_one_process(tiny_model_path, arithmetic_data, tmp_path):
    """Tool episodes (observation tokens inside the responses, junk rollout log-probs there) at world 2: the
    global policy-token denominators, PPO's GAE across the observation holes and the KL over policy tokens give
    the one-process steps (GRPO and PPO, 2 steps each)."""
    prompts = arithmetic_data["prompts"]

    def spec(algorithm, run_dir):
        cfg = run_config(algorithm, tiny_model_path, prompts, run_dir, train={"steps": 2})
        return {"config": cfg, "backend": "tool_episodes"}

    algorithms = ("grpo", "ppo")
    refs = [one_process(spec(a, tmp_path / f"{a}-1")) for a in algorithms]
    (tmp_path / "two").mkdir()
    gots = two_ranks([spec(a, tmp_path / f"{a}-2") for a in algorithms], tmp_path / "two")
    for algorithm, ref, got in zip(algorithms, refs, gots):
        for step, (r, g) in enumerate(zip(ref["history"], got["history"]), start=1):
            assert r["rollout/tool_tokens"] > 0 and r["rollout/policy_tokens"] > 0, r  # both kinds are present
            for key in [*KEYS[algorithm], "rollout/policy_tokens", "rollout/tool_tokens"]:
                assert close(g[key], r[key]), (algorithm, step, key, g[key], r[key])
        for part, want in ref["weights"].items():
            worst = max(float((got["weights"][part][k].float() - want[k].float()).abs().max()) for k in want)
            assert worst <= 1e-5, (algorithm, part, worst)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["die", pytest.param("stall", marks=pytest.mark.slow)])
def test_a_failed_rank_ends_the_run_with_one_line(how, tiny_model_path, arithmetic_data, tmp_path):
    """Two plain processes with RANK / WORLD_SIZE set (what Ray trainer actors do: no torchrun agent to kill the
    survivor), `python -m align.cli train`; rank 1 dies (os._exit) or stalls (sleeps) while scoring step 2.
    Rank 0 must exit non-zero within distributed.timeout_s with one error line, never hang."""
    timeout_s = 10
    cfg = run_config("grpo", tiny_model_path, arithmetic_data["prompts"], tmp_path / "run",
                     reward={"functions": [{"name": f"dist_worker:{how}_rank1_call2"}]},
                     distributed={"timeout_s": timeout_s})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**rank_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "align.cli", "train", str(path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    try:
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=90)  # start-up + 1 step + the timeout, with room for a loaded machine
        waited = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if how == "die":
        assert procs[1].returncode == 17
    assert procs[0].returncode == 1, err[-3000:]
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("align train: error: rank 0/2: a collective failed"), lines[-3:]
    assert "distributed.timeout_s" in lines[-1]
    assert waited < 90
