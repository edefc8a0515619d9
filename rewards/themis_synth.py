"""Synthetic Themis training pairs in TARA's formats: calendar (the tool is computed, so pairs are unlimited),
weather and multi-tool (from TARA's weather cache, never a city-date of a test split).

Questions and answers reuse the phrasings of TARA's train split (templates extracted by substituting the
dates, numbers, cities and values back out); traces carry the real tool's observation; negatives are hard
(a weekday, day count or date off by a few, a weather value close to the true one or another condition).
Rationales are short and state the answer's value, the observation and the verdict.
"""
from __future__ import annotations

import random
import re
from dataclasses import replace
from datetime import date, timedelta
from typing import Iterable, Sequence

from align.rewards.tara import TaraAnswer, TaraItem
from align.tools.calendar_tools import day_difference, target_day, week_day
from align.tools.trace import ToolCall
from align.tools.weather import parse_query

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WEATHER_ATTRS = ("overall weather", "temperature", "wind speed", "precipitation", "visibility", "humidity", "UV index")
# the value of each attribute as TARA's answers write it, read from the tool's observation text
_OBS_FIELDS = {
    "overall weather": r"overall weather: (.*?);",
    "temperature": r"temperature: ([\d.\-]+\(C\))",
    "wind speed": r"wind speed: ([\d.\-]+\(kph\))",
    "precipitation": r"precipitation: ([\d.\-]+\(mm\))",
    "visibility": r"visibility: ([\d.\-]+\(km\))",
    "humidity": r"humidity: ([\d.\-]+);",
    "UV index": r"UV index: ([\d.\-]+)\.$",
}
_WEATHER_Q = re.compile(r"What is the (?P<attr>.+?) in (?P<city>.+?) on (?P<date>\d{4}-\d{2}-\d{2})\?")


def observation_value(attr: str, observation: str) -> str:
    m = re.search(_OBS_FIELDS[attr], observation.strip())
    if not m:
        raise ValueError(f"no {attr} in observation {observation[:80]!r}")
    return m.group(1)


# ----- templates from TARA's train split ------------------------------------------------------------------

def calendar_templates(items: Iterable[TaraItem]) -> dict[str, list[str]]:
    """Question templates per calendar kind, from TARA calendar items (placeholders {d1} {d2} {date} {n})."""
    out: dict[str, set[str]] = {"week_day": set(), "day_difference": set(), "after": set(), "before": set()}
    for it in items:
        step = it.pos.steps[0]
        q = it.question
        if step.action == "Calendar.week_day":
            d = step.action_input.strip()
            if q.count(d) == 1:
                out["week_day"].add(q.replace(d, "{date}"))
        elif step.action == "Calendar.day_difference":
            d1, d2 = (s.strip() for s in step.action_input.split(","))
            if d1 != d2 and q.count(d1) == 1 and q.count(d2) == 1 and q.index(d1) < q.index(d2):
                out["day_difference"].add(q.replace(d1, "{d1}").replace(d2, "{d2}"))
        elif step.action == "Calendar.target_day":
            d, n = (s.strip() for s in step.action_input.split(","))
            kind = "before" if n.startswith("-") else "after"
            n = n.lstrip("-+")
            t = q.replace(d, "{date}")
            if q.count(d) == 1 and len(re.findall(rf"\b{n}\b", t)) == 1:
                out[kind].add(re.sub(rf"\b{n}\b", "{n}", t))
    return {k: sorted(v) for k, v in out.items()}


def weather_answer_templates(items: Iterable[TaraItem]) -> dict[str, list[str]]:
    """Answer templates per weather attribute from TARA weather items' positive answers ({city} {date} {value})."""
    out: dict[str, set[str]] = {a: set() for a in WEATHER_ATTRS}
    for it in items:
        m = _WEATHER_Q.fullmatch(it.question.strip())
        if not m or m["attr"] not in out:
            continue
        value = observation_value(m["attr"], it.pos.steps[0].observation)
        a = it.pos.answer
        if all(a.count(s) == 1 for s in (m["city"], m["date"], value)):
            out[m["attr"]].add(a.replace(value, "{value}").replace(m["city"], "{city}").replace(m["date"], "{date}"))
    return {k: sorted(v) for k, v in out.items()}


