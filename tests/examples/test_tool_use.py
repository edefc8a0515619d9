"""examples/tool_use.py: the calculator reaches the policy's episodes, the rewards read the trajectory, and the
script writes the report it documents (tiny settings; the measured run is in docs/tool_use.md)."""
from __future__ import annotations

import json
import math
import re

import pytest
import tool_use  # examples/ (tests/conftest.py puts it on sys.path)
import tool_use_task as T
import torch

from align.rollouts.tool_formats import TINY_TOOL_CHAT_TEMPLATE, HermesFormat


@pytest.fixture
def one_thread():
    # tiny matrices: a second torch thread only adds contention (53 s instead of 3 s for the SFT on a busy
    # 2-core machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EXPR = re.compile(r"\d+(?:\*\d+)+")  # a product of integers: its value is computed here


def test_demo_tokens_match_the_chat_template():
    tok = T.build_tokenizer()
    segments = T.tool_demo(tok, HermesFormat(tok, TINY_TOOL_CHAT_TEMPLATE), 123, 456)
    assert [trained for _, trained in segments] == [False, True, False, True]  # the observation carries no loss
    ids = sum((s for s, _ in segments), [])
    text = tok.decode(ids, skip_special_tokens=False)
    messages = [{"role": "user", "content": "123*456"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "calculator", "arguments": {"input": "123*456"}}}]},
                {"role": "tool", "name": "calculator", "content": "56088"},
                {"role": "assistant", "content": "56088"}]
    # the template ends the last turn with "</s>\n"; the demonstration stops at the end-of-turn token
    assert text + "\n" == tok.apply_chat_template(messages, tokenize=False)
    assert len(segments[1][0]) == 15  # the call: 5 word tokens, 7 characters, 2 word tokens, tag, EOS


