"""tools/answer_check.py: `Answer.mentions` against a brute-force reference, its error messages, and the
context Themis gives a tool (the judged answer)."""
from __future__ import annotations

import random
import re
import string

import pytest

from align.tools import call_tool, get_tool
from align.tools.answer_check import MAX_INPUT_CHARS, mentions


def brute_mentions(needle: str, answer: str) -> bool:
    """Every start position, compared character by character, with the neighbours checked by hand."""
    n, a = needle.strip().strip("'\"").strip().lower(), answer.lower()
    alnum, joiners = set(string.ascii_lowercase + string.digits), set("-./:")

    def left_ok(i):  # the character before position i does not continue a word or a number
        if i == 0:
            return True
        if a[i - 1] in alnum:
            return False
        return not (a[i - 1] in joiners and i >= 2 and a[i - 2].isdigit())

    def right_ok(j):  # likewise for the character at position j (just after the match)
        if j == len(a):
            return True
        if a[j] in alnum:
            return False
        return not (a[j] in joiners and j + 1 < len(a) and a[j + 1].isdigit())

    return any(a[i:i + len(n)] == n and left_ok(i) and right_ok(i + len(n)) for i in range(len(a) - len(n) + 1))


def test_whole_value_case_insensitive_and_literal():
    answer = "The difference between 2007-11-18 and 2010-06-06 is 931"
    assert mentions("931", answer) and not mentions("93", answer) and not mentions("31", answer)
    assert mentions("2010-06-06", answer) and not mentions("2010-06-0", answer)
    assert mentions(" 'Tuesday' ", "2015-03-24 is tuesday.") and not mentions("Monday", "It is Mondays")
    assert mentions("6.0(C)", "UV 6.0(C) today") and not mentions("6.0", "it is 16.0 degrees")
    assert not mentions("10", "between 2000-01-10 and 2000-01-20 is 10.5") and mentions("931", "It is 931.")
    assert not mentions("5", "at 12:5 or 1/5") and mentions("5", "5-day forecast: -5 degrees")
    assert not mentions(".*", "anything at all") and mentions("a+b", "is a+b?")  # the input is no pattern


def test_against_brute_force_on_random_strings():
    rng = random.Random(0)
    alphabet = "ab12 -.:,()"
    for _ in range(3000):
        answer = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        needle = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
        if not needle.strip().strip("'\"").strip():
            continue
        assert mentions(needle, answer) == brute_mentions(needle, answer), (needle, answer)


def test_through_the_registry_with_the_judged_answer_as_context():
    tool = get_tool("Answer.mentions")
    assert get_tool("answer_mentions") is tool
    right = call_tool("Answer.mentions", "Tuesday", {"question": "q", "answer": "2015-03-24 is Tuesday"})
    wrong = call_tool("Answer.mentions", "Tuesday", {"question": "q", "answer": "2015-03-24 is Sunday"})
    assert (right.ok, right.output, wrong.ok, wrong.output) == (True, "yes", True, "no")


@pytest.mark.parametrize("inp, ctx, message", [
    ("Tuesday", None, "context\\['answer'\\]"),
    ("Tuesday", {"answer": 3}, "context\\['answer'\\]"),
    ("  ''  ", {"answer": "x"}, "needs the text to look for"),
    ("x" * (MAX_INPUT_CHARS + 1), {"answer": "x"}, f"at most {MAX_INPUT_CHARS}"),
])
def test_bad_calls_are_failed_results_with_a_message(inp, ctx, message):
    res = call_tool("Answer.mentions", inp, ctx)
    assert not res.ok and res.output == "" and re.search(message, res.error)


def test_each_side_of_a_tara_pair_gives_the_tool_its_own_answer():
    """A TARA item's tool context (what evaluation passes; ThemisRewardModel.score passes the same keys, the
    row's question and its completion) carries the answer being scored, not the other side of the pair."""
    from align.rewards.tara import TaraAnswer, TaraItem

    item = TaraItem("x", "calendar", "What day is 2015-03-24?", TaraAnswer("2015-03-24 is Tuesday", 1.0, (), ""),
                    TaraAnswer("2015-03-24 is Sunday", -1.0, (), ""))
    outs = [get_tool("Answer.mentions")("Tuesday", item.as_context(side)).output for side in ("pos", "neg")]
    assert outs == ["yes", "no"]
