"""Registry, calendar, trace format, executor, HTTP backends (against a local server) and local search."""
from __future__ import annotations

import asyncio
import calendar as pycal
import json
import pickle
import threading
import time
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align import tools
from align.tools.http_client import HTTPConfig
from align.tools.trace import ToolCall, parse_action, parse_trace, render_trace

THEMIS_NAMES = ["calculator", "code_run", "Calendar.week_day", "Calendar.day_difference", "Calendar.target_day",
                "history_weather", "translate", "google_serper", "wiki_search"]


def test_registry_resolves_themis_names_and_aliases():
    for name in THEMIS_NAMES:
        assert tools.get_tool(name).name == name
    assert tools.get_tool("week_day") is tools.get_tool("Calendar.week_day")
    with pytest.raises(tools.UnknownNameError, match="did you mean 'calculator'"):
        tools.get_tool("calculater")
    res = tools.call_tool("no_such_tool", "x")
    assert not res.ok and "unknown tool" in res.error


def test_register_tool_function_and_pickle():
    tools.register_tool("echo_upper_test", lambda s, ctx: s.upper(), overwrite=True)
    assert tools.get_tool("echo_upper_test")("abc").output == "ABC"
    for name in THEMIS_NAMES:
        clone = pickle.loads(pickle.dumps(tools.get_tool(name)))
        assert clone.name == name


def test_calendar_against_stdlib_reference():
    d = date(2015, 3, 24)
    assert tools.get_tool("Calendar.week_day")("2015-03-24").output == pycal.day_name[d.weekday()] == "Tuesday"
    assert tools.get_tool("Calendar.day_difference")("2020-06-10, 2000-01-10").output == str(
        (date(2020, 6, 10) - date(2000, 1, 10)).days)
    assert tools.get_tool("Calendar.target_day")("2023-06-01, 12").output == "2023-06-13"
    assert tools.get_tool("Calendar.target_day")("2024-03-01, -1").output == "2024-02-29"  # leap year
    for bad in ["", "2023-13-01", "tomorrow", "2023-06-01, x", "9999-12-31, 5", "2023-06-01, 1e99"]:
        tool = tools.get_tool("Calendar.target_day" if "," in bad else "Calendar.week_day")
        r = tool(bad)
        assert not r.ok and r.error


TRACE = ("<start_tool> Thought: I need the date.\nAction: Calendar.target_day\nAction Input: 2023-06-01, 12\n"
         "<start_observation> Observation: 2023-06-13\n"
         "<start_tool> Thought: Now the weather.\nAction: history_weather\nAction Input: Anyang, 2023-06-13\n"
         "<start_observation> Observation: The weather for Anyang on 2023-06-13 is: \nsunny\n"
         "<start_work> Work: The answer matches.</s>")


def test_render_then_parse_round_trip():
    calls = [ToolCall("Calendar.target_day", "2023-06-01, 12", "I need the date.", "2023-06-13"),
             ToolCall("history_weather", "Anyang, 2023-06-13", "Now the weather.",
                      "The weather for Anyang on 2023-06-13 is: \nsunny")]
    text = render_trace(calls, "The answer matches.")
    assert text + "</s>" == TRACE
    parsed = parse_trace(TRACE)
    assert parsed.calls == calls and parsed.rationale == "The answer matches."
    assert render_trace([]) == "Thought: Do I need to use a tool? No\nFinished.\n"
    assert parse_trace(render_trace([])).finished and parse_trace(render_trace([])).calls == []


@pytest.mark.parametrize("slip,expected", [
    ("Thought: x\nAction: calculator\nAction Input: <<2*3=6>>6", ("calculator", "<<2*3=6>>6")),
    ("Thought:x\nAction 1:  calculator \n\nAction 1 Input:  1+1  \n", ("calculator", "1+1")),
    ("Action: `wiki_search` Action Input: Paris", ("wiki_search", "Paris")),
    ("<start_tool>Thought: t\nAction:translate\nAction Input:Hola<start_observation>", ("translate", "Hola")),
    ("Thought: t\nAction: code_run\nAction Input: Same as the answer", ("code_run", "Same as the answer")),
])
def test_parse_action_tolerates_slips(slip, expected):
    assert parse_action(slip) == expected


def test_parse_action_none_when_done_or_answered():
    assert parse_action("Thought: Do I need to use a tool? No\nFinished.") is None
    assert parse_action("Thought: a\nAction: x\nAction Input: y\nObservation: z\n") is None
    assert parse_action(12) is None  # type: ignore[arg-type]


def _slow(s, ctx):
    time.sleep(float(s))
    return "slept"


def test_executor_concurrency_timeout_and_cache():
    tools.register_tool("sleep_test", _slow, overwrite=True)
    with tools.ToolExecutor(max_workers=4, timeout_s=0.5, cache=True) as ex:
        t0 = time.monotonic()
        res = ex.run_batch([("sleep_test", "0.3"), ("sleep_test", "0.3"), ("sleep_test", "0.3"),
                            ("sleep_test", "5"), ("Calendar.week_day", "2015-03-24"), ("nope", "x")])
        elapsed = time.monotonic() - t0
        assert elapsed < 1.5  # 3 x 0.3 s in parallel, the 5 s call cut at 0.5 s
        assert [r.ok for r in res] == [True, True, True, False, True, False]
        assert res[3].error.startswith("timeout") and res[4].output == "Tuesday"
        again = ex.run_batch([("week_day", "2015-03-24")])  # alias hits the canonical cache entry
        assert again[0].output == "Tuesday" and ex.cache.hits == 1
        out = asyncio.run(ex.arun_batch([tools.Call("Calendar.day_difference", "2020-01-01, 2020-01-31")]))
        assert out[0].output == "30"


