"""How a generated row ends: the ids that stop it, the stop strings that cut it, and its stop reason.

Pure functions over a tokenizer and `SamplingParams`, shared by the engine (`RolloutEngine`), partial
rollouts (`rollouts/partial.py`, where a stop string may span a segment boundary) and tool episodes
(`rollouts/episodes.py`, which re-emits the end-of-turn token it paused on).
"""
from __future__ import annotations

import torch

from align.rollouts.batch import STOP_EOS, STOP_LENGTH, STOP_STRING
from align.rollouts.params import SamplingParams


def eos_ids(tokenizer, params: SamplingParams) -> list[int]:
    """The tokenizer's EOS ids that end a row (none with `ignore_eos`)."""
    eos = tokenizer.eos_token_id
    if params.ignore_eos or eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]


def stop_ids(tokenizer, params: SamplingParams) -> list[int]:
    """Every token id that finishes a row: `params.stop_token_ids` and the EOS ids."""
    return sorted(set(params.stop_token_ids) | set(eos_ids(tokenizer, params)))


def stop_reasons(tokenizer, response_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                 stopped_by_string: torch.Tensor | None) -> torch.Tensor:
    """[b] int64 codes (rollouts.batch.STOP_REASONS) from each row's last kept token: an EOS token -> eos,
    another stop token or a stop string in the text -> stop, otherwise the row ran to max_new_tokens -> length."""
    lengths = mask.sum(-1)
    last = response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    reason = torch.full_like(last, STOP_LENGTH)
    eos = eos_ids(tokenizer, params)
    others = [i for i in params.stop_token_ids if i not in eos]
    if others:
        reason = torch.where(torch.isin(last, torch.tensor(others, device=last.device)), STOP_STRING, reason)
    if eos:
        reason = torch.where(torch.isin(last, torch.tensor(eos, device=last.device)), STOP_EOS, reason)
    if stopped_by_string is not None:
        reason = torch.where(stopped_by_string.to(last.device), STOP_STRING, reason)
    return reason.to(torch.long)


def stop_lookback(stops: list[str]) -> int:
    """Tokens before the last scanned position that a scan of new tokens re-decodes: a stop string that ends in
    the new tokens starts at most this many tokens earlier. Every token carries at least one byte of text
    (UTF-8 characters may span several byte tokens), so twice the longest stop's bytes plus a margin (special
    tokens, skipped in the text; a leading space that a tokenizer drops at the start of a decode) covers it."""
    return 2 * max(len(s.encode("utf-8")) for s in stops) + 8


def _contains(tokenizer, ids: list[int], stops: list[str]) -> bool:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return any(s in text for s in stops)


def truncate_at_stop_strings(tokenizer, response_ids: torch.Tensor, mask: torch.Tensor,
                             stops: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row up to and including the token that completes its first stop string; also returns
    [b] bool, the rows whose text contains a stop string.

    "The text of ids[:cut] contains a stop string" only turns from false to true as cut grows (text is
    appended; only a trailing incomplete UTF-8 character can change, and no stop string holds U+FFFD), so the
    first such cut is found by bisection: O(T log T) decoded tokens per row, not the O(T^2) of trying every
    cut (GPU_READINESS F12)."""
    mask = mask.clone()
    hit = torch.zeros(response_ids.shape[0], dtype=torch.bool)
    for i in range(response_ids.shape[0]):
        ids = response_ids[i][mask[i].bool()].tolist()
        if not _contains(tokenizer, ids, stops):
            continue
        hit[i] = True
        lo, hi = 0, len(ids)  # ids[:lo] holds no stop string, ids[:hi] does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _contains(tokenizer, ids[:mid], stops) else (mid, hi)
        mask[i, hi:] = 0
    return mask, hit
