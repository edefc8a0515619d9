"""examples/themis_tara_check.py: the check call appended to each side of a calendar pair is what the real
tools return for that side's answer, and the record reads back as TARA data with both steps."""
from __future__ import annotations

import calendar
import random
from datetime import date

import pytest
from themis_tara_check import CHECK_ACTION, pair_record

from align.rewards.tara import parse_item, render_item
from align.rewards.themis_synth import synth_calendar

TEMPLATES = {"week_day": ["What day of the week is {date}?"], "day_difference": ["Days from {d1} to {d2}?"],
             "after": ["What is the day {n} days after {date}?"], "before": ["What is the day {n} days before {date}?"]}


def test_each_side_gets_the_tools_answer_for_its_own_answer():
    items = synth_calendar(60, random.Random(0), TEMPLATES)
    for it in items:
        raw = pair_record(it, check=True)
        back = parse_item(raw, "calendar")
        for side, want in (("pos", "yes"), ("neg", "no")):
            ans = getattr(back, side)
            first, second = ans.steps  # the gold calendar call, then the check
            assert first == getattr(it, side).steps[0]
            assert (second.action, second.action_input, second.observation) == (CHECK_ACTION, first.observation, want)
            # the value the check looks for is the calendar tool's answer, independently recomputed here
            if first.action == "Calendar.week_day":
                d = date.fromisoformat(first.action_input)
                assert first.observation == calendar.day_name[d.weekday()]
            text = render_item(back, side, include_rationale=False).text
            assert text.count("Action: ") == 2 and text.rstrip().endswith(f"Observation: {want}")
        assert parse_item(pair_record(it, check=False), "calendar").pos.steps == it.pos.steps[:1]


@pytest.mark.tara
def test_the_themis_rms_train_on_two_ranks_and_are_measured_in_jobs_of_their_own(tmp_path):
    """--rm-ranks 2: each Themis RM trains under torchrun in a job holding both workers, its measurement is a
    job of its own that reads the training job's result; the plain RM trains in one process."""
    import json

    from themis_tara_check import main

    out = tmp_path / "run"
    assert main(["--out", str(out), "--check", "--seeds", "0", "--synth", "8", "--steps", "2", "--copy-steps", "0",
                 "--layers", "1", "--hidden", "32", "--workers", "2", "--rm-ranks", "2", "--new-tokens", "7"]) == 0
    res = json.loads((out / "results.json").read_text())
    # --new-tokens: the Themis RM's per-round budget, saved with it and used when it is measured
    assert res["params"]["themis_new_tokens"] == 7
    assert json.loads((out / "seed0" / "rm-themis" / "themis.json").read_text())["max_new_tokens"] == 7
    themis, plain = res["runs"][0]["themis"], res["runs"][0]["plain"]
    assert themis["train"]["train/ranks"] == 2 and themis["train"]["train/rank_pairs"] == [8, 8]  # 2 steps x 8
    assert plain["train"]["train/ranks"] == 1
    assert themis["train_job"]["cpu_s"] > themis["train_job"]["wall_s"] > 0  # both ranks' CPU counted
    assert themis["n_pairs"] == 106 and 0.0 <= themis["accuracy"] <= 1.0
    jobs = json.loads((out / "jobs" / "seed0-themis-train.json").read_text())["result"]["_job"]
    assert jobs["end"] <= json.loads((out / "jobs" / "seed0-themis.json").read_text())["result"]["_job"]["start"]


