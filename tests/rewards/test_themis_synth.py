"""Synthetic Themis pairs (align.rewards.themis_synth): calendar answers checked against python's datetime
(computed here independently), weather pairs against the cache text, and the TARA split for test-city-date leaks."""
from __future__ import annotations

import collections
import random
import re
from datetime import date, timedelta

import pytest

from align.rewards.tara import load_tara, load_weather_cache, render_item
from align.rewards.themis_synth import (
    calendar_templates,
    city_dates_of,
    hard_letter_city,
    random_letter_city,
    synth_calendar,
    synth_weather,
    weather_answer_templates,
    weather_keys,
)

CAL_TEMPLATES = {
    "week_day": ["Which day of the week is {date}?"],
    "day_difference": ["How many days lie between {d1} and {d2}?"],
    "after": ["What day is {n} days after {date}?"],
    "before": ["What day is {n} days before {date}?"],
}
WEATHER_TEMPLATES = {a: [f"The {a} in {{city}} on {{date}} is {{value}}."] for a in
                     ("overall weather", "temperature", "wind speed", "precipitation", "visibility", "humidity", "UV index")}


def _obs(cond: str, temp: float) -> str:
    return (f"The weather for X on D is: \noverall weather: {cond}; temperature: {temp}(C); wind speed: 10.1(kph), 6.3(mph); "
            f"precipitation: 0.5(mm), 0.02(inch); visibility: 9.0(km), 5.0(miles); humidity: 61.0; UV index: 4.0.")