# ----- calendar -------------------------------------------------------------------------------------------

def _rand_date(rng: random.Random, lo: date = date(2000, 1, 1), hi: date = date(2023, 12, 31)) -> date:
    return lo + timedelta(days=rng.randrange((hi - lo).days + 1))


def _offset(rng: random.Random) -> int:
    """A hard-negative offset: mostly 1-3, sometimes a few more, never 0."""
    k = rng.choice((1, 1, 2, 2, 3, 3, 4, 5, 7, 10, 30))
    return k if rng.random() < 0.5 else -k


def _rationale(claim: str, action: str, obs: str, correct: bool) -> str:
    verdict = "They match, so the answer is correct." if correct else "They differ, so the answer is wrong."
    return f"The answer says {claim}. The tool {action} returned {obs}. {verdict}"


def _claim_first(steps: tuple[ToolCall, ...], claim: str) -> tuple[ToolCall, ...]:
    """The first Thought opens with the answer's value: "The answer says X. I need to search ...". Written
    there, X is copied from the answer line just above (a few tokens back, nothing in between to confuse it
    with), and the rationale's "The answer says X" later repeats the same phrase (an exact-prefix copy)
    instead of reaching past the observation, which a small model fills in instead (its rationale then says
    "match" for both answers)."""
    first = replace(steps[0], thought=f"The answer says {claim}. {steps[0].thought}")
    return (first, *steps[1:])


def _answers(question_id: str, group: str, question: str, call: ToolCall, calls: Sequence[ToolCall],
             pos: tuple[str, str], neg: tuple[str, str], obs_value: str, claim_first: bool = False) -> TaraItem:
    """Both sides share the gold trace (it depends on the question only); answers differ in the value.
    claim_first: each side's first Thought states its answer's value (`_claim_first`); calls are unchanged."""
    steps = tuple(calls)
    ps, ns = (_claim_first(steps, pos[1]), _claim_first(steps, neg[1])) if claim_first else (steps, steps)
    p = TaraAnswer(pos[0], 1.0, ps, _rationale(pos[1], call.action, obs_value, True))
    n = TaraAnswer(neg[0], -1.0, ns, _rationale(neg[1], call.action, obs_value, False))
    return TaraItem(question_id, group, question, p, n)


