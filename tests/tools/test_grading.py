"""Honest grading rules (align.tools.grading): which tests are graded outside the sandbox, what plain data is,
and the comparison rule, each checked against hand-written expectations (CPython's own `assert` verdict on the
same plain value), then end to end through the sandbox."""
from __future__ import annotations

import json
import math

import pytest

from align.tools import _grading_wire as wire
from align.tools.grading import IN_SANDBOX, OUTSIDE, decode, grade, plan
from align.tools.sandbox import Sandbox, SandboxConfig, detect_isolation


@pytest.mark.parametrize("test, expr, check", [
    ("assert add(1, 2) == 3", "add(1, 2)", "eq"),
    ("assert 3 == add(1, 2)", "add(1, 2)", "eq"),
    ("assert add(1, 2) == 3, 'sum'", "add(1, 2)", "eq"),
    ("assert add(1, 2) != 4", "add(1, 2)", "ne"),
    ("assert f(x=[1, (2, 3)], y={'a': -1.5}) == {1, 2}", "f(x=[1, (2, 3)], y={'a': -1.5})", "eq"),
    ("assert set(similar((3, 4), (4, 5))) == set((4,))", "set(similar((3, 4), (4, 5)))", "eq"),
    ("assert sorted(f(x)) == [1, 2]", "sorted(f(x))", "eq"),
    ("assert Solution().two_sum([2, 7], 9) == [0, 1]", "Solution().two_sum([2, 7], 9)", "eq"),
    ("assert f('ab')[0] == 'a'", "f('ab')[0]", "eq"),
    ("assert f('abc')[1:] == 'bc'", "f('abc')[1:]", "eq"),
    ("assert answer == 42", "answer", "eq"),
    ("assert f(1) is None", "f(1)", "is"),
    ("assert f(1) is not None", "f(1)", "is_not"),
    ("assert is_prime(7)", "is_prime(7)", "truthy"),
    ("assert not is_prime(8)", "is_prime(8)", "falsy"),
    ("assert is_prime(7) == True", "is_prime(7)", "eq"),
    ("assert math.isclose(area(2), 12.56, rel_tol=0.001)", "area(2)", "isclose"),
    ("assert f(1) == float('inf')", "f(1)", "eq"),
])
def test_honest_forms_are_graded_outside_and_only_the_expression_goes_in(test, expr, check):
    p = plan(test)
    assert (p.mode, p.expr, p.check) == (OUTSIDE, expr, check)
    assert p.wire() == {"eval": expr}


@pytest.mark.parametrize("test", [
    "assert abs(f(1) - 1.5) < 1e-6",               # the comparison is not ==
    "assert f(1) == g(2)",                         # no literal side: the expected value would be computed inside
    "assert (f(1) == 3) == True",                  # the real expectation (3) sits inside the expression
    "assert isinstance(f(1), int)",                # a builtin predicate: __class__ could fool it
    "assert operator.eq(f(1), 3)",                 # a comparator that would call the program's __eq__
    "assert f(1).startswith('ab')",                # a method of the program's object decides a truth value
    "assert answer",                               # a truth value that is not the function under test's
    "assert f(1).x == 3",                          # attribute access: not a call
    "assert f(1) == 3 and f(2) == 4",
    "assert f(lambda x: x > 1) == [2]",
    "assert f([i for i in range(3)]) == 3",
    "x = f(1)\nassert x == 3",                     # two statements
    "for i in range(3): assert f(i) == i",
    "f(1)",                                        # not an assert
    "assert f(1) == 3, msg",                       # message not a literal string
    "assert f(1) ==",                              # not Python
    "def check(candidate):\n    assert candidate(1) == 2",
])
def test_other_forms_run_in_the_weaker_mode_with_a_reason(test):
    p = plan(test)
    assert p.mode == IN_SANDBOX and p.why
    assert p.wire() == test  # exactly the statement, as before


# (test, value the child sent as plain-data text, CPython's verdict for `assert <that value> <op> <literal>`)
RULES = [
    ("assert f() == 3", "3", True),
    ("assert f() == 3", "3.0", True),                            # 3 == 3.0
    ("assert f() == 1", "true", True),                           # True == 1 in Python
    ("assert f() == 3", '"3"', False),
    ("assert f() == 0.3", "0.30000000000000004", False),         # 0.1 + 0.2: no tolerance is added
    ("assert f() == 0.5", "0.5", True),
    ("assert f() == -0.0", "0.0", True),
    ("assert f() == (1, 2)", "[1,2]", False),                    # a list is not a tuple
    ("assert f() == [1, 2]", '{"tuple":[1,2]}', False),
    ("assert f() == (1, [2])", '{"tuple":[1,[2]]}', True),
    ("assert f() == {1: 'a', 'b': (2,)}", '{"dict":[["b",{"tuple":[2]}],[1,"a"]]}', True),
    ("assert f() == {1, 2}", '{"set":[2,1]}', True),
    ("assert f() == set()", '{"set":[]}', True),
    ("assert f() == {}", '{"set":[]}', False),                   # {} is a dict
    ("assert f() == b'ab'", '{"bytes":"6162"}', True),
    ("assert f() == float('nan')", "NaN", False),                # nan != nan
    ("assert f() != 3", "NaN", True),
    ("assert f() == float('inf')", "Infinity", True),
    ("assert f() == 12345678901234567890", "12345678901234567890", True),
    ("assert f() is None", "null", True),
    ("assert f() is None", "0", False),
    ("assert f() is not None", "0", True),
    ("assert is_ok()", "[0]", True),                             # truthiness of plain data
    ("assert is_ok()", "[]", False),
    ("assert not is_ok()", '""', True),
    ("assert not is_ok()", "0.0", True),
    ("assert math.isclose(f(), 1.0, rel_tol=1e-3)", "1.0009", True),
    ("assert math.isclose(f(), 1.0, rel_tol=1e-3)", "1.0011", False),
    ("assert math.isclose(1.0, f(), abs_tol=0.5)", "1.4", True),
    ("assert math.isclose(f(), 1.0)", '"1.0"', False),           # a str is not a number
]


