"""distillzoo.compare.stats: the intervals cover the truth of a known process, and the p-values, Holm adjustment
and ranks are what hand computations say."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from distillzoo.compare.stats import (bootstrap_ci, holm, order, paired_bootstrap, pairwise, point, rank_labels,
                                      ranks, sign_flip_pvalue)

SIMULATIONS = 1000


def _coverage(simulate, truth, resamples=1000):
    rng = np.random.default_rng(12345)
    hits = 0
    for k in range(SIMULATIONS):
        values, weights = simulate(rng)
        mean, lo, hi = bootstrap_ci(values, weights, resamples=resamples, seed=k)
        assert lo <= mean <= hi
        hits += lo <= truth <= hi
    return hits / SIMULATIONS


def test_the_95_interval_covers_the_population_mean_of_exact_match_data():
    # Each prompt's chance of being answered right is drawn from Beta(2, 3) (population mean 2/5), and each of
    # S=3 seeds answers it right (1) or not (0) independently with that chance: the truth is 0.4, not the sample's.
    def simulate(rng):
        chance = rng.beta(2.0, 3.0, size=200)
        return (rng.random((3, 200)) < chance).astype(float), np.ones(200)

    coverage = _coverage(simulate, truth=0.4)
    print(f"exact match: the 95% interval covered the population mean in {coverage:.1%} of {SIMULATIONS}")
    assert 0.93 <= coverage <= 0.97


def test_the_95_interval_covers_the_population_per_token_mean_of_token_weighted_data():
    # Prompt p has w_p = 5 + Poisson(15) reference tokens (E w = 20, Var w = 15, so E w^2 = 415) and a per-token
    # NLL mu_p ~ Normal(1.5 + 0.05 (w_p - 20), 0.5^2), longer prompts being harder. A seed's summed NLL of it is
    # w_p mu_p plus per-token noise of sd 1. The per-token population mean is E[w mu] / E[w]
    # = (1.5 * 20 + 0.05 * (415 - 20 * 20)) / 20 = 30.75 / 20 = 1.5375 (the plain mean of mu is 1.5).
    def simulate(rng):
        w = 5.0 + rng.poisson(15.0, size=200)
        mu = rng.normal(1.5 + 0.05 * (w - 20.0), 0.5)
        return w * mu + np.sqrt(w) * rng.normal(size=(3, 200)), w

    coverage = _coverage(simulate, truth=1.5375)
    print(f"per-token NLL: the 95% interval covered the population mean in {coverage:.1%} of {SIMULATIONS}")
    assert 0.93 <= coverage <= 0.97


def test_holm_matches_a_hand_computation_with_monotonicity_and_the_cap():
    raw = {"a": 0.01, "b": 0.035, "c": 0.03, "d": 0.005, "e": 0.6, "f": 0.7}
    # m = 6, ascending: d 0.005, a 0.01, c 0.03, b 0.035, e 0.6, f 0.7
    #   d: 6 * 0.005 = 0.03
    #   a: 5 * 0.01  = 0.05
    #   c: 4 * 0.03  = 0.12
    #   b: 3 * 0.035 = 0.105 -> raised to 0.12 (monotone)
    #   e: 2 * 0.6   = 1.2   -> capped at 1
    #   f: 1 * 0.7   = 0.7   -> raised to 1 (monotone)
    expected = {"a": 0.05, "b": 0.12, "c": 0.12, "d": 0.03, "e": 1.0, "f": 1.0}
    adjusted = holm(raw)
    assert list(adjusted) == list(raw)
    assert adjusted == pytest.approx(expected, abs=1e-12)
    assert holm({"only": 0.2}) == {"only": 0.2}
    with pytest.raises(ValueError, match="'x'.*must be in \\[0, 1\\]"):
        holm({"x": 1.5})


def _enumerated_pvalue(d):
    """Two-sided sign-flip p-value by itertools over every sign vector (an independent route)."""
    observed = abs(sum(d))
    flips = [abs(sum(s * x for s, x in zip(signs, d))) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= observed - 1e-9 for f in flips) / len(flips)


def test_the_exact_sign_flip_pvalue_is_a_hand_count():
    a = np.array([[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    b = np.array([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    # d = column sums of a - b = [3, 1, 2, -1], observed |3 + 1 + 2 - 1| = 5. A sign vector flipping a subset F of
    # the magnitudes {3, 1, 2, 1} (total 7) gives |7 - 2 sum(F)|, which is >= 5 iff sum(F) <= 1 or >= 6:
    # F = {}, {1}, {1'} (sums 0, 1, 1) and {3,1,2}, {3,2,1'}, {3,1,2,1'} (sums 6, 6, 7): 6 of 16 sign vectors.
    assert sign_flip_pvalue(a, b, np.ones(4)) == 6 / 16
    assert _enumerated_pvalue([3.0, 1.0, 2.0, -1.0]) == 6 / 16
    assert sign_flip_pvalue(b, a, [1.0, 2.0, 3.0, 4.0]) == 6 / 16  # symmetric; the shared weights do not enter
    assert sign_flip_pvalue(a, a, np.ones(4)) == 1.0

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 12)), rng.normal(size=(2, 12))
    assert sign_flip_pvalue(x, y, np.ones(12)) == pytest.approx(_enumerated_pvalue((x - y).sum(0).tolist()), abs=0)


def test_the_monte_carlo_sign_flip_pvalue_agrees_with_other_routes():
    rng = np.random.default_rng(2)
    # P = 18 > 16: Monte Carlo, against a full enumeration of the 2^18 sign vectors done here
    d = rng.normal(0.3, 1.0, size=18)
    signs = 1 - 2 * ((np.arange(1 << 18)[:, None] >> np.arange(18)) & 1)
    exact = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-9)
    assert 0.02 < exact < 0.5  # neither end, so the comparison means something
    mc = sign_flip_pvalue(d[None, :], np.zeros((1, 18)), np.ones(18), resamples=20000, seed=3)
    assert mc == pytest.approx(exact, abs=0.012)  # Monte Carlo sd sqrt(p(1-p)/20000) < 0.0036

    # P = 300: against the normal approximation, sum_p s_p d_p ~ Normal(0, sum_p d_p^2) under H0
    d = rng.normal(0.1, 1.0, size=300)
    normal = math.erfc(abs(d.sum()) / math.sqrt(2 * (d**2).sum()))
    assert 0.02 < normal < 0.5
    a, b = np.stack([d / 2, d / 2]), np.zeros((2, 300))
    assert sign_flip_pvalue(a, b, np.ones(300), resamples=20000, seed=4) == pytest.approx(normal, abs=0.015)

    # clearly different: no flipped sum reaches the observed one, p = 1 / (1 + resamples); identical: p = 1
    assert sign_flip_pvalue(b + 1.0 + rng.random((2, 300)), b, np.ones(300)) == 1 / 10001
    assert sign_flip_pvalue(a, a.copy(), np.ones(300)) == 1.0


def test_pairwise_and_ranks_on_one_strong_and_two_equal_entrants():
    rng = np.random.default_rng(5)
    base = rng.random((2, 10)).round(2)
    table = {"base": base, "same": base[::-1].copy(), "good": base + 1.0}  # same: its seeds swapped, d_p = 0
    weights = np.ones(10)
    # d_p of base - same is 0 for every prompt: p = 1. good - x is 2 (1 per seed) on all 10 prompts: only the
    # all-plus and all-minus sign vectors reach |20|, p = 2 / 1024. Holm (m = 3), ascending 2/1024, 2/1024, 1:
    # 3 * 2/1024 = 6/1024; 2 * 2/1024 = 4/1024 -> 6/1024 (monotone); 1 * 1 = 1.
    rows = pairwise(table, weights, higher_is_better=True, resamples=500)
    assert [(r["a"], r["b"]) for r in rows] == [("base", "same"), ("base", "good"), ("same", "good")]
    assert [r["p"] for r in rows] == [1.0, 2 / 1024, 2 / 1024]
    assert [r["p_holm"] for r in rows] == pytest.approx([1.0, 6 / 1024, 6 / 1024], abs=1e-15)
    assert [r["p_holm"] for r in rows] == list(holm({k: r["p"] for k, r in enumerate(rows)}).values())
    assert [r["significant"] for r in rows] == [False, True, True]
    assert [r["better"] for r in rows] == [None, "good", "good"]
    # every resample moves all entrants' prompts together, so the differences are exactly 0 and -1 in each
    assert [x for r in rows for x in (r["diff"], r["lo"], r["hi"])] == pytest.approx([0] * 3 + [-1] * 6, abs=1e-12)

    rank = ranks(table, weights, rows, higher_is_better=True)
    assert rank == {"base": 2, "same": 2, "good": 1}
    assert rank_labels(rank) == {"base": "2=", "same": "2=", "good": "1"}
    assert order(table, weights, rank, higher_is_better=True)[0] == "good"

    lower = pairwise(table, weights, higher_is_better=False, resamples=500)  # e.g. an NLL: the lower is better
    assert [r["better"] for r in lower] == [None, "base", "same"]
    assert ranks(table, weights, lower, higher_is_better=False) == {"base": 1, "same": 1, "good": 3}
    assert order(table, weights, {"base": 1, "same": 1, "good": 3}, higher_is_better=False)[2] == "good"
    with pytest.raises(ValueError, match="disagrees"):
        ranks(table, weights, lower, higher_is_better=True)
    with pytest.raises(ValueError, match="each pair"):
        ranks(table, weights, lower[:2], higher_is_better=False)


def test_the_point_estimate_is_token_weighted_and_the_bootstrap_is_paired():
    rng = np.random.default_rng(6)
    tokens = [3, 7, 1, 12, 5]
    per_token = [[rng.exponential(2.0, size=n) for n in tokens] for _ in range(2)]  # [seed][prompt] -> token NLLs
    values = np.array([[t.sum() for t in seed] for seed in per_token])
    everything = [x for seed in per_token for t in seed for x in t]
    num = den = 0.0
    for s in range(2):
        for p in range(5):
            num += values[s, p]
            den += tokens[p]
    assert point(values, tokens) == pytest.approx(num / den, rel=1e-12)
    assert point(values, tokens) == pytest.approx(sum(everything) / len(everything), rel=1e-12)  # mean per token
    assert point(values, tokens) != pytest.approx(np.mean(values / np.array(tokens)), rel=1e-3)  # not per prompt

    w = rng.integers(1, 30, size=40).astype(float)
    a = rng.normal(2.0, 1.0, size=(3, 40)) * w
    shifted = a + 0.25 * w  # 0.25 more per token, every seed and prompt
    both = paired_bootstrap({"a": a, "shifted": shifted, "noise": rng.normal(size=(3, 40))}, w, seed=7)
    assert np.subtract(both["shifted"], both["a"]) == pytest.approx([0.25] * 3, abs=1e-12)
    assert both["a"] == pytest.approx(bootstrap_ci(a, w, seed=7), rel=1e-12)  # the same indices as alone
    assert bootstrap_ci(a, w, seed=7) == bootstrap_ci(a, w, seed=7)  # deterministic
    assert bootstrap_ci(a, w, seed=7)[1:] != bootstrap_ci(a, w, seed=8)[1:]
    m, lo, hi = bootstrap_ci(a, w, level=0.5)
    _, lo95, hi95 = bootstrap_ci(a, w)
    assert lo95 < lo < m < hi < hi95


@pytest.mark.parametrize("call, message", [
    (lambda: paired_bootstrap({"kl": np.zeros((3, 10)), "fkl": np.zeros((2, 10))}, np.ones(10)),
     r"entrant 'fkl': values have shape \(2, 10\), the others \(3, 10\)"),
    (lambda: pairwise({"kl": np.zeros((3, 10)), "fkl": np.zeros((3, 9))}, np.ones(10), higher_is_better=True),
     r"entrant 'fkl': values have shape \(3, 9\), the others \(3, 10\)"),
    (lambda: bootstrap_ci(np.zeros((3, 10)), np.ones(9)), r"weights have shape \(9,\), the values \(3, 10\)"),
    (lambda: point(np.zeros((3, 10)), np.ones((1, 10))), r"weights have shape \(1, 10\)"),
    (lambda: point(np.zeros((3, 4)), [1.0, 0.0, 1.0, 1.0]), r"weights must be finite and > 0; prompt 1 has 0.0"),
    (lambda: bootstrap_ci(np.zeros((3, 1)), np.ones(1)), r"values have shape \(3, 1\): 1 prompt\(s\); at least 2"),
    (lambda: point(np.zeros(10), np.ones(10)), r"values have shape \(10,\); expected 2-D \[S seeds, P prompts\]"),
    (lambda: point([[1.0, float("nan")]], np.ones(2)), r"not all finite \(nan at seed 0, prompt 1\)"),
    (lambda: sign_flip_pvalue(np.zeros((3, 5)), np.zeros((2, 5)), np.ones(5)),
     r"b: values have shape \(2, 5\), a's \(3, 5\)"),
    (lambda: paired_bootstrap({}, np.ones(3)), "no entrants"),
    (lambda: bootstrap_ci(np.zeros((2, 3)), np.ones(3), level=95), r"level must be in \(0, 1\)"),
])
def test_bad_input_raises_a_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_gap_closed_is_the_share_of_the_baseline_to_reference_gap_with_a_paired_interval():
    from distillzoo.compare.stats import gap_closed

    rng = np.random.default_rng(3)
    base = rng.normal(2.0, 0.3, size=(1, 300))
    reference = base - 1.0 + rng.normal(0, 0.05, size=(1, 300))      # 1 nat better
    model = base - 0.25 + rng.normal(0, 0.05, size=(1, 300))         # a quarter of the way
    weights = np.ones(300)
    share, lo, hi = gap_closed(model, base, reference, weights)
    expected = (model.mean() - base.mean()) / (reference.mean() - base.mean())  # by hand
    assert share == pytest.approx(expected) and lo < share < hi and 0.2 < lo and hi < 0.3
    assert gap_closed(reference, base, reference, weights)[0] == pytest.approx(1.0)
    assert gap_closed(base, base, reference, weights)[:1] == (0.0,)
    with pytest.raises(ValueError, match="no gap to close"):
        gap_closed(model, base, base, weights)