def synth_calendar(n: int, rng: random.Random, templates: dict[str, list[str]], group: str = "synth_calendar",
                   claim_first: bool = False) -> list[TaraItem]:
    """n calendar pairs, kinds uniform over week_day / day_difference / target_day (after and before).
    claim_first: see `_claim_first` (the same pairs otherwise: no extra random draws)."""
    items = []
    for i in range(n):
        kind = rng.choice(("week_day", "day_difference", "target_day"))
        if kind == "week_day":
            d = _rand_date(rng).isoformat()
            q = rng.choice(templates["week_day"]).format(date=d)
            obs = week_day(d)
            if rng.random() < 0.1 and obs != "Wednesday":
                wrong = "Wendesday"  # TARA's misspelt negative
            else:
                wrong = WEEKDAYS[(WEEKDAYS.index(obs) + rng.choice((1, 2, 3, 4, 5, 6))) % 7]
            call = ToolCall("Calendar.week_day", d, f"I need to search what day of the week is {d}.", obs)
            items.append(_answers(f"{group}_{i}", group, q, call, [call], (f"{d} is {obs}", obs), (f"{d} is {wrong}", wrong), obs, claim_first))
        elif kind == "day_difference":
            d1, d2 = _rand_date(rng).isoformat(), _rand_date(rng).isoformat()
            while d2 == d1:
                d2 = _rand_date(rng).isoformat()
            q = rng.choice(templates["day_difference"]).format(d1=d1, d2=d2)
            obs = day_difference(f"{d1}, {d2}")
            wrong = str(int(obs) + _offset(rng)) if rng.random() < 0.8 else str(rng.randrange(1, 9000))
            if wrong == obs or int(wrong) < 0:
                wrong = str(int(obs) + 1)
            call = ToolCall("Calendar.day_difference", f"{d1}, {d2}", f"I need to search how many days is the difference between {d1} and {d2}.", obs)
            stem = f"The difference between {d1} and {d2} is "
            items.append(_answers(f"{group}_{i}", group, q, call, [call], (stem + obs, obs), (stem + wrong, wrong), obs, claim_first))
        else:
            direction = rng.choice(("after", "before"))
            d, k = _rand_date(rng).isoformat(), rng.randrange(1, 366)
            q = rng.choice(templates[direction]).format(date=d, n=k)
            signed = k if direction == "after" else -k
            obs = target_day(f"{d}, {signed}")
            t = date.fromisoformat(obs)
            wrong_d = t + timedelta(days=_offset(rng)) if rng.random() < 0.8 else _rand_date(rng)
            if wrong_d == t:
                wrong_d = t + timedelta(days=1)
            wrong = wrong_d.isoformat()
            call = ToolCall("Calendar.target_day", f"{d}, {signed}", f"I need to search what day is {k} days {direction} {d}.", obs)
            stem = f"The day {direction} {d} {k} days is "
            items.append(_answers(f"{group}_{i}", group, q, call, [call], (stem + obs, obs), (stem + wrong, wrong), obs, claim_first))
    return items


# ----- weather --------------------------------------------------------------------------------------------

def city_dates_of(test_items: Iterable[TaraItem]) -> set[str]:
    """Every 'City, YYYY-MM-DD' a test item asks about or calls history_weather with (both sides)."""
    keys: set[str] = set()
    for it in test_items:
        for ans in (it.pos, it.neg):
            for s in ans.steps:
                if s.action == "history_weather":
                    city, day = parse_query(s.action_input)
                    keys.add(f"{city}, {day}")
        m = _WEATHER_Q.fullmatch(it.question.strip())
        if m:
            keys.add(f"{m['city']}, {m['date']}")
    return keys


def _wrong_value(attr: str, value: str, conditions: Sequence[str], rng: random.Random) -> str:
    if attr == "overall weather":
        return rng.choice([c for c in conditions if c != value])
    m = re.fullmatch(r"([\d.\-]+)(\(.*\))?", value)
    x, unit = float(m.group(1)), m.group(2) or ""
    step = 1.0 if attr in ("humidity", "UV index") else 0.1 * rng.choice((3, 5, 8, 10, 15, 20, 30, 50))
    y = x + (step * rng.choice((1, 2, 3)) if rng.random() < 0.5 or x - 3 * step < 0 else -step * rng.choice((1, 2, 3)))
    return f"{round(y, 1):.1f}{unit}"


def _parses(key: str) -> bool:
    try:
        parse_query(key)
        return True
    except Exception:
        return False


def weather_keys(cache: dict[str, str], exclude: set[str]) -> list[str]:
    """Cache keys usable for training: parseable, with every attribute, and not a test city-date."""
    keys = []
    for key, obs in sorted(cache.items()):
        try:
            city, day = parse_query(key)
            for a in WEATHER_ATTRS:
                observation_value(a, obs)
        except Exception:
            continue
        if f"{city}, {day}" not in exclude:
            keys.append(key)
    return keys


_ONSETS = ("b", "ch", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "q", "r", "s", "sh", "t", "w", "x", "y",
           "z", "zh", "br", "kr", "tr", "")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ia", "ua", "ou", "ei")
_CODAS = ("", "", "n", "ng", "r", "l", "s")


