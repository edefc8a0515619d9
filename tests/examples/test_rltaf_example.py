"""examples/rltaf.py: the date task against Python's datetime and brute force, the statistics by hand, and the
whole pipeline (two RMs, SFT, three GRPO arms, PPO smoke) at toy size in seconds."""
from __future__ import annotations

import calendar
import json
import math
import random
from datetime import date, timedelta

import pytest
import rltaf_report as report
import rltaf_task as task
from rltaf import main


def test_questions_are_every_no_wrap_case_and_answers_match_datetime():
    qs = task.all_questions()
    # brute force count: for every month and start day, the N in 1..9 that stay in the month
    expected = sum(1 for y in task.YEARS for m in range(1, 13) for d in range(1, calendar.monthrange(y, m)[1] + 1)
                   for n in range(1, 10) if (date(y, m, d) + timedelta(days=n)).month == m)
    assert len(qs) == expected == len(set(qs))
    rng = random.Random(0)
    for q in rng.sample(qs, 500):
        y, m, d = (int(x) for x in q.text.split("after ")[1].rstrip("?").split("-"))
        n = int(q.text.split()[3])
        truth = date(y, m, d) + timedelta(days=n)
        assert q.answer == f"{truth.year:04d}-{truth.month:02d}-{truth.day:02d}"
        assert truth.month == m and truth.year == y and 1 <= n <= 9  # no month wrap
        assert task.parse_question(q.text) == q
    # Feb 29 only in leap years; the 31st never asks for a later day of the same month
    assert any(q.start == date(2024, 2, 20) and q.n == 9 for q in qs)
    assert not any(q.start == date(2023, 2, 20) and q.n == 9 for q in qs)
    assert not any(q.start.day == 31 for q in qs)
    assert task.parse_question("What date is 1 day after 2023-06-01?").answer == "2023-06-02"


def test_hard_negatives_are_one_to_three_days_off_in_the_same_month():
    rng = random.Random(1)
    seen = set()
    for q in task.all_questions()[::37]:
        neg = task.hard_negative(q, rng)
        right = date.fromisoformat(q.answer)
        wrong = date.fromisoformat(neg)
        assert 1 <= abs((wrong - right).days) <= 3 and wrong.month == right.month and wrong.year == right.year
        seen.add((wrong - right).days)
    assert seen == {-3, -2, -1, 1, 2, 3}


def test_splits_are_disjoint_and_fixed():
    a, b = task.split_questions(), task.split_questions()
    assert a == b
    sets = {k: set(v) for k, v in a.items()}
    assert [len(v) for v in a.values()] == [len(s) for s in sets.values()] == [600, 400, 3000, 3000, 2000]
    names = list(sets)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            assert not sets[x] & sets[y], (x, y)


def test_task_files_of_the_recipe(tmp_path):
    paths = task.write_task_files(tmp_path, rm_pairs=5, rm_test=3, sft_examples=4)
    rows = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert [len(rows[k]) for k in ("rm_train", "rm_test", "sft")] == [5, 3, 4]
    assert all(r["completion"] == task.parse_question(r["prompt"]).answer for r in rows["sft"])
    assert all(r["answer"] == task.parse_question(r["prompt"]).answer for r in rows["rl_prompts"] + rows["heldout"])
    assert not {r["prompt"] for r in rows["heldout"]} & {r["prompt"] for r in rows["rl_prompts"] + rows["sft"]}
    assert not {r["question"] for r in rows["rm_test"]} & {r["question"] for r in rows["rm_train"]}


def test_oracle_and_tara_record_use_the_real_tool():
    from align.rewards.tara import parse_item, render_item
    from align.tools import get_tool

    q = task.Question(date(2023, 6, 1), 5)
    assert task.exact_date([q.text] * 4, ["2023-06-06", " 2023-06-06\n", "2023-06-07", "6 June"]) == [1.0, 1.0, 0.0, 0.0]
    item = parse_item(task.tara_record(q, "2023-06-04", 0), "rltaf")
    step = item.pos.steps[0]
    tool = get_tool(step.action)(step.action_input, context={})
    assert tool.ok and tool.output == step.observation == "2023-06-06"
    text = render_item(item, "neg").text
    assert "Answer: 2023-06-04\n" in text and "Observation: 2023-06-06" in text and task.WRONG in text


