"""Differences between ablations with the training seed as the unit.

A study trains every ablation once per seed and evaluates each run on the same test images, so a
metric varies for two reasons: how a run happened to train (training noise: initialisation, data
order, nondeterminism) and which images are in the test split (test-image noise). A paired test over
images (e.g. Wilcoxon on per-image differences of one seed) sees only the second: with 300 images it
gives p-values like 1e-40 for differences that another seed reverses. A difference between two
ablations is a finding only when it exceeds training noise, so the seed is the unit here.

The data are the per-image differences ``x[s, i] = ablation[s, i] - baseline[s, i]``, paired by seed
``s`` (runs with the same seed number share the initialisation and the data order) and by test image
``i``. The estimate is the mean over seeds of the per-seed means ``d_s = mean_i x[s, i]``. Its
standard error has two parts, added in quadrature:

- training noise: ``sd_s(d_s)² / S``, the spread of the per-seed differences over the ``S`` seeds;
- test-image noise: ``se_img² = sd_i(m_i)² / N`` with ``m_i = mean_s x[s, i]``, the usual paired
  standard error over the ``N`` images of the seed-averaged differences. Every seed is evaluated on
  the same images, so their sampling noise is shared by all seeds and does not show in the spread of
  ``d_s``; it must be added.

``se = sqrt(sd_s(d_s)² / S + se_img²)``; the 95 % interval is ``mean ± t(0.975, S-1) · se`` and the
two-sided p-value is that of ``t = mean / se`` on Student's t with ``S - 1`` degrees of freedom.

Why this and not a bootstrap. With 2-3 seeds a bootstrap over seeds has 3-10 distinct resamples and
its percentile interval cannot reach beyond the smallest and largest per-seed difference: it declares
significance whenever all seeds agree in sign, which a null effect does 1 time in 4 with 3 seeds. The
t interval on the seed level has exact coverage when the per-seed differences are normal (sums of
hundreds of image terms: nearly so), for any ``S >= 2``; with 3 seeds its quantile is t(0.975, 2) =
4.30, not 1.96, so the intervals are honestly wide. It is conservative in two ways: the t quantile of
the seed part is applied to the image part too (whose own degrees of freedom, ``N - 1``, are many: the
Welch-Satterthwaite degrees of freedom of the sum are at least ``S - 1``), and the seed-by-image
interaction noise is counted in both parts (by ``1 / (S·N)`` of its variance, negligible for hundreds of
images). The price of honest coverage is power: with 3 seeds only large, consistent effects are
distinguishable, and "not distinguishable" does not mean "equal". Verdicts are Holm-corrected over
every ablation × metric tested.

With one seed training noise is not measured and no interval, p-value or verdict is given; the
test-image-only interval (``mean ± t(0.975, N-1) · se_img``, reported for every ``S``) still says how
precisely the test split measures that one run, and nothing about training noise.

Shapes: ``C`` stacked quantities (e.g. metrics) sharing seeds and images, ``S`` seeds, ``N`` test
images. Pure numpy (scipy for the t distribution); NaN marks a missing value and is left out of the
means, SDs and counts.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from scipy.stats import t as student_t

LEVEL = 0.95
ALPHA = 0.05

BETTER, WORSE, NOT_DISTINGUISHABLE = "better", "worse", "not distinguishable"
UNMEASURED = "training noise unmeasured (1 seed)"


class SeedTest(NamedTuple):
    """:func:`seed_t_test`'s result, each [C]: the estimate, the spread of the per-seed differences,
    the seed-level interval and p (NaN with fewer than 2 seeds), the image SE and the test-image-only
    interval."""
    delta: np.ndarray   # mean over seeds of the per-seed mean over images
    delta_sd: np.ndarray  # SD over seeds of the per-seed means (NaN with one seed)
    lo: np.ndarray      # interval with training and test-image noise
    hi: np.ndarray
    p: np.ndarray
    se_img: np.ndarray  # standard error of delta from the test images alone
    img_lo: np.ndarray  # interval with test-image noise only
    img_hi: np.ndarray


def t_interval(mean, se, df, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Student-t interval ``mean ± t((1+level)/2, df) · se`` and the two-sided p-value of ``mean = 0``
    (1 where mean and se are both 0). Arrays broadcast; NaN where df < 1 -> (lo, hi, p)."""
    mean, se, df = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (mean, se, df)))
    df = np.where(df >= 1, df, np.nan)
    with _nan_ok():
        half = student_t.ppf((1 + level) / 2, df) * se
        t = np.where(mean == 0, 0.0, np.abs(mean) / se)
        p = np.where(np.isnan(se), np.nan, 2 * student_t.sf(t, df))
    return mean - half, mean + half, p


def seed_t_test(x: np.ndarray, level: float = LEVEL) -> SeedTest:
    """The mean over seeds of the per-seed mean over images, its seed-level t interval and p-value with
    the test-image standard error added in quadrature (see the module docstring), and the
    test-image-only interval. [C,S,N] -> SeedTest of [C] arrays."""
    x = np.asarray(x, dtype=np.float64)
    with _nan_ok():
        d, m = np.nanmean(x, 2), np.nanmean(x, 1)        # [C,S] per-seed, [C,N] per-image means
        s, n = np.isfinite(d).sum(1), np.isfinite(m).sum(1)
        delta, delta_sd = np.nanmean(d, 1), np.nanstd(d, axis=1, ddof=1)
        se_img = np.nanstd(m, axis=1, ddof=1) / np.sqrt(n)
    lo, hi, p = t_interval(delta, np.sqrt(delta_sd ** 2 / s + se_img ** 2), s - 1, level)
    img_lo, img_hi, _ = t_interval(delta, se_img, n - 1, level)
    return SeedTest(delta, delta_sd, lo, hi, p, se_img, img_lo, img_hi)


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
    """Silence numpy's empty-slice / all-NaN / degrees-of-freedom warnings: such a value is NaN,
    which is the answer."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
