"""Independent float64 targets for the kernel tests (written out from the definitions, no kernels code)."""

import numpy as np
import torch


def keep_set(x, temperature, top_k, top_p, min_p):
    """bool [V]: tokens allowed by temperature -> top-k -> top-p (renormalised, crossing included) -> min-p.

    x: one row of logits (float64 numpy). Ties with a threshold value are kept.
    """
    x = np.asarray(x, dtype=np.float64)
    v = x.size
    if temperature == 0:
        keep = np.zeros(v, dtype=bool)
        keep[int(np.argmax(x))] = True
        return keep
    z = x / temperature
    keep = np.isfinite(z) | (z == np.inf)
    if 0 < top_k < v:
        kth = np.sort(z)[::-1][top_k - 1]
        keep &= z >= kth
    if top_p < 1:
        zk = np.where(keep, z, -np.inf)
        p = np.exp(zk - zk.max())
        p /= p.sum()
        order = np.argsort(-zk, kind="stable")
        cum = np.cumsum(p[order])
        j = int(np.searchsorted(cum, top_p - 1e-12))  # first index whose cumulative mass reaches top_p
        j = min(j, int(keep.sum()) - 1)
        keep &= zk >= zk[order[j]]
    if min_p > 0:
        zk = np.where(keep, z, -np.inf)
        p = np.exp(zk - zk.max())
        keep &= p >= min_p * p.max()
    return keep

def target_probs(x, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """float64 [V]: the renormalised distribution actually sampled from."""
    keep = keep_set(x, temperature, top_k, top_p, min_p)
    if temperature == 0:
        return keep.astype(np.float64)
    z = np.where(keep, np.asarray(x, np.float64) / temperature, -np.inf)
    p = np.exp(z - z.max())
    return p / p.sum()

def g_test_pvalue(tokens, probs):
    """G-test of observed token counts against the expected probabilities (zero-probability tokens excluded;
    the caller checks separately that they never occur)."""
    tokens = np.asarray(tokens)
    probs = np.asarray(probs, dtype=np.float64)
    support = probs > 0
    counts = np.bincount(tokens, minlength=probs.size)[support].astype(np.float64)
    expected = probs[support] * counts.sum()
    nz = counts > 0
    g = 2.0 * float(np.sum(counts[nz] * np.log(counts[nz] / expected[nz])))
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    # chi-square survival function: Q(dof / 2, g / 2), the regularised upper incomplete gamma
    half = torch.tensor([dof / 2, g / 2], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))

def log_softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

