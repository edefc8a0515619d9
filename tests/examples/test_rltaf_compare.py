"""The "compare" Themis trace of examples/rltaf_task.py (run 3): its two tool calls checked against Python's
datetime, the malformed and far negatives, and the record read back by align's TARA reader and trace loop."""
from __future__ import annotations

import calendar
import random
import re
from datetime import date, timedelta

import rltaf_task as task
from rltaf_rms import call_shares, themis_rounds, themis_trace

FAILED = "Error: the tool 'Calendar.day_difference' failed: "


def reference_date(text: str) -> date | None:
    """What a reader of 'YYYY-M-D' (one or two digit month and day, surrounding quotes dropped, as the calendar
    tools document) gets, or None: written here with datetime, independently of align.tools."""
    m = re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})", text.strip("'\""))
    if not m:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def test_compare_steps_against_datetime():
    rng = random.Random(0)
    for q in rng.sample(task.all_questions(), 300):
        right = q.start + timedelta(days=q.n)
        for answer, days in [(right.isoformat(), 0), (task.hard_negative(q, rng), None)]:
            first, second = task.compare_steps(q, answer)
            assert (first["Action"], first["Action Input"]) == ("Calendar.target_day", f"{q.start:%Y-%m-%d}, {q.n}")
            assert first["Observation"] == f"{right.year:04d}-{right.month:02d}-{right.day:02d}"
            assert (second["Action"], second["Action Input"]) == ("Calendar.day_difference", f"{answer}, {first['Observation']}")
            diff = abs((date.fromisoformat(answer) - right).days)
            assert second["Observation"] == str(diff)
            assert (diff == 0) == (days == 0) and (days == 0 or 1 <= diff <= 3)  # '0' exactly for the right answer


def test_malformed_negatives_are_never_the_right_date_and_fail_or_differ():
    rng = random.Random(1)
    seen = {"failed": 0, "invalid": 0, "parsed": 0}
    for q in task.all_questions()[::97]:
        s = task.malformed_negative(q, rng)
        right = date.fromisoformat(q.answer)
        assert s != q.answer and not any(c.isspace() or c == '"' for c in s)
        obs = task.compare_observation(s, q.answer)
        ref = reference_date(s)
        if ref is None:  # no date in the tool's reading: the call fails, and the trace shows why
            assert obs.startswith(FAILED), (s, obs)
            seen["invalid" if "invalid date" in obs else "failed"] += 1
        else:  # a date (e.g. '2028-11-1', truncated), never the right one
            assert ref != right and obs == str(abs((ref - right).days)), (s, obs)
            seen["parsed"] += 1
    assert all(v >= 10 for v in seen.values()), seen  # every kind occurs (about 850 draws)


def test_far_negatives_and_the_mix():
    rng = random.Random(2)
    same = 0
    qs = task.all_questions()[::503]
    for q in qs:
        right, wrong = date.fromisoformat(q.answer), date.fromisoformat(task.far_negative(q, rng))
        if (wrong.year, wrong.month) == (right.year, right.month):
            same += 1
            assert abs((wrong - right).days) > 3
        else:
            assert 20 <= abs((wrong - right).days) <= 400
    assert abs(same / len(qs) - 0.5) < 0.15, same / len(qs)  # 164 draws, about half in the same month
    qs = task.all_questions()[::41]
    # no far or malformed share: exactly hard_negative's draws (run 1's and run 2's pairs unchanged)
    a, b = random.Random(3), random.Random(3)
    assert [task.negative(q, a) for q in qs] == [task.hard_negative(q, b) for q in qs]
    rng = random.Random(4)
    kinds = [task.negative(q, rng, far=0.2, malformed=0.3) for q in qs]
    hard = sum(reference_date(s) is not None and abs((reference_date(s) - date.fromisoformat(q.answer)).days) <= 3
               and s[:8] == q.answer[:8] and len(s) == 10 for s, q in zip(kinds, qs))
    assert abs(hard / len(qs) - 0.5) < 0.06, hard / len(qs)  # 2,010 draws: 0.5 +- 3.5 standard errors


