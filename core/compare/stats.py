"""The statistics ``distillzoo compare`` reports about its entrants: point estimates, intervals, paired tests, ranks.

Data, for one metric: each entrant has ``values`` of shape [S seeds, P prompts], each a SUM over one prompt under
one seed (its exact match 0/1, or its NLL summed over its reference tokens), and all entrants share one ``weights``
of shape [P] (1 per prompt, or the prompt's number of reference tokens: every entrant is scored on the same
references). Entrants are paired: seed s and prompt p are the same initial student, batches and prompt for each.

- Point estimate: ``values.sum() / (S * weights.sum())``, the mean per prompt (or per token, token-weighted, as a
  trainer's eval computes it) over all seeds.
- Interval: a percentile bootstrap over prompts. A resample draws P prompts with replacement; a drawn prompt brings
  all S seeds' values and its weight; the statistic is the ratio of the resampled sums. It is an interval for the
  mean over the population of prompts the held-out set is drawn from, of the runs with these S seeds: it accounts
  for which prompts were drawn and for noise per (seed, prompt), independent between prompts; it does not account
  for an effect of a seed shared by all prompts (S is too small to resample seeds), so it is about these runs, not
  about a fresh seed. Several entrants (and differences between them) use the same resampled prompts: paired.
- Test of a pair: a two-sided paired sign-flip randomisation test. With d_p = sum over seeds of (a - b)[:, p], the
  statistic is |sum_p d_p| (proportional to |point(a) - point(b)|, the weights being shared); H0: a and b are
  exchangeable within each prompt, so each d_p is as likely to have either sign. Exact over all 2^P sign vectors
  when P <= 16; otherwise Monte Carlo, p = (1 + #{|flipped| >= |observed|}) / (1 + resamples), never 0.
- Holm-Bonferroni over all pairs of one metric (family-wise error <= alpha); a pair is significant if its adjusted
  p < alpha, and then the one with the better point estimate is significantly better.
- Rank = 1 + the number of entrants significantly better than it; entrants of one rank are tied. Ranks need not be
  a strict order: A better than C, B told apart from neither, gives A 1, B 1, C 2.

Everything is numpy, deterministic given ``seed``. Bad input raises ``ParameterError`` (a ``ValueError``).
"""

from __future__ import annotations

import itertools
from typing import Mapping

import numpy as np

from distillzoo.errors import ParameterError

#: the sign-flip test enumerates all 2^P sign vectors up to this many prompts
EXACT_MAX_PROMPTS = 16
#: cells (resamples x prompts) of one block of resampled indices or signs, which bounds the memory used
_BLOCK_CELLS = 1 << 21


# ----------------------------------------------------------------------------------------------------- validation
def _values(values, label: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 2:
        raise ParameterError(f"{label}: values have shape {arr.shape}; expected 2-D [S seeds, P prompts]")
    if arr.shape[0] < 1:
        raise ParameterError(f"{label}: values have shape {arr.shape}: no seeds")
    if arr.shape[1] < 2:
        raise ParameterError(f"{label}: values have shape {arr.shape}: {arr.shape[1]} prompt(s); at least 2 needed")
    if not np.isfinite(arr).all():
        s, p = np.argwhere(~np.isfinite(arr))[0]
        raise ParameterError(f"{label}: values are not all finite ({arr[s, p]} at seed {s}, prompt {p})")
    return arr


def _weights(weights, shape: tuple[int, int]) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    if w.shape != (shape[1],):
        raise ParameterError(f"weights have shape {w.shape}, the values {shape}: "
                             f"expected one weight per prompt, shape ({shape[1]},)")
    bad = ~(np.isfinite(w) & (w > 0))
    if bad.any():
        p = int(np.argmax(bad))
        raise ParameterError(f"weights must be finite and > 0; prompt {p} has {w[p]}")
    return w


def _table(table: Mapping[str, np.ndarray], weights) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, values [K, S, P], weights [P]) of a table, checked."""
    if not table:
        raise ParameterError("the table has no entrants")
    names = list(table)
    arrays = [_values(table[n], f"entrant {n!r}") for n in names]
    for name, arr in zip(names[1:], arrays[1:]):
        if arr.shape != arrays[0].shape:
            raise ParameterError(f"entrant {name!r}: values have shape {arr.shape}, the others {arrays[0].shape}")
    return names, np.stack(arrays), _weights(weights, arrays[0].shape)


def _level(level: float) -> None:
    if not 0 < level < 1:
        raise ParameterError(f"level must be in (0, 1), not {level}")


def _count(n: int, what: str) -> int:
    if int(n) != n or n < 1:
        raise ParameterError(f"{what} must be a positive integer, not {n}")
    return int(n)


def _blocks(total: int, width: int):
    step = max(1, _BLOCK_CELLS // width)
    for start in range(0, total, step):
        yield min(step, total - start)


# ---------------------------------------------------------------------------------------------------- estimates
def point(values, weights) -> float:
    """``values.sum() / (S * weights.sum())``: the mean per prompt (or per token) over all seeds."""
    v = _values(values, "values")
    w = _weights(weights, v.shape)
    return float(v.sum() / (v.shape[0] * w.sum()))


def _replicates(sums: np.ndarray, weights: np.ndarray, seeds: int, resamples: int, seed: int) -> np.ndarray:
    """[K, B] bootstrap statistics of K entrants' per-prompt sums [K, P], all from the same resampled prompts.

    Each resample is a row of P prompt indices drawn with replacement, turned into counts [P] (how often each prompt
    was drawn), so statistic = counts @ sums / (S * counts @ weights).
    """
    rng = np.random.default_rng(seed)
    n_prompts = weights.shape[0]
    out = []
    for b in _blocks(resamples, n_prompts):
        idx = rng.integers(0, n_prompts, size=(b, n_prompts))
        flat = (idx + n_prompts * np.arange(b)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n_prompts).reshape(b, n_prompts).astype(float)
        out.append((counts @ sums.T) / (seeds * (counts @ weights))[:, None])
    return np.concatenate(out).T


def _interval(replicates: np.ndarray, level: float) -> np.ndarray:
    """[..., 2] percentile interval of replicates [..., B]."""
    return np.moveaxis(np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2], axis=-1), 0, -1)


def paired_bootstrap(table: Mapping[str, np.ndarray], weights, *, level: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """``{entrant: (point, lo, hi)}``: each entrant's percentile bootstrap interval, from the same resampled prompts
    for every entrant (so ``paired_bootstrap({"x": v}, w)["x"] == bootstrap_ci(v, w)`` with the same seed)."""
    names, values, w = _table(table, weights)
    _level(level)
    seeds = values.shape[1]
    sums = values.sum(axis=1)  # [K, P]
    points = sums.sum(axis=1) / (seeds * w.sum())
    bounds = _interval(_replicates(sums, w, seeds, _count(resamples, "resamples"), seed), level)
    return {n: (float(points[k]), float(bounds[k, 0]), float(bounds[k, 1])) for k, n in enumerate(names)}


def bootstrap_ci(values, weights, *, level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(point, lo, hi)``: the point estimate and its percentile bootstrap interval over prompts (module docs)."""
    v = _values(values, "values")
    _weights(weights, v.shape)
    return paired_bootstrap({"values": v}, weights, level=level, resamples=resamples, seed=seed)["values"]