def pseudo_city(rng: random.Random, taken: set[str] = frozenset()) -> str:
    """A made-up city name: one word (sometimes two) of 2-4 random syllables, capitalised, none of `taken`.
    Measured (docs/experiments/themis_tara.md, session 11): a 3 x 128 Themis trained on such names learns the
    syllables' distribution and writes names of its own at test; it does not learn to copy them."""
    def word() -> str:
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.randint(2, 4))).capitalize()
    while True:
        name = word() + (" " + word() if rng.random() < 0.2 else "")
        if name not in taken:
            return name


def city_letters(cache: dict[str, str]) -> str:
    """Every lower-case letter of the cache's distinct city names, with repeats, sorted: drawing from it
    uniformly draws a letter with its frequency in the cities' names (accented ones rare, as in 'São Paulo')."""
    cities = {parse_query(k)[0] for k in cache if _parses(k)}
    return "".join(sorted(c for city in cities for c in city.lower() if c.isalpha()))


def random_letter_city(rng: random.Random, letters: str, taken: set[str] = frozenset()) -> str:
    """A city name of independently drawn letters (`rng.choice(letters)`): one word (a fifth of the time two)
    of 4-10 letters each, capitalised, none of `taken`. Unlike `pseudo_city` no letter is predictable from
    the ones before it, so a model that writes the name into a call can only copy it."""
    def word() -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(4, 10))).capitalize()
    while True:
        name = word() + (" " + word() if rng.random() < 0.2 else "")
        if name not in taken:
            return name


def hard_letter_city(rng: random.Random, letters: str, taken: set[str] = frozenset()) -> str:
    """A random-letter city name shaped like the ones `random_letter_city` rarely draws and a copy fails on
    (docs/experiments/themis_tara.md, session 12: `Phnom Penh` -> `Penh`, `Copenhagen` -> `Copenhagenhagen`):
    1-5 words (half the names several, as 'City of Cape Town'), some short lower-case ones ('de', 'upon') or
    joined by '-' ('Port-au-Prince'), and in half the names a letter pair or triple of the name written again
    later in the same word (once, sometimes twice: 'Koror', 'Pingdingshan'), so that matching the two characters
    before a position does not tell where a copy goes on."""
    def word(lower: bool = False) -> str:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(2, 4) if lower else rng.randint(3, 10)))
        return w if lower else w.capitalize()

    def repeat(w: str) -> str:  # a piece of w written again after itself, anywhere later in the word
        if len(w) < 3:
            return w
        size = rng.choice((2, 2, 3))
        i = rng.randrange(0, len(w) - size + 1)
        j = rng.randint(i + size, len(w))
        return w[:j] + w[i:i + size].lower() + w[j:]

    while True:
        n = rng.choices((1, 2, 3, 4, 5), weights=(50, 30, 12, 5, 3))[0]
        words = [word(lower=0 < k < n - 1 and rng.random() < 0.3) for k in range(n)]
        if rng.random() < 0.5:
            k = rng.randrange(n)
            words[k] = repeat(words[k])
            if rng.random() < 0.25:
                words[k] = repeat(words[k])
        name = words[0]
        for w in words[1:]:
            name += ("-" if rng.random() < 0.1 else " ") + w
        if name not in taken:
            return name


def _relabel(obs: str, city: str, day: str, new_city: str, new_day: str) -> str:
    """The observation with its header naming new_city and new_day (the weather values are the cache's)."""
    head = f"The weather for {city} on {day}"
    if not obs.startswith(head):
        raise ValueError(f"observation does not open with {head!r}: {obs[:80]!r}")
    return f"The weather for {new_city} on {new_day}" + obs[len(head):]