@pytest.mark.tara
def test_weather_pairs_check_the_asked_value_and_train_on_no_test_city_date(tmp_path):
    """--task weather: each side's check call looks for the asked attribute's value in the history_weather
    observation (read here with a regex of our own) and the real tool answers yes for TARA's positive, no for
    its negative; the written training data (TARA train + synthetic pairs from the weather cache) asks about
    and calls no city-date of a test pair."""
    import json
    import re

    from themis_tara_check import write_data

    from align.rewards.tara import load_tara

    test = load_tara(["weather"], "test")
    for it in test:
        raw = pair_record(it, check=True)
        attr = re.fullmatch(r"What is the (.+?) in .+ on \d{4}-\d{2}-\d{2}\?", it.question)[1]
        obs = it.pos.steps[0].observation
        field = {"overall weather": r"overall weather: ([^;]+);", "humidity": r"humidity: ([\d.]+);",
                 "UV index": r"UV index: ([\d.]+)\."}.get(attr, re.escape(attr) + r": ([\d.\-]+\(\w+\))")
        want = re.search(field, obs)[1]
        for side, verdict in (("pos_answer", "yes"), ("neg_answer", "no")):
            check = raw[side]["actions"].split("Action: ")[-1]
            assert check.startswith(f"{CHECK_ACTION}\nAction Input: {want}\nObservation: {verdict}"), check
    info = write_data(tmp_path, 200, True, "weather")
    assert info["synthetic"] + info["synthetic_dropped"] == 200 and info["synthetic"] > 150
    assert info["tara_train"] + info["tara_train_dropped"] == 476
    asked = {m for it in test for m in re.findall(r"in (.+?) on (\d{4}-\d{2}-\d{2})\?", it.question)}
    rows = [json.loads(line) for line in open(info["path"])]
    assert len(rows) == info["tara_train"] + info["synthetic"]
    for row in rows:
        text = row["question"] + row["pos_answer"]["actions"] + row["neg_answer"]["actions"]
        for city, day in asked:
            assert f"{city}, {day}" not in text and not (city in row["question"] and day in row["question"])