def gap_closed(model, baseline, reference, weights, *, level: float = 0.95, resamples: int = 2000,
               seed: int = 0) -> tuple[float, float, float]:
    """``(share, lo, hi)``: the share of the gap between ``baseline`` and ``reference`` that ``model`` closes,
    ``(point(model) - point(baseline)) / (point(reference) - point(baseline))`` (1: as good as the reference, 0: no
    better than the baseline, negative: worse), with its percentile bootstrap interval from the same resampled
    prompts for the three (a distilled student, a student trained without the teacher, the teacher)."""
    names, values, w = _table({"model": model, "baseline": baseline, "reference": reference}, weights)
    _level(level)
    seeds = values.shape[1]
    sums = values.sum(axis=1)
    points = sums.sum(axis=1) / (seeds * w.sum())
    if points[2] == points[1]:
        raise ParameterError("gap_closed: the reference and the baseline score the same; there is no gap to close")
    reps = _replicates(sums, w, seeds, _count(resamples, "resamples"), seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = (reps[0] - reps[1]) / (reps[2] - reps[1])
    lo, hi = _interval(shares[np.isfinite(shares)], level)
    return float((points[0] - points[1]) / (points[2] - points[1])), float(lo), float(hi)


# --------------------------------------------------------------------------------------------------------- tests
def _sign_flip(d: np.ndarray, resamples: int, seed: int) -> float:
    observed = abs(d.sum())
    tol = 1e-9 * np.abs(d).sum()  # rounding only: sums equal to the observed one count as extreme
    n = d.shape[0]
    if n <= EXACT_MAX_PROMPTS:
        bits = (np.arange(1 << n)[:, None] >> np.arange(n)) & 1
        flipped = np.abs((1 - 2 * bits) @ d)
        return float(np.count_nonzero(flipped >= observed - tol) / (1 << n))
    rng = np.random.default_rng(seed)
    extreme = 0
    for b in _blocks(resamples, n):
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(b, n))
        extreme += int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))
    return (1 + extreme) / (1 + resamples)


