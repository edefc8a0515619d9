"""Calculator child process: JSON lines in, JSON lines out. Started and killed by `align.tools.calculator`.

Run as `python -I -m align.tools._calc_worker`: isolated mode puts neither the working directory nor a script
folder on sys.path, so no top-level `tools` (ours or a PyPI one) can be imported by accident; importing
`align.tools` loads no torch (align's namespace is lazy).
"""
import json
import os
import resource
import sys

sys.setrecursionlimit(2000)

import sympy  # noqa: E402,F401  (warm import before the first request)

from align.tools.calc_eval import CalcError, CalcLimits, evaluate, format_sympy, themis_verdict  # noqa: E402


def handle(req: dict) -> dict:
    limits = CalcLimits(**req.get("limits", {}))
    try:
        if req["op"] == "themis":
            return {"ok": True, "output": themis_verdict(req["input"], req.get("reference"), limits)}
        value = evaluate(req["input"], req.get("backend", "sympy"), limits)
        text = format_sympy(value) if req.get("backend", "sympy") == "sympy" else repr(value)
        if len(text) > 20_000:
            raise CalcError("result too long to print")
        return {"ok": True, "output": text}
    except CalcError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # never let one input take the worker down
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    mem = int(os.environ.get("ALIGN_CALC_MEMORY_MB", "1024")) * 1024 * 1024
    try:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    except (ValueError, OSError):
        pass
    out = sys.stdout
    sys.stdout = open(os.devnull, "w")  # stray prints must not corrupt the protocol
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            resp = handle(json.loads(line))
        except MemoryError:
            resp = {"ok": False, "error": "out of memory"}
        out.write(json.dumps(resp) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