class _Handler(BaseHTTPRequestHandler):
    calls = {"n": 0}

    def log_message(self, *a):
        pass

    def _reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        _Handler.calls["n"] += 1
        if self.path.startswith("/flaky") and _Handler.calls["n"] % 2 == 1:
            return self._reply(503, {"error": "busy"})
        if self.path.startswith("/weather") or self.path.startswith("/flaky"):
            day = {"condition": {"text": "Sunny"}, "avgtemp_c": 29.3, "maxwind_kph": 15.1, "maxwind_mph": 9.4,
                   "totalprecip_mm": 0.0, "totalprecip_in": 0.0, "avgvis_km": 10.0, "avgvis_miles": 6.0,
                   "avghumidity": 32.0, "uv": 9.0}
            return self._reply(200, {"forecast": {"forecastday": [{"day": day}]}})
        if self.path.startswith("/search"):
            return self._reply(200, {"topk": [{"text": "Paris | capital of France"}]})
        self._reply(404, {})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        req = json.loads(self.rfile.read(n))
        if self.path.startswith("/translate"):
            return self._reply(200, {"translatedText": f"EN({req['q']})"})
        if self.path.startswith("/serper"):
            assert self.headers["X-API-KEY"] == "k"
            return self._reply(200, {"organic": [{"snippet": "a"}, {"snippet": "b", "attributes": {"x": 1}}]})
        self._reply(404, {})


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_backends_against_local_server(server):
    w = tools.HistoryWeather(cache={}, http=HTTPConfig(url=server + "/weather", api_key="k", timeout_s=2))
    out = w("Anyang, 2023-06-13").output
    assert out == ("The weather for Anyang on 2023-06-13 is: \noverall weather: Sunny; temperature: 29.3(C); "
                   "wind speed: 15.1(kph), 9.4(mph); precipitation: 0.0(mm), 0.0(inch); visibility: 10.0(km), "
                   "6.0(miles); humidity: 32.0; UV index: 9.0.")
    flaky = tools.HistoryWeather(cache={}, http=HTTPConfig(url=server + "/flaky", api_key="k", backoff_s=0.01))
    assert flaky("Anyang, 2023-06-13").ok  # first answer 503, retried
    tr = tools.Translate(cache={}, http=HTTPConfig(url=server + "/translate"))
    assert tr("Hola").output == "EN(Hola)"
    sp = tools.GoogleSerper(http=HTTPConfig(url=server + "/serper", api_key="k"))
    assert sp("q").output == "a b x: 1."
    wk = tools.WikiSearch(http=HTTPConfig(url=server + "/search"))
    assert wk("Paris").output == "Paris | capital of France"


def test_backend_down_is_an_explicit_error():
    dead = HTTPConfig(url="http://127.0.0.1:9/x", api_key="k", retries=1, backoff_s=0.0, timeout_s=0.5)
    res = tools.HistoryWeather(cache={}, http=dead)("Paris, 2023-01-01")
    assert not res.ok and "unreachable" in res.error
    assert not tools.GoogleSerper(http=HTTPConfig(key_env="NO_SUCH_KEY_ENV"))("q").ok
    assert not tools.WikiSearch()("q").ok


def test_local_bm25_search():
    docs = ["Paris is the capital of France", "Berlin is the capital of Germany", "Bananas are yellow"]
    ws = tools.WikiSearch(corpus=docs)
    assert ws("capital Germany").output == docs[1]
    assert ws("yellow fruit bananas").output == docs[2]
    assert not ws("zzzz qqqq").ok


def test_tara_dir_explicit_root_env_var_or_one_line_error(tmp_path, monkeypatch):
    from align.errors import UserError
    from align.tools.data import optional_tara_dir, tara_dir

    monkeypatch.delenv("ALIGN_TARA_DIR", raising=False)
    with pytest.raises(UserError) as err:
        tara_dir()
    msg = str(err.value)
    assert "\n" not in msg and "pass root=..." in msg and "ALIGN_TARA_DIR=/path/to/tara" in msg
    assert optional_tara_dir() is None
    assert tara_dir(tmp_path) == tmp_path  # an explicit root wins
    with pytest.raises(UserError, match="is not a folder.*pass root=.*ALIGN_TARA_DIR"):
        tara_dir(tmp_path / "missing")
    monkeypatch.setenv("ALIGN_TARA_DIR", str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"\$ALIGN_TARA_DIR=.*missing is not a folder"):
        tara_dir()
    monkeypatch.setenv("ALIGN_TARA_DIR", str(tmp_path))
    assert tara_dir() == tmp_path and optional_tara_dir() == tmp_path
    # the tools' default caches fall back (to their HTTP backends) instead of raising without the data
    monkeypatch.delenv("ALIGN_TARA_DIR")
    assert tools.HistoryWeather()._cache() == {}
