"""Differences between ablations with the training seed as the unit.

A study trains every ablation once per seed and evaluates each run on the same test images, so a
metric varies for two reasons: which images are in the test split (test-image noise) and how a run
happened to train (training noise: initialisation, data order, nondeterminism). A paired test over
images (e.g. Wilcoxon on per-image differences of one seed) sees only the first: with 300 images it
gives p-values like 1e-40 for differences that another seed reverses. A difference between two
ablations is a finding only when it exceeds training noise, so the seed is the unit here.

The interval is a hierarchical (two-stage) bootstrap of the mean per-image difference
``x[s, i] = ablation[s, i] - baseline[s, i]`` over seeds ``s`` and test images ``i``: draw the seeds
with replacement, then, within each drawn seed, the images with replacement; the statistic is the
mean over the drawn seeds of the mean over their drawn images. Runs with the same seed number share
the initialisation and the data order, so ablation and baseline are paired by seed, and by image
within a seed (the same images are drawn for both). The 95 % interval is the percentile interval of
the bootstrap distribution and the two-sided p-value is twice the smaller tail beyond 0 (the
smallest level at which the percentile interval excludes 0). The random generator has a fixed seed,
so a report is reproducible. Verdicts are Holm-corrected over every ablation × metric tested.

Limitation, stated plainly: with few seeds this interval is coarse and too narrow. Drawing 3 seeds
with replacement gives only 10 distinct multisets (2 seeds: 3), so the interval cannot extend beyond
the smallest and largest per-seed difference; when every seed's difference has the same sign the
bootstrap calls the difference significant, although under a null effect that happens by chance
1 time in 4 with 3 seeds (1 in 2 with 2 seeds). Verdicts from 2-3 seeds are a screen, not a
95 % guarantee; nominal coverage needs more seeds (roughly 10 or more). With one seed the training
noise is not measured at all, and no verdict is given.

Shapes: ``C`` stacked quantities (e.g. metrics) sharing seeds and images, ``S`` seeds, ``N`` test
images, ``B`` bootstrap draws. Pure numpy; NaN marks a missing value and is left out of the means.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np

N_BOOT = 4000
RNG_SEED = 0
ALPHA = 0.05

BETTER, WORSE, NOT_DISTINGUISHABLE = "better", "worse", "not distinguishable"
UNMEASURED = "training noise unmeasured (1 seed)"


def seed_mean(x: np.ndarray) -> np.ndarray:
    """The statistic on the data itself: mean over seeds of the mean over images. [C,S,N] -> [C]."""
    with _nan_ok():
        return np.nanmean(np.nanmean(np.asarray(x, dtype=np.float64), 2), 1)


def hierarchical_bootstrap(x: np.ndarray, n_boot: int = N_BOOT, seed: int = RNG_SEED) -> np.ndarray:
    """Bootstrap distribution of :func:`seed_mean`: seeds drawn with replacement, then images drawn
    with replacement within each drawn seed (the same draws for all C quantities, so quantities
    stacked from paired data stay paired).

    x [C,S,N] -> [C,B]. One matrix product of the image counts [B·S,N] with the data [N,C·S] gives
    every draw's image mean for every seed; the drawn seed of each slot is then picked out.
    """
    x = np.asarray(x, dtype=np.float64)
    c, s, n = x.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, s, (n_boot, s))                                  # [B,S] seed in each slot
    items = rng.integers(0, n, (n_boot * s, n))                              # [B·S,N] images per slot
    counts = np.bincount((items + n * np.arange(n_boot * s)[:, None]).ravel(),
                         minlength=n_boot * s * n).reshape(n_boot * s, n).astype(np.float64)
    valid = np.isfinite(x)
    flat = lambda a: a.transpose(2, 0, 1).reshape(n, c * s)                   # [N,C·S]
    total = (counts @ flat(np.where(valid, x, 0.0))).reshape(n_boot, s, c, s)  # [B,slot,C,seed]
    weight = (counts @ flat(valid.astype(np.float64))).reshape(n_boot, s, c, s)
    pick = seeds[:, :, None, None].repeat(c, 2)                              # [B,slot,C,1]
    total = np.take_along_axis(total, pick, 3)[..., 0]                       # [B,slot,C]
    weight = np.take_along_axis(weight, pick, 3)[..., 0]
    with _nan_ok():
        return np.nanmean(total / weight, 1).T  # [C,B]; a slot without a valid image drawn is NaN


def percentile_interval(boot: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of a bootstrap distribution: boot [C,B] -> (lo [C], hi [C])."""
    q = 100 * (1 - level) / 2
    with _nan_ok():
        lo, hi = np.nanpercentile(boot, [q, 100 - q], axis=1)
    return lo, hi


def bootstrap_p(boot: np.ndarray) -> np.ndarray:
    """Two-sided bootstrap p-value of 'the statistic is 0': twice the smaller share of draws on
    either side of 0 (each share counted as (k+1)/(B+1), so p > 0), at most 1. [C,B] -> [C];
    NaN where no draw is finite."""
    finite = np.isfinite(boot)
    b = finite.sum(1)
    low = ((boot <= 0) & finite).sum(1)
    high = ((boot >= 0) & finite).sum(1)
    with _nan_ok():
        p = np.minimum(1.0, 2 * (np.minimum(low, high) + 1) / (b + 1))
    return np.where(b > 0, p, np.nan)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values [K] -> [K]; NaN entries are not tests (kept NaN, not counted).

    Sorted p_(1) <= ... <= p_(m): adjusted p_(j) = max over k <= j of min(1, (m - k + 1) p_(k)).
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def verdicts(delta: np.ndarray, p_adjusted: np.ndarray, lower_is_better: np.ndarray,
             alpha: float = ALPHA) -> list[str]:
    """better / worse (adjusted p < alpha; the sign of delta = ablation - baseline and whether
    lower is better give the direction) or not distinguishable. [K] each -> K strings."""
    out = []
    for d, p, lower in zip(delta, p_adjusted, lower_is_better):
        if not (np.isfinite(p) and p < alpha and d != 0):
            out.append(NOT_DISTINGUISHABLE)
        else:
            out.append(BETTER if (d < 0) == bool(lower) else WORSE)
    return out


@contextmanager
def _nan_ok():
    """Silence numpy's empty-slice / all-NaN warnings: such a mean is NaN, which is the answer."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
