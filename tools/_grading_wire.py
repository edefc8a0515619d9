"""The sandbox side of "outside" grading: the child writes a test expression's value as plain data text (or
refuses it); the zygote reads the result lines back.

Standalone and stdlib-only: the zygote (`tools/_zygote.py`) loads it from its own folder before it forks, so
it also works inside bwrap, where it is bound next to the zygote. It runs in the same interpreter as the
untrusted program, so the program can patch it or write this text itself: that is fine by construction,
because the text carries only a value (what the program could return anyway) and the expected value it is
compared with never enters the sandbox (see `tools/grading.py` and docs/security.md, "Threat model").

Plain data (exactly what `align.tools.grading.decode` accepts): None, bool, int, float (nan / inf included),
str, bytes, list, tuple, dict (any plain keys), set / frozenset (both sent as a set), nested up to MAX_DEPTH.
A value of a *subclass* of one of these (collections.Counter, namedtuple, an int subclass) is sent as the data
stored in its plain base, read with the base class's own methods: its overridden methods (`__eq__`,
`__iter__`, `__hash__`, ...) are never called, so an "always equal" subclass is graded by what it holds.
Anything else (an object with a custom `__eq__`, a generator, a function) is not plain data: the test fails.
"""
import json

MAX_DEPTH = 100
MAX_TEXT = 256 * 1024  # one value's text; the result pipe holds 1 MiB for all tests of a run


def _refused(reason):  # a plain ValueError: this standalone file defines no exception classes of its own
    return ValueError("not plain data: " + reason)


def _plain(v, depth):
    if depth > MAX_DEPTH:
        raise _refused(f"nested deeper than {MAX_DEPTH}")
    t = type(v)  # the real type: a `__class__` property cannot change it
    if v is None or t is bool:
        return v
    if issubclass(t, int):
        return int.__index__(v)  # the stored int (an exact int, even for a subclass)
    if issubclass(t, float):
        return float.__float__(v)
    if issubclass(t, str):
        return str.__str__(v)
    if issubclass(t, bytes):
        return {"bytes": bytes.hex(v)}
    if issubclass(t, list):
        return [_plain(x, depth + 1) for x in list.copy(v)]
    if issubclass(t, tuple):
        return {"tuple": [_plain(x, depth + 1) for x in tuple.__getitem__(v, slice(None))]}
    if issubclass(t, dict):
        return {"dict": [[_plain(k, depth + 1), _plain(x, depth + 1)] for k, x in dict.items(v)]}
    if issubclass(t, set):
        return {"set": [_plain(x, depth + 1) for x in set.__iter__(v)]}
    if issubclass(t, frozenset):
        return {"set": [_plain(x, depth + 1) for x in frozenset.__iter__(v)]}
    raise _refused(f"the value is a {type.__repr__(t)[:120]}")


def encode(value):
    """The value as plain-data JSON text (tuples / sets / dicts / bytes tagged); raises ValueError ("not plain
    data: ...") for anything else. The harness reports the message as the test's failure reason."""
    try:
        text = json.dumps(_plain(value, 0), allow_nan=True, separators=(",", ":"))
    except (ValueError, RecursionError, MemoryError) as exc:  # e.g. an int past Python's 4300-digit str limit
        if str(exc).startswith("not plain data"):
            raise
        raise _refused(f"{type(exc).__name__}: {exc}"[:200]) from None
    if len(text) > MAX_TEXT:
        raise _refused(f"the value is {len(text)} bytes as text (limit {MAX_TEXT})")
    return text


def parse_results(text, token):
    """The harness's lines on the result pipe. The program can write there too (it shares the interpreter), so
    a malformed line is skipped, never an error of the run; forged lines gain nothing (docs/security.md)."""
    program_error, results, values, finished = None, {}, {}, False
    for line in text.splitlines():
        parts = line.split(" ", 4)
        if len(parts) < 3 or parts[0] != token:
            continue  # not from the harness
        try:
            if parts[1] == "program":
                why = json.loads(line.split(" ", 2)[2])
                program_error = why if why is None or isinstance(why, str) else str(why)
            elif parts[1] == "test" and len(parts) == 5:
                why = json.loads(parts[4])
                results[int(parts[2])] = (parts[3] == "1", why if why is None or isinstance(why, str) else str(why))
            elif parts[1] == "value" and len(parts) >= 4:
                values[int(parts[2])] = line.split(" ", 3)[3]  # plain-data text, decoded and compared outside
            elif parts[1] == "done":
                finished = True
        except ValueError:
            continue
    return program_error, results, values, finished