def sign_flip_pvalue(a, b, weights, *, resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided paired sign-flip p-value of "a and b have the same mean" (module docs); exact when P <= 16,
    else Monte Carlo with ``resamples`` sign vectors. Identical arrays give 1."""
    va, vb = _values(a, "a"), _values(b, "b")
    if va.shape != vb.shape:
        raise ParameterError(f"b: values have shape {vb.shape}, a's {va.shape}")
    _weights(weights, va.shape)
    return _sign_flip((va - vb).sum(axis=0), _count(resamples, "resamples"), seed)


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values, same keys: with the m p-values sorted ascending (ties in the given order),
    the i-th (from 0) is adjusted to max over j <= i of min(1, (m - j) * p_j)."""
    keys = list(pvalues)
    p = np.array([float(pvalues[k]) for k in keys])
    if not ((p >= 0) & (p <= 1)).all():
        bad = keys[int(np.argmax(~((p >= 0) & (p <= 1))))]
        raise ParameterError(f"p-value of {bad!r} is {pvalues[bad]}; p-values must be in [0, 1]")
    m = len(keys)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = dict.fromkeys(keys, 0.0)
    for k, a in zip(order, adjusted):
        out[keys[k]] = float(a)
    return out


def pairwise(table: Mapping[str, np.ndarray], weights, *, higher_is_better: bool, alpha: float = 0.05,
             resamples: int = 2000, flips: int = 10000, seed: int = 0) -> list[dict]:
    """One row per unordered pair (a, b), a before b in the table's order:
    ``{"a", "b", "diff", "lo", "hi", "p", "p_holm", "significant", "better"}``.

    ``diff`` = point(a) - point(b); ``lo``, ``hi``: its paired bootstrap (1 - alpha) interval (``resamples``, the
    same resampled prompts for every pair; not adjusted for the number of pairs); ``p``: the sign-flip p-value
    (``flips`` sign vectors where P > 16, the same ones for every pair); ``p_holm``: Holm over all pairs of this
    table; ``significant``: p_holm < alpha (and diff != 0); ``better``: the significantly better one's name, or None.
    """
    names, values, w = _table(table, weights)
    if not 0 < alpha < 1:
        raise ParameterError(f"alpha must be in (0, 1), not {alpha}")
    resamples, flips = _count(resamples, "resamples"), _count(flips, "flips")
    seeds = values.shape[1]
    sums = values.sum(axis=1)  # [K, P]
    points = sums.sum(axis=1) / (seeds * w.sum())
    replicates = _replicates(sums, w, seeds, resamples, seed)
    pairs = list(itertools.combinations(range(len(names)), 2))
    rows = []
    for i, j in pairs:
        lo, hi = _interval(replicates[i] - replicates[j], 1 - alpha)
        rows.append({"a": names[i], "b": names[j], "diff": float(points[i] - points[j]), "lo": float(lo),
                     "hi": float(hi), "p": _sign_flip(sums[i] - sums[j], flips, seed)})
    adjusted = holm({k: row["p"] for k, row in enumerate(rows)})
    for k, row in enumerate(rows):
        row["p_holm"] = adjusted[k]
        row["significant"] = bool(row["p_holm"] < alpha and row["diff"] != 0)
        a_better = (row["diff"] > 0) == higher_is_better
        row["better"] = (row["a"] if a_better else row["b"]) if row["significant"] else None
    return rows


# --------------------------------------------------------------------------------------------------------- ranks
def ranks(table: Mapping[str, np.ndarray], weights, rows: list[dict], *, higher_is_better: bool) -> dict[str, int]:
    """``{entrant: rank}`` in the table's order: 1 + the number of entrants significantly better (per ``rows`` from
    ``pairwise`` of this table, which must hold each pair once and agree with ``higher_is_better``)."""
    names, _, _ = _table(table, weights)
    wanted = {frozenset(p) for p in itertools.combinations(names, 2)}
    seen = [frozenset((r["a"], r["b"])) for r in rows]
    if len(seen) != len(set(seen)) or set(seen) != wanted:
        raise ParameterError(f"rows must hold each pair of the table's {len(names)} entrants once; "
                             f"got {len(rows)} rows for {len(wanted)} pairs")
    beaten = dict.fromkeys(names, 0)
    for r in rows:
        if r["better"] is None:
            continue
        if r["better"] not in (r["a"], r["b"]) or (r["better"] == r["a"]) != ((r["diff"] > 0) == higher_is_better):
            raise ParameterError(f"row ({r['a']!r}, {r['b']!r}): better={r['better']!r} disagrees with diff "
                                 f"{r['diff']} and higher_is_better={higher_is_better}")
        beaten[r["b"] if r["better"] == r["a"] else r["a"]] += 1
    return {n: 1 + beaten[n] for n in names}


def order(table: Mapping[str, np.ndarray], weights, rank: Mapping[str, int], *, higher_is_better: bool) -> list[str]:
    """The entrants sorted by (rank, point estimate best first, table order)."""
    names, values, w = _table(table, weights)
    points = values.sum(axis=(1, 2)) / (values.shape[1] * w.sum())
    sign = -1.0 if higher_is_better else 1.0
    return [names[k] for k in sorted(range(len(names)), key=lambda k: (rank[names[k]], sign * points[k], k))]


def rank_labels(rank: Mapping[str, int]) -> dict[str, str]:
    """``{entrant: "1" | "2=" ...}``: the rank, with "=" where another entrant shares it."""
    shared = {r for r in rank.values() if list(rank.values()).count(r) > 1}
    return {n: f"{r}=" if r in shared else str(r) for n, r in rank.items()}