def test_trace_observations_are_what_the_trace_loop_shows():
    # the training records' observations must be the exact text Themis' trace loop writes after a call
    from align.rewards.themis_traces import ThemisToolEnvironment
    from align.rollouts.tool_formats import ParsedCall

    env = ThemisToolEnvironment()
    q = task.Question(date(2017, 10, 8), 9)
    for answer in ("2017-10-17", "2017-10-14", "2017-10-1", "2027-0@07", "2017-09-31", "2017-10-17z", "2017-10,17"):
        for step in task.compare_steps(q, answer):
            shown = env.step(env.reset({"question": q.text, "answer": answer}),
                             ParsedCall(step["Action"], {"input": step["Action Input"]}), [])
            assert str(shown) == step["Observation"], (answer, shown)
    assert task.compare_steps(q, "2017-10-1")[1]["Observation"] == "16"
    assert task.compare_steps(q, "2017-09-31")[1]["Observation"].startswith(FAILED + "invalid date")


def test_compare_record_reads_back_as_a_two_step_tara_trace():
    from align.rewards.tara import parse_item, render_item

    q = task.Question(date(2008, 6, 9), 6)
    item = parse_item(task.tara_record(q, "2008-06-16", 0, trace="compare"), "rltaf")
    for side, answer, obs, verdict in (("pos", "2008-06-15", "0", task.RIGHT), ("neg", "2008-06-16", "1", task.WRONG)):
        steps = (item.pos if side == "pos" else item.neg).steps
        assert [(s.action, s.action_input, s.observation) for s in steps] == [
            ("Calendar.target_day", "2008-06-09, 6", "2008-06-15"),
            ("Calendar.day_difference", f"{answer}, 2008-06-15", obs)]
        text = render_item(item, side).text
        assert text.endswith(f"Action Input: {answer}, 2008-06-15\n<start_observation> Observation: {obs}\n"
                             f"<start_work> Work: {verdict}")
        assert text.count("<start_tool>") == 2 and f"Answer: {answer}\n" in text
    # a malformed answer: the failure text is the second observation
    item = parse_item(task.tara_record(q, "2008-0@15", 1, trace="compare"), "rltaf")
    assert item.neg.steps[1].observation.startswith(FAILED)
    # the old traces stay reachable: one call
    assert len(parse_item(task.tara_record(q, "2008-06-16", 2, trace="released"), "rltaf").neg.steps) == 1
    assert task.tara_record(q, "2008-06-16", 2, worked=True) == task.tara_record(q, "2008-06-16", 2, trace="worked")


def test_trace_flag_and_rounds():
    assert themis_trace({"themis_worked": 1, "themis_trace": "compare"}) == "worked"  # run 2's flag
    assert themis_rounds({"themis_worked": 0, "themis_trace": "compare"}) == 2
    assert themis_rounds({"themis_worked": 0, "themis_trace": "released"}) == 1


def test_call_shares_of_two_call_traces():
    q = task.Question(date(2017, 10, 8), 9)

    def rec(second_input, second_obs, rationale):
        return {"rationale": rationale, "tool_calls": [
            {"action": "Calendar.target_day", "input": "2017-10-08, 9", "ok": True, "observation": "2017-10-17", "error": None},
            {"action": "Calendar.day_difference", "input": second_input, "ok": True, "observation": second_obs, "error": None}]}

    infos = [rec("2017-10-17, 2017-10-17", "0", task.RIGHT),     # right answer, both calls right
             rec("2017-10-17, 2017-10-17", "0", task.RIGHT),     # wrong answer 2017-10-14 copied as the right date
             rec("2017-10-14, 2017-10-17", "3", task.WRONG)]     # wrong answer, both right
    got = call_shares([q] * 3, infos, ["2017-10-17", "2017-10-14", "2017-10-14"], compare=True)
    assert got == {"n": 3, "tool_accepts_share": 1.0, "valid_call_share": 1.0, "verdict_share": 2 / 3,
                   "second_call_share": 2 / 3, "both_calls_share": 2 / 3}
    assert calendar.monthrange(2017, 10)[1] == 31  # the questions above stay inside the month
