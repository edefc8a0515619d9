"""Themis traces in the rollout engine, token-in token-out, through the tool-episode loop (docs/rewards.md#themis).

One trace per (question, answer, context):
1. The prompt `### USER:\\n[Context: c\\n]Question: q\\nAnswer: a\\n### ASSISTANT:\\n` is encoded once (BOS
   included, as `encode_themis` encodes training text).
2. Tool phase: `align.rollouts.episodes.generate_episodes`, greedy, `ThemisFormat` with the released pause
   (the row stops at the `<start_observation>` token, the call `Action: name / Action Input: input` runs,
   " Observation: {output}\\n" is appended as ids, the row resumes). The calls of every paused row run
   concurrently on a bounded pool with per-call timeouts (`CallRunner`); each tool gets the sample's columns
   as its context (align.tools protocol `tool(input, context=sample)`). `max_rounds` is the episode's call budget (`max_tool_calls`,
   `max_turns = max_rounds + 1`).
3. The released ending: a trace that stops without a rationale (EOS after "Finished", the token budget, a
   call beyond `max_rounds`, whose observation then says so) gets `<start_work>` appended and the model writes
   the rationale (greedy, `max_new_tokens`, no tools); a trace that still has no EOS gets one appended.
4. The value head scores the final EOS of exactly these ids (prompt + generated + appended), never a string
   re-tokenised; `max_length` keeps the last that many ids (the EOS carries the score, as in training).
   Without a rationale (`rationale=False`, a model trained with omega = 0, the released `--no_work`) step 3
   is replaced: the trace ends where its last observation's output ends, as that training text does (the
   loop's newline after it and whatever the model wrote next are dropped), and the EOS is appended there.

Everything a tool returns is hostile: it is tokenised with special tokens split (an observation holding
`<start_work>` or `</s>` yields ordinary characters), cut at `max_observation_tokens`, and a tool that
raises, hangs past `tool_timeout_s`, is unknown or gets a malformed call ends as an observation that says so
(`Error: ...`); the record in `Trace.tool_calls` says ok=False and why.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from align.rollouts.batch import (
    STOP_EOS,
    STOP_LENGTH,
    STOP_MAX_LENGTH,
    STOP_MAX_TOOL_CALLS,
    STOP_MAX_TURNS,
    STOP_REASONS,
)
from align.rollouts.engine import RolloutEngine
from align.rollouts.environment import CallRunner
from align.rollouts.episodes import EpisodeLimits, generate_episodes
from align.rollouts.params import SamplingParams
from align.rollouts.tool_formats import ParsedCall, ThemisFormat, encode_observation
from align.tools.trace import ACTION_RE, START_OBSERVATION, START_WORK

# The rationale marker as the tool phase sees it: its decoded text drops special tokens, so "Work:" is what is left
_RATIONALE_TEXT = re.compile(r"\bWork\s*:")
# Trace.stop_reason values
STOP_TRACE_EOS = "eos"              # the model wrote the rationale and its EOS itself
STOP_TRACE_FORCED = "forced_rationale"  # the trace ended without a rationale; <start_work> was appended
STOP_TRACE_TOOL_BUDGET = "tool_budget"  # a call beyond max_rounds; its observation says so, then <start_work>
STOP_TRACE_LENGTH = "length"        # a token budget ran out; the EOS was appended
STOP_TRACE_OBSERVATION = "observation"  # no rationale: cut after the last observation, the EOS appended there


class _Accepted(str):
    """The output of a call the tool accepted. The runner's own failure texts (raise, timeout, malformed call)
    are plain strings, so whether a call succeeded is read off the type, never off hostile text."""


def tool_getter(tools: Mapping[str, Callable] | Callable[[str], Callable] | None) -> Callable[[str], Callable]:
    """name -> tool for `tools`: None (align.tools' registry, aliases included), a {name: tool} mapping, or a
    callable name -> tool (raising KeyError for an unknown name)."""
    if tools is None:
        from align.tools import get_tool

        return get_tool
    if isinstance(tools, Mapping):
        def from_map(name: str):
            if name not in tools:
                raise KeyError(name)
            return tools[name]
        return from_map
    return tools


def released_input(text: str) -> str:
    """The released parser's clean-up of an Action Input (align.tools.trace.parse_action_block): surrounding
    spaces and double quotes go, except for SQL ('SELECT ...')."""
    text = text.strip(" ").strip()
    return text if text.startswith("SELECT ") else text.strip('"')


@dataclass
class _Sample:
    context: dict[str, Any]
    calls: list[dict[str, Any]] = field(default_factory=list)


class ThemisToolEnvironment:
    """`align.rollouts.environment.Environment` over align.tools for Themis: the call's tool by name (unknown ->
    an observation saying so), its input cleaned as the released parser does, the sample's columns as context.
    A tool is `tool(input, context=dict) -> ToolResult(ok, output, error, latency_s)`."""

    def __init__(self, tools: Any = None, max_output_chars: int = 1 << 20):
        self.get = tool_getter(tools)
        self.max_output_chars = max_output_chars

    def tool_schemas(self) -> list[dict]:
        return []  # Themis learned its tools from the traces; nothing goes into the prompt

    def reset(self, sample: dict) -> _Sample:
        return _Sample(dict(sample))

    def step(self, state: _Sample, call: ParsedCall, messages: list[dict]) -> str:
        try:
            tool = self.get(call.name)
        except KeyError:  # includes align.tools' UnknownNameError
            return f"Error: unknown tool {call.name!r}; the call was not run."
        result = tool(released_input(call.arguments["input"]), context=state.context)
        if not result.ok:
            return f"Error: the tool {call.name!r} failed: {result.error}"
        out = str(result.output or "")
        if len(out) > self.max_output_chars:  # the cap is ours, so the output stays marked as accepted
            out = out[:self.max_output_chars] + f"\n[tool output cut at {self.max_output_chars} of {len(out)} characters]"
        return _Accepted(out)


class _RecordingRunner(CallRunner):
    """CallRunner that also writes each call's record into its sample's state (in call order: a Themis row
    makes one call per pause, and pauses are sequential)."""

    def run(self, jobs):
        outs = super().run(jobs)
        for (env, state, call, messages), out in zip(jobs, outs):
            ok = isinstance(out, _Accepted)
            state.calls.append({
                "action": call.name if call.error is None else None,
                "input": released_input(call.arguments["input"]) if call.error is None else call.raw,
                "ok": ok, "error": None if ok else out})
        return outs


class _TraceFormat(ThemisFormat):
    """ThemisFormat with the released Themis pause: the row stops at the `<start_observation>` token (a stop
    token, so a model trained with the observation text masked, `beta = 0`, still pauses), and the loop writes
    " Observation: {output}\n". The output keeps its leading space (" Monday" is one token where training text
    has it so: no tokenisation the model never saw); a rationale that writes `<start_observation>` is no call."""

    stop: list[str] = []

    def wants_call(self, text: str, ended_by_stop: bool) -> bool:
        return ended_by_stop and not _RATIONALE_TEXT.search(text)

    def observation(self, outputs: list[tuple[str, str]], last_token_text: str, max_tokens: int):
        ids, shown = encode_observation(self.tokenizer, [(" Observation:", False), (" " + outputs[0][1], True),
                                                         ("\n", False)], max_tokens)
        return ids, [s[1:] if s.startswith(" ") else s for s in shown]  # the text as the tool wrote it


@dataclass
class Trace:
    """One finished trace: prompt ids, the response ids (generated and appended, ending with the scored EOS),
    the tool call records and how it ended (one of the STOP_TRACE_* values)."""

    prompt_ids: list[int]
    ids: list[int]
    tool_calls: list[dict[str, Any]]
    stop_reason: str
    episode_stop: str  # the tool phase's stop reason (align.rollouts.batch.STOP_REASONS)


class ThemisTracer:
    """Runs the traces of a batch; see the module docstring. `lm` is the Themis causal LM (ThemisModel.lm)."""

    def __init__(self, lm: torch.nn.Module, tokenizer, *, tools: Any = None, max_rounds: int = 3,
                 max_new_tokens: int = 128, max_observation_tokens: int = 256, batch_size: int = 8,
                 max_workers: int = 8, tool_timeout_s: float = 30.0, rationale: bool = True):
        if tokenizer.eos_token_id is None:
            raise ValueError("Themis needs a tokenizer with an EOS token: the value head scores the final EOS")
        self.tokenizer, self.max_rounds, self.max_new_tokens = tokenizer, max_rounds, max_new_tokens
        self.rationale = rationale
        self.engine = RolloutEngine(lm, tokenizer, micro_batch_size=batch_size, gate_top_k=0)
        self.env = ThemisToolEnvironment(tools)
        self.fmt = _TraceFormat(tokenizer, action_re=ACTION_RE)
        # a call in turn max_rounds + 1 is not run (STOP_MAX_TURNS): exactly max_rounds calls, also for 0
        # without a rationale nothing after the last allowed call's observation is scored: the episode ends there
        self.limits = EpisodeLimits(max_turns=max_rounds + 1, max_tool_calls=max(1, max_rounds),
                                    max_observation_tokens=max_observation_tokens,
                                    end_at_max_tool_calls=not rationale and max_rounds >= 1)
        self.max_workers, self.tool_timeout_s = max_workers, tool_timeout_s
        self.eos = tokenizer.eos_token_id
        if not {START_WORK, START_OBSERVATION} <= set(tokenizer.get_vocab()):
            raise ValueError("the tokenizer lacks the Themis tokens; add them with align.rewards.themis.add_themis_tokens")
        self.work_id = tokenizer.convert_tokens_to_ids(START_WORK)
        self.newline_ids = self._ids("\n")  # the observation's own closing "\n" piece (encode_observation), same ids
        self.observation_id = tokenizer.convert_tokens_to_ids(START_OBSERVATION)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids  # our own markers: special tokens parse

    def run(self, prompts: list[str], samples: list[dict[str, Any]]) -> list[Trace]:
        """prompts: the rendered USER part + '### ASSISTANT:\\n'; samples: each one's tool context."""
        columns = {"_sample": list(samples)}
        env = _SampleEnv(self.env)
        # the tool phase may use max_new_tokens per round (policy + observation tokens together)
        params = SamplingParams(max_new_tokens=self.max_new_tokens * (self.max_rounds + 1), temperature=0.0,
                                stop_token_ids=[self.observation_id])
        runner = _RecordingRunner(self.max_workers, self.tool_timeout_s, max_output_chars=2 * self.env.max_output_chars)
        try:
            batch = generate_episodes(self.engine, prompts, params, self.fmt, env, self.limits, runner=runner,
                                      columns=columns)
        finally:
            runner.close()
        traces: list[Trace] = []
        for i in range(len(prompts)):
            prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
            valid = batch.mask[i].bool()
            ids = batch.response_ids[i][valid].tolist()
            shown = [m["content"] for m in batch.columns["trajectory"][i] if m["role"] == "tool"]
            if self.rationale:
                traces.append(self._close(prompt, ids, int(batch.stop_reason[i]), env.states[i], shown))
            else:
                observed = batch.tool_mask[i][valid].tolist() if batch.tool_mask is not None else [False] * len(ids)
                traces.append(self._close_at_observation(prompt, ids, observed, int(batch.stop_reason[i]),
                                                         env.states[i], shown))
        if self.rationale:
            self._write_rationales([t for t in traces if t.stop_reason != STOP_TRACE_EOS or t.ids[-1:] != [self.eos]])
        return traces

    @staticmethod
    def _record_observations(state: _Sample, shown: list[str]) -> list[dict[str, Any]]:
        """Each call's record gets the observation text the loop appended (or why none fitted)."""
        calls = state.calls
        for rec, text in zip(calls, shown):
            rec["observation"] = text
        for rec in calls[len(shown):]:  # its observation did not fit the token budget
            rec["observation"] = ""
            rec["ok"], rec["error"] = False, rec["error"] or "no room left for the observation (token budget)"
        for rec in calls:
            rec["error"] = rec.pop("error")  # keys in a fixed order: action, input, ok, observation, error
        return calls

    def _close_at_observation(self, prompt: list[int], ids: list[int], observed: list[bool], code: int,
                              state: _Sample, shown: list[str]) -> Trace:
        """No rationale: the ids through the last observation's output (`observed` marks the loop's tokens; its
        trailing newline goes), then EOS. A trace without an observation keeps what the model wrote, through
        its own EOS or up to the budget (EOS appended)."""
        calls = self._record_observations(state, shown)
        last = max((k for k, o in enumerate(observed) if o), default=None)
        if last is None:
            body = ids[:-1] if ids[-1:] == [self.eos] else ids
            stop = STOP_TRACE_EOS if code == STOP_EOS else STOP_TRACE_LENGTH
        else:
            body, newline = ids[:last + 1], self.newline_ids
            if newline and body[-len(newline):] == newline:
                body = body[:-len(newline)]
            stop = STOP_TRACE_OBSERVATION
        return Trace(prompt, body + [self.eos], calls, stop, STOP_REASONS[code])

    def _close(self, prompt: list[int], ids: list[int], code: int, state: _Sample, shown: list[str]) -> Trace:
        """The tool phase's result -> a Trace whose ids end in EOS, or one left open for the rationale phase
        (`_write_rationales`) with the released forcing already appended."""
        calls = self._record_observations(state, shown)
        trace = Trace(prompt, ids, calls, STOP_TRACE_EOS, STOP_REASONS[code])
        has_work = self.work_id in ids
        if code == STOP_EOS and has_work:
            return trace
        if code in (STOP_MAX_TURNS, STOP_MAX_TOOL_CALLS):
            # the model asked for call max_rounds + 1: the observation says why it did not run, then the rationale
            call = self.fmt.parse(self.tokenizer.decode(ids, skip_special_tokens=True))[0]
            note = f"Error: the tool budget of {self.max_rounds} calls is spent; the call was not run."
            obs, shown_text = self.fmt.observation([(call.name, note)], "", self.limits.max_observation_tokens)
            calls.append({"action": call.name if call.error is None else None,
                          "input": released_input(call.arguments["input"]) if call.error is None else call.raw,
                          "ok": False, "observation": shown_text[0], "error": "tool budget exhausted"})
            trace.ids = ids + obs + [self.work_id]
            trace.stop_reason = STOP_TRACE_TOOL_BUDGET
            return trace
        if has_work:  # a rationale cut by the budget (or stopped at a <start_observation> inside it): finish it
            trace.stop_reason = STOP_TRACE_LENGTH if code in (STOP_LENGTH, STOP_MAX_LENGTH) else STOP_TRACE_EOS
            return trace
        # "Finished" then EOS, a trace cut by the budget, or one that stopped elsewhere: force the rationale
        body = ids[:-1] if ids[-1:] == [self.eos] else ids
        newline = self.tokenizer.decode(body, skip_special_tokens=False).endswith("\n") if body else True
        trace.ids = body + self._ids(("" if newline else "\n") + START_WORK)
        trace.stop_reason = STOP_TRACE_FORCED
        return trace

    def _write_rationales(self, open_traces: list[Trace]) -> None:
        """Greedy continuation to EOS (no tools) of the traces still open; the EOS is appended where none came."""
        need = [t for t in open_traces if t.stop_reason != STOP_TRACE_LENGTH]
        if need:
            params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
            out = self.engine.generate([t.prompt_ids + t.ids for t in need], params)
            for j, t in enumerate(need):
                t.ids = t.ids + out.response_ids[j][out.mask[j].bool()].tolist()
        for t in open_traces:
            if t.ids[-1:] != [self.eos]:
                t.ids.append(self.eos)
                t.stop_reason = STOP_TRACE_LENGTH


class _SampleEnv:
    """The environment as generate_episodes sees it: resets from the `_sample` column and keeps every row's
    state, so the calls' records can be read back in row order."""

    def __init__(self, env: ThemisToolEnvironment):
        self.env, self.states = env, []

    def tool_schemas(self) -> list[dict]:
        return self.env.tool_schemas()

    def reset(self, sample: dict) -> _Sample:
        state = self.env.reset(sample["_sample"])
        self.states.append(state)
        return state

    def step(self, state: _Sample, call: ParsedCall, messages: list[dict]) -> str:
        return self.env.step(state, call, messages)


def cache_key(question: str, answer: str, context: dict[str, Any]) -> tuple[str, str, str]:
    """(question, answer, the sample's columns as canonical JSON): the trace depends on nothing else."""
    return question, answer, json.dumps(context, sort_keys=True, default=str)


__all__ = ["ThemisTracer", "ThemisToolEnvironment", "Trace", "tool_getter", "released_input", "cache_key",
           "STOP_TRACE_EOS", "STOP_TRACE_FORCED", "STOP_TRACE_TOOL_BUDGET", "STOP_TRACE_LENGTH"]