def test_pseudo_cities_is_a_share_of_the_weather_pairs(capsys):
    from themis_tara_check import main

    for argv in (["--pseudo-cities", "0.5"], ["--task", "weather", "--pseudo-cities", "1.5"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "--pseudo-cities is a share in (0, 1]" in capsys.readouterr().err


@pytest.mark.tara
def test_weather_pseudo_cities_rename_the_synthetic_pairs_only(tmp_path):
    """--pseudo-cities 1: every synthetic pair's city is a name of no real cache key (question, call and
    observation agree on it); TARA's own training pairs keep their real cities."""
    import json
    import re

    from themis_tara_check import write_data

    from align.tools.data import load_json, tara_dir
    from align.tools.weather import parse_query

    real = {parse_query(k)[0] for k in load_json(tara_dir() / "weather_history.json") if re.search(r", \d{4}-", k)}
    info = write_data(tmp_path, 100, True, "weather", pseudo_cities=1.0)
    rows = [json.loads(line) for line in open(info["path"])]
    assert len(rows) == info["tara_train"] + info["synthetic"] == 476 + 100
    for i, row in enumerate(rows):
        city = re.fullmatch(r"What is the .+? in (.+) on \d{4}-\d{2}-\d{2}\?", row["question"])[1]
        assert (city in real) == (i < 476), row["question"]
        call = re.search(r"Action Input: (.+), \d{4}-\d{2}-\d{2}\nObservation: The weather for (.+) on ",
                         row["pos_answer"]["actions"])
        assert call[1] == call[2] == city


def test_random_names_is_a_share_of_the_weather_pairs_and_excludes_pseudo_cities(capsys):
    from themis_tara_check import main

    for argv, msg in ((["--random-names", "0.5"], "--random-names is a share in (0, 1]"),
                      (["--task", "weather", "--random-names", "2"], "--random-names is a share in (0, 1]"),
                      (["--task", "weather", "--random-names", "1", "--pseudo-cities", "1"], "exclude each other")):
        with pytest.raises(SystemExit):
            main(argv)
        assert msg in capsys.readouterr().err


@pytest.mark.tara
def test_weather_random_names_reach_the_training_file(tmp_path):
    """--random-names 1: every synthetic pair asks about a city of no cache key on a date the call and the
    observation header repeat; TARA's own training pairs keep their real cities and dates."""
    import json
    import re

    from themis_tara_check import write_data

    from align.tools.data import load_json, tara_dir
    from align.tools.weather import parse_query

    real = {parse_query(k)[0] for k in load_json(tara_dir() / "weather_history.json") if re.search(r", \d{4}-", k)}
    info = write_data(tmp_path, 100, True, "weather", random_names=1.0)
    rows = [json.loads(line) for line in open(info["path"])]
    assert len(rows) == info["tara_train"] + info["synthetic"] == 476 + 100
    synth_days = set()
    for i, row in enumerate(rows):
        city, day = re.fullmatch(r"What is the .+? in (.+) on (\d{4}-\d{2}-\d{2})\?", row["question"]).groups()
        assert (city in real) == (i < 476), row["question"]
        call = re.search(r"Action Input: (.+), (\d{4}-\d{2}-\d{2})\nObservation: The weather for (.+) on (\S+) is",
                         row["pos_answer"]["actions"])
        assert call[1] == call[3] == city and call[2] == call[4] == day
        if i >= 476:
            synth_days.add(day)
    assert len(synth_days) > 90  # random days, not TARA's week of June 2023


def test_copy_induct_steps_add_a_content_copy_stage_to_the_rm_base(tmp_path, monkeypatch):
    """--copy-induct-steps N: after the positional copy steps, N steps on rows with a random prefix, gap
    and sub-vocabulary (only content matching copies them); without it the base is built as before."""
    import json

    import copy_pretrain
    from rltaf_rms import rm_base_job
    from themis_tara_check import RM_SETTINGS

    calls = []
    original = copy_pretrain.pretrain_copy

    def recording(model, vocab_ids, **kw):
        calls.append(kw)
        return original(model, vocab_ids, **kw)

    monkeypatch.setattr(copy_pretrain, "pretrain_copy", recording)
    p = {**RM_SETTINGS, "rm_hidden": 32, "rm_layers": 1, "rm_copy_steps": 2, "copy_batch": 4}
    for induct, gap, out in ((0, None, tmp_path / "plain"), (3, None, tmp_path / "induct"), (3, 40, tmp_path / "far")):
        calls.clear()
        stats = rm_base_job(out, {**p, **({"copy_induct_steps": induct} if induct else {}),
                                  **({"copy_induct_gap": gap} if gap else {})})["copy_pretrain"]
        assert json.loads((out / "rm-base" / "copy_pretrain.json").read_text())["steps"] == stats["steps"]
        if not induct:
            assert [c["steps"] for c in calls] == [2] and stats["steps"] == 2 and "stages" not in stats
            assert all(c.get(k) is None for c in calls for k in ("prefix", "gap", "sub_vocab"))
            continue
        assert [c["steps"] for c in calls] == [2, 3] and stats["steps"] == 5 and len(stats["stages"]) == 2
        assert calls[0].get("prefix") is None and calls[0].get("sub_vocab") is None  # the positional stage as before
        vocab = stats["vocab_size"]
        assert calls[1]["prefix"] == (0, 16) and calls[1]["gap"] == (0, gap or 16) and calls[1]["sub_vocab"] == (4, vocab)
        assert calls[1]["seed"] != calls[0]["seed"]  # a fresh row stream


def test_field_check_thought_names_the_asked_field_and_the_value_the_observation_gives():
    """--check-thought field: the check call's Thought writes the asked attribute and the value read, here
    independently, from the observation's text after 'ATTR: '; the Action Input is that value; a calendar or
    unparsed question keeps the plain Thought."""
    import re

    from themis_tara_check import CHECK_THOUGHT, check_thought

    obs = ("The weather for Phnom Penh on 2023-06-21 is: \noverall weather: Partly cloudy; temperature: 27.0(C); "
           "wind speed: 14.4(kph), 8.9(mph); precipitation: 0.3(mm), 0.0(inch); visibility: 10.0(km), 6.0(miles); "
           "humidity: 79.0; UV index: 7.0.")
    for attr, want in (("overall weather", "Partly cloudy"), ("wind speed", "14.4(kph)"), ("UV index", "7.0"),
                       ("humidity", "79.0"), ("precipitation", "0.3(mm)")):
        q = f"What is the {attr} in Phnom Penh on 2023-06-21?"
        got = check_thought(q, obs, field=True)
        assert got == f"The observation gives {attr}: {want}. Check the answer."
        assert re.search(re.escape(f"{attr}: ") + r"([^;]*?)(?:;|, |\.$)", obs)[1] == want
        assert check_thought(q, obs) == CHECK_THOUGHT
    assert check_thought("What day of the week is 2023-06-21?", "Wednesday", field=True) == CHECK_THOUGHT
    it = synth_calendar(1, random.Random(0), TEMPLATES)[0]
    assert parse_item(pair_record(it, True, field_thought=True), "calendar").pos.steps[1].thought == CHECK_THOUGHT


def test_hard_names_check_thought_base_threads_and_induct_gap_are_checked_on_the_command_line(capsys):
    from themis_tara_check import main

    for argv, msg in ((["--task", "weather", "--hard-names"], "give --random-names SHARE with it"),
                      (["--task", "weather", "--check-thought", "field"], "use it with --task weather --check"),
                      (["--check", "--check-thought", "field"], "use it with --task weather --check"),
                      (["--base-threads", "2"], "give 1..1"), (["--base-threads", "0", "--workers", "2"], "give 1..2"),
                      (["--copy-induct-gap", "200"], "give --copy-induct-steps N with it"),
                      (["--copy-induct-steps", "5", "--copy-induct-gap", "-1"], "a gap >= 0")):
        with pytest.raises(SystemExit):
            main(argv)
        assert msg in capsys.readouterr().err


@pytest.mark.tara
def test_hard_names_and_field_thought_reach_the_training_file(tmp_path):
    """--random-names 1 --hard-names --check-thought field: about half the synthetic cities have several
    words; every weather pair's check Thought names its question's attribute and the value its Action Input
    looks for."""
    import json
    import re

    from themis_tara_check import write_data

    info = write_data(tmp_path, 200, True, "weather", random_names=1.0, hard_names=True, field_thought=True)
    rows = [json.loads(line) for line in open(info["path"])]
    several = 0
    for i, row in enumerate(rows):
        attr, city = re.fullmatch(r"What is the (.+?) in (.+) on \d{4}-\d{2}-\d{2}\?", row["question"]).groups()
        several += i >= 476 and len(re.split(r"[ -]", city)) > 1
        for side in ("pos_answer", "neg_answer"):
            m = re.search(r"Thought: The observation gives (.+?): (.+)\. Check the answer\.\nAction: Answer\.mentions\n"
                          r"Action Input: (.+)\n", row[side]["actions"])
            assert m and m[1] == attr and m[2] == m[3], row[side]["actions"][-200:]
            # the value is the observation's own text after the field's name, read here from the trace
            obs = re.search(r"Observation: (The weather for .+?)\nThought:", row[side]["actions"], re.S)[1]
            assert re.search(re.escape(f"{attr}: {m[2]}") + r"(?:;|, |\.$)", obs.strip()), (attr, m[2], obs)
    assert 0.35 < several / info["synthetic"] < 0.65


def test_base_threads_build_the_base_with_that_many_threads_and_put_the_workers_count_back(tmp_path, monkeypatch):
    import rltaf_rms
    import torch

    seen = []
    monkeypatch.setattr(rltaf_rms, "copy_pretrain_base", lambda *a, **k: seen.append(torch.get_num_threads()) or {})
    (tmp_path / "rm-base").mkdir()
    (tmp_path / "rm-base" / "config.json").write_text("{}")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        rltaf_rms.rm_base_job(tmp_path, {"rm_copy_steps": 1, "base_threads": 2})
        assert seen == [2] and torch.get_num_threads() == 1
        rltaf_rms.rm_base_job(tmp_path, {"rm_copy_steps": 1})
        assert seen == [2, 1] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