@pytest.mark.parametrize("test, value, verdict", RULES)
def test_comparison_rule_matches_cpython_on_plain_values(test, value, verdict):
    assert grade(plan(test), value)[0] is verdict


def test_the_mismatch_reason_is_the_asserts_own_message():
    assert grade(plan("assert f() == 3, 'wrong sum'"), "4") == (False, "wrong sum")
    assert grade(plan("assert f() == 3"), "4") == (False, "")
    assert grade(plan("assert f() == 3"), "3") == (True, None)


@pytest.mark.parametrize("text", [
    '{"tuple":[1],"set":[]}',            # two tags
    '{"obj":[1]}',                       # unknown tag
    '{"a":1}',                           # a bare JSON object is not a dict encoding
    '{"set":[[1]]}',                     # unhashable set member
    '{"dict":[[[1],2]]}',                # unhashable key
    '{"dict":[[1]]}',                    # not a pair
    '{"bytes":"zz"}',
    "[" * 5000 + "]" * 5000,             # deeper than any recursion limit
    "not json",
    "3 4",
    "",
])
def test_anything_but_the_plain_data_encoding_is_refused(text):
    with pytest.raises(ValueError):
        decode(text)
    assert grade(plan("assert f() == 3"), text)[0] is False


def test_child_encoding_reads_subclasses_through_their_plain_base_and_refuses_other_objects():
    import collections

    class AlwaysEq(int):
        def __eq__(self, other):
            return True

        def __index__(self):
            return 99

    class Lying(list):
        def __iter__(self):
            return iter([1, 2, 3])

    class FakeClass:
        __class__ = property(lambda self: int)

    assert decode(wire.encode(AlwaysEq(0))) == 0 and type(decode(wire.encode(AlwaysEq(0)))) is int
    assert decode(wire.encode(Lying([7]))) == [7]
    assert decode(wire.encode(collections.Counter("aab"))) == {"a": 2, "b": 1}
    assert decode(wire.encode(collections.namedtuple("P", "x y")(1, 2))) == (1, 2)
    assert decode(wire.encode(frozenset({1}))) == {1}
    assert decode(wire.encode((1, [2.5, None], {"k": b"\x00"}))) == (1, [2.5, None], {"k": b"\x00"})
    assert math.isnan(decode(wire.encode(float("nan"))))
    cyclic = []
    cyclic.append(cyclic)
    for bad in (object(), FakeClass(), (i for i in ()), len, 10 ** 5000, cyclic, "x" * (wire.MAX_TEXT + 1)):
        with pytest.raises(ValueError, match="^not plain data"):
            wire.encode(bad)


def test_result_lines_that_do_not_parse_are_skipped_not_errors():
    tok = "t0k"
    text = "\n".join([f"{tok} program null", f"{tok} value x 3", f"{tok} test 0 1 {{bad", f"{tok} value 1 [1]",
                      f"{tok} test 2 0 {json.dumps({'a': 1})}", "other value 0 5", f"{tok} done null"])
    program_error, results, values, finished = wire.parse_results(text, tok)
    assert (program_error, values, finished) == (None, {1: "[1]"}, True)
    assert results == {2: (False, "{'a': 1}")}


TIER = detect_isolation("bwrap")


@pytest.fixture(scope="module")
def box():
    if TIER == "none":
        pytest.skip("no sandbox tier starts on this machine")
    sb = Sandbox(SandboxConfig(timeout_s=3, memory_mb=512, workers=1))
    yield sb
    sb.close()


def test_modes_and_values_are_reported_per_test(box):
    code = "import collections\ndef f(x):\n    return collections.Counter(x)\ndef g(x):\n    return (x, [x])"
    res = box.run(code, ["assert f('aab') == {'a': 2, 'b': 1}", "assert g(1) == (1, [1])", "assert g(1) == [1, [1]]",
                         "assert len(f('ab')) < 3"])
    assert [(t.ok, t.grading) for t in res.tests] == [(True, OUTSIDE), (True, OUTSIDE), (False, OUTSIDE),
                                                      (True, IN_SANDBOX)]
    assert res.tests[1].value == '{"tuple":[1,[1]]}'
    assert res.grading == "mixed" and res.in_sandbox_tests == 1
    assert box.run(code, ["assert g(2) == (2, [2])"]).grading == OUTSIDE


def test_outside_tests_keep_errors_timeouts_and_the_per_test_timeout(box):
    code = "def f(x):\n    if x == 0:\n        raise ValueError('zero')\n    while x == 1:\n        pass\n    return x"
    res = box.run(code, ["assert f(0) == 0", "assert f(1) == 1", "assert f(2) == 2", "assert g(2) == 2"],
                  per_test_timeout_s=0.3)
    assert [(t.ok, t.error) for t in res.tests] == [(False, "zero"), (False, "timed out"), (True, None),
                                                     (False, "name 'g' is not defined")]
    res = box.run("def f():\n    return object()", ["assert f() == 1"])
    assert not res.tests[0].ok and res.tests[0].error.startswith("not plain data")