def test_calendar_pairs_are_correct_against_datetime():
    items = synth_calendar(600, random.Random(0), CAL_TEMPLATES)
    kinds = {"week_day": 0, "day_difference": 0, "after": 0, "before": 0}
    hard = 0
    for it in items:
        q = it.question
        (step,) = it.pos.steps
        assert it.neg.steps == it.pos.steps  # the trace depends on the question only
        dates = [date.fromisoformat(d) for d in re.findall(r"\d{4}-\d{2}-\d{2}", q)]
        if q.startswith("Which day"):
            kinds["week_day"] += 1
            truth = dates[0].strftime("%A")
            assert (step.action, step.action_input) == ("Calendar.week_day", dates[0].isoformat())
            assert it.pos.answer == f"{dates[0].isoformat()} is {truth}"
            wrong = it.neg.answer.rsplit(" ", 1)[1]
            assert wrong != truth and wrong in {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Wendesday"}
        elif q.startswith("How many"):
            kinds["day_difference"] += 1
            truth = str(abs((dates[0] - dates[1]).days))
            assert (step.action, step.action_input) == ("Calendar.day_difference", f"{dates[0].isoformat()}, {dates[1].isoformat()}")
            assert it.pos.answer.endswith(f" is {truth}")
            wrong = int(it.neg.answer.rsplit(" ", 1)[1])
            assert wrong != int(truth) and wrong >= 0
            hard += abs(wrong - int(truth)) <= 3
        else:
            k = int(re.search(r"is (\d+) days", q).group(1))
            before = "before" in q
            kinds["before" if before else "after"] += 1
            truth_d = dates[0] + timedelta(days=-k if before else k)
            truth = truth_d.isoformat()
            assert (step.action, step.action_input) == ("Calendar.target_day", f"{dates[0].isoformat()}, {-k if before else k}")
            assert it.pos.answer.endswith(f" is {truth}")
            wrong = date.fromisoformat(it.neg.answer.rsplit(" ", 1)[1])
            assert wrong != truth_d
            hard += abs((wrong - truth_d).days) <= 3
        assert step.observation == truth  # the real tool's output, rendered into the trace
        assert f"Observation: {truth}\n" in render_item(it, "neg").text
        assert "They match" in it.pos.rationale and "They differ" in it.neg.rationale
    assert min(kinds.values()) > 80  # all four kinds drawn
    # most numeric negatives are hard (within 3 days of the truth); 0.8 * 6/11 of them by construction
    n_numeric = kinds["day_difference"] + kinds["after"] + kinds["before"]
    assert 0.3 < hard / n_numeric < 0.6


def test_weather_pairs_read_the_cache_and_never_use_excluded_keys():
    cache = {f"City{i}, 2023-06-{10 + i}": _obs(["Sunny", "Cloudy", "Mist"][i % 3], 20.0 + i) for i in range(6)}
    cache["Broken, 2023-06-01"] = "not a weather record"
    excluded = {"City0, 2023-06-10", "City3, 2023-06-13"}
    keys = weather_keys(cache, excluded)
    assert sorted(keys) == ["City1, 2023-06-11", "City2, 2023-06-12", "City4, 2023-06-14", "City5, 2023-06-15"]
    for multi in (False, True):
        items = synth_weather(200, random.Random(1), cache, keys, WEATHER_TEMPLATES, multi=multi)
        assert not (city_dates_of(items) & excluded)
        for it in items:
            weather = it.pos.steps[-1]
            assert weather.action == "history_weather" and weather.observation == cache[weather.action_input]
            attr = re.match(r"What is the (.+?) (?:like )?in ", it.question).group(1)
            i = int(weather.action_input.split(",")[0][4:])
            truth = {"overall weather": ["Sunny", "Cloudy", "Mist"][i % 3], "temperature": f"{20.0 + i}(C)", "wind speed": "10.1(kph)",
                     "precipitation": "0.5(mm)", "visibility": "9.0(km)", "humidity": "61.0", "UV index": "4.0"}[attr]
            def has(text):  # the value as a whole number / phrase ('9.0(km)' is not in '19.0(km)')
                return re.search(rf"(?<![\w.]){re.escape(truth)}(?![\w])", text) is not None

            assert has(it.pos.answer) and not has(it.neg.answer)
            if multi:
                cal = it.pos.steps[0]
                start, k = cal.action_input.split(", ")
                assert (date.fromisoformat(start) + timedelta(days=int(k))).isoformat() == cal.observation
                assert weather.action_input.endswith(cal.observation)


def test_city_dates_come_from_calls_and_questions():
    cache = {"A, 2023-06-01": _obs("Sunny", 1.0), "B, 2023-06-02": _obs("Mist", 2.0)}
    items = synth_weather(5, random.Random(2), cache, ["A, 2023-06-01"], WEATHER_TEMPLATES)
    assert city_dates_of(items) == {"A, 2023-06-01"}


@pytest.mark.tara
def test_tara_templates_and_the_training_split_has_no_test_city_date():
    train = load_tara(["calendar", "weather", "multi_tools"], "train")
    test = load_tara(["calendar", "weather", "multi_tools"], "test")
    banned = city_dates_of(test)
    # weather test + multi-tool test: one city-date per item, at most (a few repeat)
    assert 250 < len(banned) <= 158 + 144
    assert "Neijiang, 2023-06-19" in banned  # weather_test_0
    cal = calendar_templates([it for it in train if it.group == "calendar"])
    assert all(len(v) >= 10 for v in cal.values())
    assert all("{date}" in t for t in cal["week_day"]) and all("{d1}" in t and "{d2}" in t for t in cal["day_difference"])
    wea = weather_answer_templates([it for it in train if it.group == "weather"])
    assert all(len(v) >= 10 and all("{value}" in t and "{city}" in t for t in v) for v in wea.values())
    cache = load_weather_cache()
    keys = weather_keys(cache, banned)
    assert not set(keys) & banned and len(keys) > 800
    rng = random.Random(0)
    synth = synth_weather(500, rng, cache, keys, wea) + synth_weather(200, rng, cache, keys, wea, multi=True)
    assert not city_dates_of(synth) & banned
    # TARA's own train split repeats a couple of test city-dates: the experiment drops those items
    assert 0 < len(city_dates_of(train) & banned) < 5


def test_claim_first_states_each_answers_value_and_leaves_the_pairs_unchanged():
    """claim_first: the first Thought of each side opens with that side's value; questions, answers, calls
    and observations are the same pairs as without it (same rng draws), and the rationale is unchanged."""
    plain = synth_calendar(120, random.Random(5), CAL_TEMPLATES)
    claim = synth_calendar(120, random.Random(5), CAL_TEMPLATES, claim_first=True)
    cache = {f"City{i}, 2023-06-{10 + i}": _obs(["Sunny", "Cloudy", "Mist"][i % 3], 20.0 + i) for i in range(4)}
    keys = weather_keys(cache, set())
    plain += synth_weather(60, random.Random(6), cache, keys, WEATHER_TEMPLATES, multi=True)
    claim += synth_weather(60, random.Random(6), cache, keys, WEATHER_TEMPLATES, multi=True, claim_first=True)
    for a, b in zip(plain, claim, strict=True):
        assert (a.question, a.pos.answer, a.neg.answer) == (b.question, b.pos.answer, b.neg.answer)
        for side_a, side_b in ((a.pos, b.pos), (a.neg, b.neg)):
            assert side_a.rationale == side_b.rationale
            assert [(s.action, s.action_input, s.observation) for s in side_a.steps] == \
                   [(s.action, s.action_input, s.observation) for s in side_b.steps]
            assert [s.thought for s in side_a.steps[1:]] == [s.thought for s in side_b.steps[1:]]
            # the value the rationale attributes to the answer ("The answer says X. The tool ...")
            value = re.match(r"The answer says (.*?)\. The tool ", side_a.rationale).group(1)
            assert side_b.steps[0].thought == f"The answer says {value}. {side_a.steps[0].thought}"
            assert value in side_a.answer
        # the two sides now differ in their first Thought only where the values differ
        pv = re.match(r"The answer says (.*?)\. ", b.pos.steps[0].thought).group(1)
        nv = re.match(r"The answer says (.*?)\. ", b.neg.steps[0].thought).group(1)
        assert pv != nv
    # independent check of the week_day values: the positive's claim is datetime's weekday name
    for it in claim[:120]:
        if it.question.startswith("Which day"):
            d = date.fromisoformat(re.search(r"\d{4}-\d{2}-\d{2}", it.question).group())
            assert it.pos.steps[0].thought.startswith(f"The answer says {d.strftime('%A')}. ")


def test_pseudo_cities_rename_the_city_everywhere_and_leave_the_pairs_otherwise_the_same():
    cities = ["Suzhou", "Phnom Penh", "Apia"]
    cache = {f"{c}, 2023-06-2{i}": _obs(["Sunny", "Mist"][i % 2], 20.0 + i).replace("for X on D", f"for {c} on 2023-06-2{i}")
             for i, c in enumerate(cities)}
    keys = weather_keys(cache, set())
    for multi in (False, True):
        real = synth_weather(120, random.Random(3), cache, keys, WEATHER_TEMPLATES, multi=multi)
        fake = synth_weather(120, random.Random(3), cache, keys, WEATHER_TEMPLATES, multi=multi,
                             pseudo_cities=0.5, city_rng=random.Random(9))
        renamed = 0
        for r, f in zip(real, fake):
            city = r.pos.steps[-1].action_input.split(", ")[0]
            name = f.pos.steps[-1].action_input.split(", ")[0]
            assert name == city or name not in cities
            renamed += name != city
            back = lambda text: text.replace(name, city)  # noqa: E731 - the pair with the real name put back
            assert back(f.question) == r.question
            for fs, rs in ((f.pos, r.pos), (f.neg, r.neg)):
                assert back(fs.answer) == rs.answer and back(fs.rationale) == rs.rationale
                assert [(s.action, back(s.action_input), back(s.thought), back(s.observation)) for s in fs.steps] == \
                       [(s.action, s.action_input, s.thought, s.observation) for s in rs.steps]
            if name != city:  # nothing of the real city is left in the renamed pair
                texts = [f.question] + [t for a in (f.pos, f.neg) for t in (a.answer, a.rationale)] + \
                        [t for a in (f.pos, f.neg) for s in a.steps for t in (s.thought, s.action_input, s.observation)]
                assert not any(re.search(rf"\b{city}\b", t) for t in texts) and name in f.pos.steps[-1].observation
        assert 30 < renamed < 90  # about half of the 120
    with pytest.raises(ValueError, match="city_rng"):
        synth_weather(1, random.Random(3), cache, keys, WEATHER_TEMPLATES, pseudo_cities=1.0)


def test_random_names_give_random_letter_cities_and_random_dates_with_the_pair_otherwise_the_same():
    """random_names=0.5: about half the pairs name a city of random letters on a random 2000-2023 day, in the
    question, answers, call, thought and observation header; putting the cache's city and day back gives the
    pair built without the option (same rng), so the weather values and negatives are the cache's."""
    cities = ["Suzhou", "Phnom Penh", "São Paulo"]
    cache = {f"{c}, 2023-06-2{i}": _obs(["Sunny", "Mist"][i % 2], 20.0 + i).replace("for X on D", f"for {c} on 2023-06-2{i}")
             for i, c in enumerate(cities)}
    keys = weather_keys(cache, set())
    letters = set("suzhouphnompenhsãopaulo")
    real = synth_weather(200, random.Random(3), cache, keys, WEATHER_TEMPLATES)
    rand = synth_weather(200, random.Random(3), cache, keys, WEATHER_TEMPLATES, random_names=0.5, city_rng=random.Random(9))
    renamed, days, used, names = 0, set(), set(), []
    for r, f in zip(real, rand):
        city, day = r.pos.steps[0].action_input.split(", ")
        name, new_day = f.pos.steps[0].action_input.split(", ")
        if name == city:
            assert new_day == day and f == r
            continue
        renamed += 1
        assert name not in cities and name[0].isupper() and all(w.isalpha() for w in name.split(" "))
        assert all(4 <= len(w) <= 10 for w in name.split(" ")) and set(name.lower()) - {" "} <= letters
        used |= set(name.lower()) - {" "}
        names.append(name)
        assert date(2000, 1, 1) <= date.fromisoformat(new_day) <= date(2023, 12, 31)
        days.add(new_day)

        def back(text: str) -> str:  # the pair with the cache's city and day put back
            return text.replace(name, city).replace(new_day, day)
        assert back(f.question) == r.question
        obs = f.pos.steps[0].observation
        assert obs.startswith(f"The weather for {name} on {new_day} is: \n") and back(obs) == r.pos.steps[0].observation
        for fs, rs in ((f.pos, r.pos), (f.neg, r.neg)):
            assert back(fs.answer) == rs.answer and back(fs.rationale) == rs.rationale
            assert [(s.action, back(s.action_input), back(s.thought), back(s.observation)) for s in fs.steps] == \
                   [(s.action, s.action_input, s.thought, s.observation) for s in rs.steps]
        texts = [f.question] + [t for a in (f.pos, f.neg) for t in (a.answer, a.rationale)] + \
                [t for a in (f.pos, f.neg) for s in a.steps for t in (s.thought, s.action_input, s.observation)]
        assert not any(city in t or day in t for t in texts)
    assert 60 < renamed < 140 and len(days) > 0.95 * renamed  # about half; dates nearly all distinct
    assert used == letters  # every letter of the cache's cities is drawn, the accented one too
    freq = {c: sum(n.lower().count(c) for n in names) for c in letters}
    assert freq["u"] > freq["ã"]  # with the cities' letter frequencies: u 4 times in 'suzhouphnompenhsãopaulo', ã once
    # multi-tool pairs: the calendar call lands on the random day
    for it in synth_weather(50, random.Random(5), cache, keys, WEATHER_TEMPLATES, multi=True, random_names=1.0,
                            city_rng=random.Random(2)):
        cal, weather = it.pos.steps
        start, k = cal.action_input.split(", ")
        assert (date.fromisoformat(start) + timedelta(days=int(k))).isoformat() == cal.observation == \
               weather.action_input.split(", ")[1]
    with pytest.raises(ValueError, match="exclude each other"):
        synth_weather(1, random.Random(3), cache, keys, WEATHER_TEMPLATES, pseudo_cities=0.5, random_names=0.5,
                      city_rng=random.Random(1))
    with pytest.raises(ValueError, match="city_rng"):
        synth_weather(1, random.Random(3), cache, keys, WEATHER_TEMPLATES, random_names=1.0)


def _has_repeat(word: str) -> bool:
    """A letter pair of the word occurs again later in it (overlapping allowed: 'ororor')."""
    w = word.lower()
    return any(w[i:i + 2] in w[i + 1:] for i in range(len(w) - 1))


def test_hard_letter_city_draws_several_words_and_repeated_pairs_from_the_letters_only():
    """hard_letter_city: 1-5 words, half the names with several (weights 50/30/12/5/3); a repeated letter pair
    in at least the half it injects one into (random letters repeat a pair now and then too); only the given
    letters, '-' and ' '; short lower-case inner words; never a taken name."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    rng = random.Random(11)
    taken = {hard_letter_city(random.Random(11), letters)}  # the first name this rng draws
    names = [hard_letter_city(rng, letters, taken) for _ in range(2000)]
    assert not taken & set(names)
    words = [re.split(r"[ -]", n) for n in names]
    counts = collections.Counter(len(w) for w in words)
    assert set(counts) == {1, 2, 3, 4, 5}
    assert 0.45 < counts[1] / 2000 < 0.55 and 0.25 < counts[2] / 2000 < 0.35 and counts[5] / 2000 < 0.05
    assert all(set(n.lower()) <= set(letters) | {" ", "-"} for n in names)
    assert all(w[0].isupper() for ws in words for w in (ws[0], ws[-1]))
    inner = [w for ws in words for w in ws[1:-1]]
    lower = [w for w in inner if w.islower()]
    assert 0.2 < len(lower) / len(inner) < 0.4 and all(2 <= len(w) <= 10 for w in lower)  # 2-4, two repeats add up to 6
    assert 0.02 < sum("-" in n for n in names) / 2000 < 0.12
    repeated = sum(any(_has_repeat(w) for w in ws) for ws in words) / 2000
    plain = [random_letter_city(rng, letters) for _ in range(2000)]
    plain_repeated = sum(any(_has_repeat(w) for w in n.split(" ")) for n in plain) / 2000
    assert repeated > 0.5 and repeated > plain_repeated + 0.3, (repeated, plain_repeated)


def test_hard_names_change_only_the_names_of_random_name_pairs():
    """synth_weather(hard_names=True): the same pairs as without it (attribute, values, negatives from rng),
    their cities drawn by hard_letter_city, written the same way in question, call and observation; it needs
    random_names."""
    cities = ["Suzhou", "Phnom Penh"]
    cache = {f"{c}, 2023-06-2{i}": _obs(["Sunny", "Mist"][i % 2], 20.0 + i).replace("for X on D", f"for {c} on 2023-06-2{i}")
             for i, c in enumerate(cities)}
    keys = weather_keys(cache, set())
    easy = synth_weather(300, random.Random(3), cache, keys, WEATHER_TEMPLATES, random_names=1.0, city_rng=random.Random(9))
    hard = synth_weather(300, random.Random(3), cache, keys, WEATHER_TEMPLATES, random_names=1.0, city_rng=random.Random(9),
                         hard_names=True)
    several = 0
    for e, h in zip(easy, hard):
        name, day = h.pos.steps[0].action_input.split(", ")
        several += len(re.split(r"[ -]", name)) > 1
        assert h.question.endswith(f" in {name} on {day}?")
        assert h.pos.steps[0].observation.startswith(f"The weather for {name} on {day} is: \n")
        assert h.pos.steps[0].observation.split("\n", 1)[1] == e.pos.steps[0].observation.split("\n", 1)[1]
        assert (h.pos.score, h.neg.score) == (e.pos.score, e.neg.score)
        assert h.question.split(" in ")[0] == e.question.split(" in ")[0]  # the same attribute asked
    assert 120 < several < 180  # about half the names have several words
    with pytest.raises(ValueError, match="set random_names"):
        synth_weather(1, random.Random(3), cache, keys, WEATHER_TEMPLATES, hard_names=True, city_rng=random.Random(1))