def test_statistics_by_hand():
    assert task.win_tie_lose([True, True, False, False, True], [False, True, True, False, True]) == {"win": 1, "tie": 3, "lose": 1}
    # AUC by brute force over (right, wrong) pairs: right {3, 1}, wrong {2, 1}: 3>2, 3>1, 1<2, 1=1 -> 2.5 / 4
    assert report.ranking_accuracy([3, 2, 1, 1], [True, False, True, False]) == pytest.approx(2.5 / 4)
    assert report.ranking_accuracy([1, 2], [True, True]) is None
    iv = report.t_interval([0.3, 0.4, 0.5])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n); sd of (.3, .4, .5) is .1
    assert iv["mean"] == pytest.approx(0.4) and iv["low"] == pytest.approx(0.4 - half) and iv["high"] == pytest.approx(0.4 + half)
    assert iv["shown"] and not report.t_interval([0.1, 0.2, 0.3])["shown"]  # 0.2 - 0.248 < 0
    assert not report.t_interval([0.1, -0.1, 0.05])["shown"]


def test_pipeline_smoke(tmp_path):
    out = tmp_path / "run"
    # run 3's trace (two tool calls) and negative mix
    assert main(["--out", str(out), "--smoke", "--seeds", "0", "--no-tara", "--ppo-smoke-steps", "1", "--set",
                 "themis_trace=compare", "rm_far=0.1", "rm_malformed=0.2", "rm_test_mixed=4"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["heldout_questions"] == 8
    assert set(res["rms"]["themis"]["eval"]) == {"rm_test", "rm_test_mixed"} and res["rms"]["themis"]["eval"]["rm_test"]["n"] == 8
    assert json.loads((out / "rm-themis" / "themis.json").read_text())["max_rounds"] == 2  # both calls fit the budget
    tc = res["rms"]["themis"]["trace_checks"]
    assert {"right", "hard", "malformed"} <= set(tc) and "both_calls_share" in tc["hard"]
    mixed = [json.loads(line) for line in (out / "data" / "rm_test_mixed.jsonl").read_text().splitlines()]
    assert len(mixed) == 4 and not any(is_hard_negative(r["neg_answer"]["answer"], r["pos_answer"]["answer"]) for r in mixed)
    assert 0 <= run_sft_expected(res) <= 1
    run = res["runs"][0]
    for arm in ("themis", "plain", "oracle"):
        assert len(run[arm]["correct"]) == 8 and [c["step"] for c in run[arm]["curve"]] == [1]
    # the weight-0 oracle logged beside the RM is the truth of the same samples: recompute it from the log
    rows = [json.loads(line) for line in (out / "seed0" / "grpo-themis" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # 2 prompts x group of 2, every sample logged
    truth = [task.is_correct(r["prompt"], r["completion"]) for r in rows]
    assert run["themis"]["curve"][0]["true_accuracy"] == pytest.approx(sum(truth) / 4)
    assert all(r["rewards"]["rltaf_task:exact_date"] == float(t) for r, t in zip(rows, truth))
    assert all(set(r["rewards"]) == {"themis", "rltaf_task:exact_date"} and isinstance(r["trace"], str) for r in rows)
    # the RM arms log the raw RM score next to the truth; the oracle arm has no RM
    assert "rm_mean" in run["plain"]["curve"][0] and "rm_mean" not in run["oracle"]["curve"][0]
    assert res["ppo_smoke"]["steps"] == 1 and "win_tie_lose_pooled" in res["summary"]
    assert "themis vs plain win/tie/lose" in (out / "table.md").read_text()
    # copy pre-training ran once on the RM base both RMs start from, and on the seed's policy base
    assert res["rms"]["copy_pretrain"]["steps"] == 2 == res["params"]["rm_copy_steps"]
    assert json.loads((out / "rm-base" / "copy_pretrain.json").read_text()) == res["rms"]["copy_pretrain"]
    assert run["policy_copy_pretrain"]["steps"] == 2
    # the copy rows span the character tokenizer's ordinary tokens and no special one: 10 digits, 52 letters,
    # 32 punctuation marks, space and newline
    assert res["rms"]["copy_pretrain"]["vocab_size"] == 10 + 52 + 32 + 2


def is_hard_negative(neg, pos):
    """A date 'YYYY-MM-DD' of the same month 1-3 days off (the mixed held-out pairs have none)."""
    import re

    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", neg):
        return False
    try:
        d = date.fromisoformat(neg)
    except ValueError:
        return False
    p = date.fromisoformat(pos)
    return (d.year, d.month) == (p.year, p.month) and 1 <= abs((d - p).days) <= 3


def run_sft_expected(res):
    return res["runs"][0]["sft"]["expected"]


def test_call_shares_read_the_trace_records_of_the_rollout_engine():
    # records as align.rewards.themis_traces writes them: action, input, ok, observation, error (no "output":
    # reading that key raised KeyError once a Themis RM made accepted calls)
    from rltaf_rms import call_shares

    qs = [task.Question(date(2017, 10, 8), 9), task.Question(date(2013, 9, 28), 2), task.Question(date(2007, 5, 6), 1),
          task.Question(date(2010, 1, 26), 4)]

    def rec(action, inp, ok, obs):
        return {"tool_calls": [{"action": action, "input": inp, "ok": ok, "observation": obs, "error": None}]}

    infos = [rec("Calendar.target_day", "2017-10-08, 9", True, "2017-10-17"),   # right call
             rec("Calendar.target_day", "2013-09-29, 2", True, "2013-10-01"),   # accepted, wrong day copied
             rec("Calendar.day_day", "2007-05-06, 1", False, "Error: unknown tool"),
             {"tool_calls": []}]                                                   # no call
    assert call_shares(qs, infos) == {"n": 4, "tool_accepts_share": 2 / 4, "valid_call_share": 1 / 4}


def test_worked_rationale_marks_each_day_digit_and_keeps_the_verdict():
    rng = random.Random(4)
    for q in task.all_questions()[::211]:
        neg = task.hard_negative(q, rng)
        rec = task.tara_record(q, neg, 0, worked=True)
        right_day, wrong_day = date.fromisoformat(q.answer).day, date.fromisoformat(neg).day
        marks = ("=" if right_day // 10 == wrong_day // 10 else "x") + ("=" if right_day % 10 == wrong_day % 10 else "x")
        assert marks != "=="  # a hard negative differs from the right date in at least one day digit
        assert rec["neg_answer"]["score_agent"]["explanation"] == (
            f"Answer: {neg}. Observation: {q.answer}. Days {wrong_day:02d} {right_day:02d}: {marks}. {task.WRONG}")
        assert rec["pos_answer"]["score_agent"]["explanation"] == (
            f"Answer: {q.answer}. Observation: {q.answer}. Days {right_day:02d} {right_day:02d}: ==. {task.RIGHT}")
        assert task.tara_record(q, neg, 0)["neg_answer"]["score_agent"]["explanation"] == task.WRONG  # default unchanged
    # an answer too short to hold a day is padded, never read past its end
    assert task.worked_comparison("2017-10-1", "2017-10-17") == "Answer: 2017-10-1. Observation: 2017-10-17. Days 1? 17: =x. "


def test_the_later_form_asks_the_same_questions_with_the_first_call_input_as_a_span():
    after, later = task.split_questions(), task.split_questions(form="later")
    assert {k: [(q.start, q.n) for q in v] for k, v in after.items()} == {k: [(q.start, q.n) for q in v] for k, v in later.items()}
    for q in later["heldout"][:200]:
        y, m, d = (int(x) for x in q.text.split()[3].rstrip(",").split("-"))
        n = int(q.text.split()[4])
        assert q.text == f"What date is {date(y, m, d).isoformat()}, {n} day{'s' if n > 1 else ''} later?"
        assert (date(y, m, d), n) == (q.start, q.n) and q.answer == (date(y, m, d) + timedelta(days=n)).isoformat()
        assert f"{q.start.isoformat()}, {q.n}" in q.text  # the Calendar.target_day input, verbatim
        assert task.parse_question(q.text) == q and task.parse_question(q.text).form == "later"
        assert task.is_correct(q.text, q.answer) and not task.is_correct(q.text, task.hard_negative(q, random.Random(0)))
    assert task.parse_question("What date is 2023-06-01, 1 day later?").answer == "2023-06-02"
    assert task.parse_question("What date is 2023-02-30, 1 day later?") is None  # no such date
    with pytest.raises(ValueError, match="question form"):
        task.split_questions(form="before")


def test_pipeline_smoke_later_form_without_rationale_and_job_records(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--smoke", "--seeds", "0", "--no-tara", "--ppo-smoke-steps", "0", "--set",
            "themis_trace=compare", "question_form=later", "themis_omega=0", "rl_scale=batch"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert json.loads((out / "rm-themis" / "themis.json").read_text())["rationale"] is False
    first = json.loads((out / "data" / "rm_train.jsonl").read_text().splitlines()[0])
    assert task.parse_question(first["question"]).form == "later"
    rows = [json.loads(line) for line in (out / "seed0" / "grpo-themis" / "completions.jsonl").read_text().splitlines()]
    assert all(task.parse_question(r["prompt"]).form == "later" for r in rows)
    assert all("<start_work>" not in r["trace"] for r in rows)  # scored after the last observation
    from rltaf import rl_config

    config = rl_config("grpo", "themis", out, out, out, 0, 1, out, res["params"])
    assert res["params"]["rl_scale"] == config["algo"]["scale"] == "batch"
    # a second run with the same settings reads every job back instead of running it again
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[jobs] seed0-themis: read back from" in printed and ": done (" not in printed
    assert json.loads((out / "results.json").read_text())["runs"] == res["runs"]
    # a changed RL setting reruns the arms only: the RMs and the SFT model are read back
    capsys.readouterr()
    assert main(args + ["kl_coef=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "[jobs] rm-themis-train: read back" in printed and "[jobs] seed0-sft: read back" in printed
    assert "[jobs] seed0-themis: done (" in printed
    again = json.loads((out / "results.json").read_text())
    assert "rm-themis-train" in again["read_back"] and "seed0-themis" not in again["read_back"]
    assert f"{len(again['read_back'])} jobs read back" in (out / "table.md").read_text()


def test_pipeline_on_two_worker_processes_measures_what_one_process_does(tmp_path):
    """The job graph on two spawned workers (how the timed run uses both cores) is the same experiment as the
    in-process run: every held-out judgement, RM accuracy and per-step curve equal; only the timings differ."""
    args = ["--smoke", "--seeds", "0", "--no-tara", "--ppo-smoke-steps", "0", "--set", "themis_trace=compare",
            "question_form=later", "themis_omega=0", "rl_scale=batch"]
    assert main(["--out", str(tmp_path / "one"), *args]) == 0
    assert main(["--out", str(tmp_path / "two"), "--workers", "2", *args]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["workers"] == 2 and two["graph"]["workers"] == 2  # both workers ran jobs
    for kind in ("plain", "themis"):
        assert one["rms"][kind]["eval"] == two["rms"][kind]["eval"]
        assert one["rms"][kind]["train"]["train/final_loss"] == two["rms"][kind]["train"]["train/final_loss"]
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert a["sft"] == b["sft"]
        for arm in ("themis", "plain", "oracle"):
            assert (a[arm]["correct"], a[arm]["expected"], a[arm]["curve"]) == (b[arm]["correct"], b[arm]["expected"], b[arm]["curve"])
    assert one["summary"] == two["summary"]
    # the graph's CPU is the sum of its jobs'; this run's own CPU (main + workers) covers it
    assert two["graph"]["cpu_s"] == pytest.approx(sum(j["cpu_s"] for j in two["jobs"].values()))
    assert two["cpu_s"] >= 0.9 * two["graph"]["cpu_s"]


def test_the_rms_train_data_parallel_under_torchrun_in_a_two_slot_job(tmp_path):
    """rm_ranks=2: each RM is trained by `torchrun -m align.cli train-rm` on two ranks (the user's command), as a
    job holding both workers; each rank forwarded half of the pairs, and the job's CPU counts both ranks."""
    out = tmp_path / "run"
    assert main(["--out", str(out), "--smoke", "--rm-only", "--no-tara", "--workers", "2", "--set", "rm_ranks=2"]) == 0
    rms = json.loads((out / "rms.json").read_text())
    for kind in ("plain", "themis"):
        train = rms[kind]["train"]
        assert train["train/ranks"] == 2 and train["train/rank_pairs"] == [4, 4]  # 2 steps x 4 pairs, split
        assert rms[kind]["train_cpu_s"] > rms[kind]["train_wall_s"]  # two processes worked at once
        assert 0.0 <= rms[kind]["eval"]["rm_test"]["accuracy"] <= 1.0
    jobs = rms["jobs"]
    for other in ("rm-plain-train", "rm-plain-eval", "rm-themis-eval"):  # nothing ran beside the wide Themis job
        o, t = jobs[other], jobs["rm-themis-train"]
        assert o["end"] <= t["start"] or o["start"] >= t["end"]


def test_the_job_graph_puts_the_themis_arms_ahead_of_the_other_arms(tmp_path):
    """Priority order (the workers take ready jobs first to last): the RM base and the Themis RM first, the
    Themis arms (the longest jobs) ahead of every plain and oracle arm, the Themis RM's measurement after
    every arm; the plain RM (it may hold every worker) ahead of the arms. Run 7 ran its Themis arms after
    the ten plain and oracle arms, about a minute later than it could have."""
    from rltaf import DEFAULTS, pipeline_jobs

    p = {**DEFAULTS, "rm_ranks": 2}
    data = {"train_sources": [], "eval_sources": []}
    names = [j.name for j in pipeline_jobs(tmp_path, [0, 1, 2], p, data, False, 3, False)]
    pos = {n: i for i, n in enumerate(names)}
    assert names[:2] == ["rm-base", "rm-themis-train"]
    themis_arms = [pos[f"seed{s}-themis"] for s in (0, 1, 2)]
    others = [pos[f"seed{s}-{a}"] for s in (0, 1, 2) for a in ("plain", "oracle")]
    assert max(themis_arms) < min(others)
    assert pos["rm-plain-train"] < min(themis_arms)
    assert pos["rm-themis-eval"] > max(themis_arms + others)