def synth_weather(n: int, rng: random.Random, cache: dict[str, str], keys: Sequence[str], answer_templates: dict[str, list[str]],
                  multi: bool = False, group: str | None = None, claim_first: bool = False,
                  pseudo_cities: float = 0.0, city_rng: random.Random | None = None,
                  random_names: float = 0.0, hard_names: bool = False) -> list[TaraItem]:
    """n weather pairs (or, multi=True, multi-tool pairs: Calendar.target_day then history_weather) from `keys`.
    claim_first: see `_claim_first`. pseudo_cities: the share of pairs whose city is renamed (`pseudo_city`)
    in the question, the answers, the call and the observation, drawn from `city_rng` so that the pairs are
    otherwise the same (a made-up name is never a city of the cache). random_names: the share of pairs whose
    city becomes independently drawn letters (`random_letter_city`, with the cities' letter frequencies) and
    whose date a uniformly random day of 2000-2023, everywhere including the observation's header (its values
    stay the cache's), also drawn from `city_rng`; the two options exclude each other. hard_names (with
    random_names): those names come from `hard_letter_city` instead (several words, repeated letter pairs)."""
    if pseudo_cities and random_names:
        raise ValueError("pseudo_cities and random_names exclude each other: set one")
    if hard_names and not random_names:
        raise ValueError("hard_names shapes the random-letter names: set random_names > 0 with it")
    if (pseudo_cities or random_names) and city_rng is None:
        raise ValueError("pseudo_cities / random_names need their own city_rng (the pairs' other draws stay those of rng)")
    real = {parse_query(k)[0] for k in cache if _parses(k)} if (pseudo_cities or random_names) else set()
    letters = city_letters(cache) if random_names else ""
    group = group or ("synth_multi_tools" if multi else "synth_weather")
    conditions = sorted({observation_value("overall weather", cache[k]) for k in weather_keys(cache, set())})
    if len(conditions) < 2:
        raise ValueError("the weather cache needs at least two distinct conditions for wrong-condition negatives")
    items = []
    for i in range(n):
        key = rng.choice(list(keys))
        city, day = parse_query(key)
        obs = cache[key]
        if pseudo_cities and city_rng.random() < pseudo_cities:
            name = pseudo_city(city_rng, real)
            obs, city = obs.replace(city, name), name
        elif random_names and city_rng.random() < random_names:
            name = (hard_letter_city if hard_names else random_letter_city)(city_rng, letters, real)
            new_day = _rand_date(city_rng).isoformat()
            obs, city, day = _relabel(obs, city, day, name, new_day), name, new_day
        attr = rng.choice(WEATHER_ATTRS)
        value = observation_value(attr, obs)
        wrong = _wrong_value(attr, value, conditions, rng)
        weather_call = ToolCall("history_weather", f"{city}, {day}", f"I need to search the weather in {city} on {day}", obs)
        if not multi:
            q = f"What is the {attr} in {city} on {day}?"
            tp, tn = rng.choice(answer_templates[attr]), rng.choice(answer_templates[attr])
            pos = tp.format(city=city, date=day, value=value)
            neg = tn.format(city=city, date=day, value=wrong)
            items.append(_answers(f"{group}_{i}", group, q, weather_call, [weather_call], (pos, value), (neg, wrong), value, claim_first))
        else:
            k = rng.randrange(1, 200)
            start = (date.fromisoformat(day) - timedelta(days=k)).isoformat()
            q = f"What is the {attr} like in {city} on the {k} days after {start}?"
            stem = f"The {attr} in {city} on the {k} days after {start} is "
            cal = ToolCall("Calendar.target_day", f"{start}, {k}", f"I need to search what day is {k} days after {start}.", day)
            items.append(_answers(f"{group}_{i}", group, q, weather_call, [cal, weather_call], (stem + value + ".", value),
                                  (stem + wrong + ".", wrong), value, claim_first))
    return items


__all__ = ["WEEKDAYS", "WEATHER_ATTRS", "calendar_templates", "weather_answer_templates", "synth_calendar",
           "synth_weather", "pseudo_city", "random_letter_city", "hard_letter_city", "city_letters", "city_dates_of", "weather_keys", "observation_value"]