def test_rewards_read_the_final_turn():
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"input": "12*3"}}}
    used = [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "content": "36"}, {"role": "assistant", "content": "36"}]
    failed = [{"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "tool", "name": "calculator", "content": "The tool failed: bad input"},
              {"role": "assistant", "content": "36"}]
    unanswered = used[:2]  # stopped after the observation (max_turns): no final answer
    exact = T.ExactProduct()(["p"] * 4, ["x", "x", "x", " 36 "], answer=["36"] * 4,
                             trajectory=[used, failed, unanswered, None])
    assert exact == [1.0, 1.0, 0.0, 1.0]  # the last row: no tool episode, the completion is the answer
    assert T.ValidCall()(["p"] * 3, ["x"] * 3, trajectory=[used, failed, unanswered]) == [1.0, 0.0, 1.0]


def test_tool_episodes_hold_the_real_calculators_results(tmp_path, one_thread):
    """A briefly warm-started policy calls the calculator on held-out products; every observation is the product
    of the expression the policy wrote (computed here with Python integers), which the policy cannot compute."""
    torch.manual_seed(0)
    tok = T.build_tokenizer()
    train, held = T.split_items(400, 12)
    base = T.build_base(tmp_path / "base", seed=0)
    fmt = HermesFormat(tok, TINY_TOOL_CHAT_TEMPLATE)
    T.sft(base, tmp_path / "sft", [T.tool_demo(tok, fmt, a, b) for a, b in train], 30, 32, 3e-3, 0)
    out = T.evaluate(tmp_path / "sft", held, tools=True)
    checked = 0
    for traj in out["trajectories"]:
        calls = [c["function"] for m in traj for c in m.get("tool_calls") or []]
        observations = [m["content"] for m in traj if m["role"] == "tool"]
        assert len(calls) == len(observations)
        for fn, obs in zip(calls, observations):
            m = EXPR.fullmatch(fn["arguments"].get("input", "")) if fn["name"] == "calculator" else None
            if m:
                assert obs == str(math.prod(int(x) for x in m.group(0).split("*")))
                checked += 1
    assert checked >= len(held) // 2, out["examples"]
    b = out["batch"]
    # observation tokens are marked, and they are not sampled: log-prob 0 there
    assert bool(b.tool_mask.any()) and float(b.logprobs[b.tool_mask].abs().max()) == 0.0


def test_the_script_writes_its_report(tmp_path, one_thread):
    report = tmp_path / "report"
    args = ["--seeds", "0", "1", "--out", str(tmp_path / "runs"), "--report", str(report), "--steps", "2",
            "--prompts-per-step", "2", "--group-size", "2", "--pretrain-steps", "2", "--max-sft-steps", "8",
            "--check-prompts", "4", "--n-train", "40", "--n-eval", "6", "--print-every", "0"]
    assert tool_use.main(args) == 0
    data = json.loads(report.with_suffix(".json").read_text())
    assert report.with_suffix(".png").stat().st_size > 0
    assert len(data["runs"]) == 2 and {"wall_s", "cpu_s", "children_cpu_s"} <= set(data["timing"])
    for run in data["runs"]:
        tools, direct = run["arms"]["tools"], run["arms"]["no_tool"]
        # the same SFT budget: steps and examples; the tools arm stopped below half valid calls
        assert tools["sft"]["steps"] == direct["sft"]["steps"] and tools["sft"]["examples"] == direct["sft"]["examples"]
        assert tools["sft"]["valid_call_share_at_stop"] < 0.5
        assert [c["step"] for c in tools["sft"]["checks"]][:2] == [0, data["config"]["check_every"]]
        assert len(tools["curves"]["accuracy"]) == len(tools["curves"]["valid_call"]) == 2
        assert len(direct["curves"]["accuracy"]) == 2 and "valid_call" not in direct["curves"]
        for arm in (tools, direct):
            assert {"accuracy", "valid_call", "right_call"} == set(arm["heldout_final"])
    s = data["summary"]
    diffs = [a - b for a, b in zip(s["accuracy"]["tools"], s["accuracy"]["no_tool"])]
    assert s["diff"]["per_seed"] == diffs and abs(s["diff"]["mean"] - sum(diffs) / 2) < 1e-12
    lo, hi = s["diff"]["ci95"]
    # n = 2: half-width = t(0.975, 1) * |d1 - d2| / sqrt(2) / sqrt(2), t(0.975, 1) = 12.706
    half = 12.7062 * abs(diffs[0] - diffs[1]) / 2
    assert abs((hi - lo) / 2 - half) < 1e-3 and s["diff"]["shown"] == (lo > 0)


def _seed_report(seed: int, tools_acc: float, valid: list[float], lr: float = 3e-4) -> dict:
    arm = {"sft": {"steps": 4, "examples": 128, "loss": 1.0, "valid_call_share_at_stop": 0.4},
           "heldout_sft": {"accuracy": 0.0}, "heldout_final": {"accuracy": tools_acc},
           "curves": {"accuracy": [0.0, tools_acc], "valid_call": valid}}
    none = {"sft": {"steps": 4, "examples": 128, "loss": 1.0}, "heldout_sft": {"accuracy": 0.0},
            "heldout_final": {"accuracy": 0.0}, "curves": {"accuracy": [0.0, 0.0]}}
    return {"command": f"python examples/tool_use.py --seeds {seed}", "config": {"seeds": [seed], "lr": lr},
            "runs": [{"seed": seed, "arms": {"tools": arm, "no_tool": none}}],
            "machine": {"load_average_end": [1.0, 1.0, 1.0]}, "timing": {"wall_s": 10.0 + seed, "cpu_s": 5.0,
                                                                          "children_cpu_s": 0.0}}


def test_combine_merges_seeds_run_as_separate_processes(tmp_path):
    accs = {2: 0.8, 0: 0.5, 1: 0.6}  # written out of seed order
    paths = []
    for seed, acc in accs.items():
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(_seed_report(seed, acc, [0.2, 0.9])))
    assert tool_use.main(["--combine", *map(str, paths), "--report", str(tmp_path / "all")]) == 0
    rep = json.loads((tmp_path / "all.json").read_text())
    assert [r["seed"] for r in rep["runs"]] == [0, 1, 2]
    d = [0.5, 0.6, 0.8]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2 df}
    assert rep["summary"]["diff"]["per_seed"] == pytest.approx(d)
    assert rep["summary"]["diff"]["ci95"] == pytest.approx([mean - half, mean + half])
    assert rep["timing"]["cpu_s"] == 15.0 and rep["timing"]["wall_s"] == 12.0
    assert (tmp_path / "all.md").is_file() and (tmp_path / "all.png").is_file()
    paths[0].write_text(json.dumps(_seed_report(2, 0.8, [0.2, 0.9], lr=1e-3)))
    with pytest.raises(SystemExit, match="different settings"):
        tool_use.main(["--combine", *map(str, paths), "--report", str(tmp_path / "bad")])
