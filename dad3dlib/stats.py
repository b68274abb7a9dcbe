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

Each part keeps its own Student-t quantile and the two margins add in quadrature
(:func:`two_part_interval`): ``h = sqrt((t(0.975, S-1) · sd_s(d_s)/√S)² + (t(0.975, N-1) · se_img)²)``,
interval ``mean ± h``; the two-sided p-value is the level at which that interval's edge reaches 0.
A difference whose uncertainty is all training noise is then judged as a t-test over the seeds
(2 degrees of freedom with 3 seeds: ± 4.30 standard errors); one whose seeds agree closely is judged
by the test images (hundreds of degrees of freedom); in between it is conservative.
``tests/test_stats.py`` simulates studies without an effect and bounds the rate of p < 0.05.

Why not something else. With 2-3 seeds a bootstrap over seeds has 3-10 distinct resamples and its
percentile interval cannot reach beyond the smallest and largest per-seed difference: it declares
significance whenever all seeds agree in sign, which a null effect does 1 time in 4 with 3 seeds.
One t with S-1 degrees of freedom on the summed variance is valid but absurdly conservative when the
image part dominates (a large effect on which every seed agrees closely comes out "not
distinguishable"; ``test_a_large_effect_with_tight_seeds_is_found_despite_few_seeds``);
Welch-Satterthwaite degrees of freedom fix that but are anti-conservative with 2 seeds. The t interval on the seed level has exact coverage when the
per-seed differences are normal (sums of hundreds of image terms: nearly so). The price of honest
coverage is power: with 3 seeds only large, consistent effects are distinguishable, and "not
distinguishable" does not mean "equal". The report Holm-corrects the verdicts of the primary
hypotheses (the metrics each ablation file expects to change) over those only; every other
comparison is exploratory, judged on its unadjusted interval.

What a study could have detected (:func:`power`, :func:`detectable_effect`, :func:`seeds_needed`)
follows the same model, ``x[s, i] = δ + a_s + b_i + e_si``: training noise ``a`` (one draw per seed),
test-image noise ``b`` (shared by every seed) and the seed × image interaction ``e``, whose variances
:func:`noise` estimates from the study's own differences. The power is the probability that the
interval above, with its seed-level SD itself estimated from ``S`` seeds, excludes 0 when the true
difference is ``δ``; the minimum detectable effect is the ``δ`` found with 80 % power. More seeds
shrink the training-noise part; the test-image part (``σ_b²/N``) stays, so an effect below the test
split's own resolution is never resolved by seeds alone. ``tests/test_stats.py`` simulates studies at
the detectable effect and checks that about 80 % of them find it. Given a study's own estimates of the
variances these are plug-in values: with 3 seeds the training-noise variance rests on 2 degrees of
freedom, so the detectable effect is an order of magnitude, not a precise bound.

With one seed training noise is not measured and no interval, p-value or verdict is given; the
test-image-only interval (``mean ± t(0.975, N-1) · se_img``, reported for every ``S``) still says how
precisely the test split measures that one run, and nothing about training noise.

Shapes: ``C`` stacked quantities (e.g. metrics) sharing seeds and images, ``S`` seeds, ``N`` test
images. Pure numpy (scipy for the t, χ² and normal distributions); NaN marks a missing value and is left out of the
means, SDs and counts.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from scipy.stats import chi2, norm
from scipy.stats import t as student_t

LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8      # the power at which a detectable effect is stated
MAX_SEEDS = 100  # seeds_needed looks this far

BETTER, WORSE, NOT_DISTINGUISHABLE = "better", "worse", "not distinguishable"
UNMEASURED = "training noise unmeasured (1 seed)"
CONFIRMED, CONTRADICTED = "confirmed", "contradicted"  # a primary hypothesis's verdict (or not distinguishable)


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


def two_part_interval(mean, se_seed, df_seed, se_img, df_img, level: float = LEVEL
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mean ± h(level)`` with the two noise sources' t margins added in quadrature,
    ``h(a) = sqrt((t(a, df_seed)·se_seed)² + (t(a, df_img)·se_img)²)``: each part keeps its own
    degrees of freedom (2 for 3 seeds, hundreds for the images), so a difference whose uncertainty
    is all test-image noise is judged as a paired test over images and one whose uncertainty is all
    training noise as a t-test over seeds; in between it is conservative (margins add in quadrature
    at least as wide as the pooled-normal margin). The two-sided p-value is the level at which the
    interval's edge reaches 0 (bisection in log p). Arrays broadcast; NaN where df_seed < 1."""
    mean, se_seed, df_seed, se_img, df_img = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.float64) for a in (mean, se_seed, df_seed, se_img, df_img)))
    df_seed = np.where(df_seed >= 1, df_seed, np.nan)

    def half(a):  # margin at two-sided level 1 - a
        q = 1 - np.asarray(a) / 2
        return np.hypot(student_t.ppf(q, df_seed) * se_seed, student_t.ppf(q, df_img) * se_img)

    with _nan_ok():
        h = half(1 - level)
        lo_log, hi_log = np.full(mean.shape, -300.0), np.zeros(mean.shape)  # log10 p in [-300, 0]
        for _ in range(60):
            mid = (lo_log + hi_log) / 2
            reaches = half(10.0 ** mid) >= np.abs(mean)  # at this level the interval still holds 0
            lo_log, hi_log = np.where(reaches, mid, lo_log), np.where(reaches, hi_log, mid)
        p = np.where(mean == 0, 1.0, 10.0 ** hi_log)
        p = np.where(np.isnan(h), np.nan, p)
    return mean - h, mean + h, p


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
    lo, hi, p = two_part_interval(delta, delta_sd / np.sqrt(s), s - 1, se_img, n - 1, level)
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


# --------------------------------------------------------------------------------------------
# What a study could have detected: power of the seed-level test under its own noise model
# --------------------------------------------------------------------------------------------
class Noise(NamedTuple):
    """The noise of per-image differences ``x[s, i] = δ + a_s + b_i + e_si`` (training noise a, test-image
    noise b shared by the seeds, and the seed × image interaction e: a seed's own errors on an image),
    each [C], as :func:`noise` estimates it from a study's [C,S,N] differences."""
    seed_var: np.ndarray    # var of a per-seed mean d_s: σ_a² + σ_e²/N (what sd_s(d_s)² estimates)
    image_var: np.ndarray   # σ_b², the images' shared part
    within_var: np.ndarray  # σ_e², the seed × image interaction
    n_images: np.ndarray    # N


def noise(x: np.ndarray) -> Noise:
    """The variance components of :class:`Noise` from differences [C,S,N] (S >= 2), by the two-way
    analysis of variance of each [S,N] slice over the images every seed has: σ_e² is the residual
    mean square, ``seed_var`` the variance of the per-seed means, σ_b² the variance of the per-image
    means less its σ_e²/S part (at least 0). NaN where fewer than 2 seeds or images remain."""
    x = np.asarray(x, dtype=np.float64)
    complete = np.isfinite(x).all(1, keepdims=True)  # [C,1,N]: images every seed has
    x = np.where(complete, x, np.nan)
    with _nan_ok():
        s, n = x.shape[1], complete.sum((1, 2))
        d, m = np.nanmean(x, 2), np.nanmean(x, 1)        # [C,S], [C,N]
        grand = np.nanmean(d, 1)
        resid = x - d[:, :, None] - m[:, None, :] + grand[:, None, None]
        within = np.nansum(resid ** 2, (1, 2)) / ((s - 1) * (n - 1))
        seed_var = np.nanvar(d, axis=1, ddof=1)
        image_var = np.maximum(np.nanvar(m, axis=1, ddof=1) - within / s, 0.0)
    bad = (n < 2) | (s < 2)
    return Noise(*(np.where(bad, np.nan, v) for v in (seed_var, image_var, within)), n.astype(np.float64))


def power(effect, noise_: Noise, seeds, alpha=ALPHA) -> np.ndarray:
    """The probability that :func:`seed_t_test` finds a true difference ``effect`` at two-sided level
    ``alpha`` (its p-value below alpha) in a study of ``seeds`` seeds on the same N images, under
    ``noise_``. The estimate is normal, δ̂ ~ N(δ, seed_var/S + σ_b²/N); the interval's margin
    ``h = sqrt((t(S-1)·ŝe_seed)² + (t(N-1)·se_img)²)`` has its seed part random (ŝe_seed² =
    seed_var/S · χ²(S-1)/(S-1), independent of δ̂) and its image part at its expectation
    (se_img² = (σ_b² + σ_e²/S)/N; N is hundreds); the power is the mean over the χ² distribution of
    P(|δ̂| > h), by quadrature on 400 quantiles. Arrays broadcast -> power."""
    effect, seed_var, image_var, within, n, seeds, alpha = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.float64) for a in (effect, *noise_, seeds, alpha)))
    w = chi2.ppf((np.arange(400) + 0.5) / 400, np.maximum(seeds, 2)[..., None] - 1)  # [...,400]
    with _nan_ok():
        sd = np.sqrt(seed_var / seeds + image_var / n)
        se_img = np.sqrt((image_var + within / seeds) / n)
        se_seed = np.sqrt(seed_var / seeds)[..., None] * np.sqrt(w / (seeds[..., None] - 1))
        q_seed = student_t.ppf(1 - alpha / 2, seeds - 1)[..., None]
        q_img = student_t.ppf(1 - alpha / 2, n - 1)[..., None]
        h = np.hypot(q_seed * se_seed, q_img * se_img[..., None])
        e, s = np.abs(effect)[..., None], sd[..., None]
        out = np.mean(norm.sf((h - e) / s) + norm.cdf((-h - e) / s), -1)
    return np.where(seeds >= 2, out, np.nan)


def detectable_effect(noise_: Noise, seeds, alpha=ALPHA, power_: float = POWER) -> np.ndarray:
    """The minimum detectable effect: the true difference that :func:`seed_t_test` finds with
    probability ``power_`` at two-sided level ``alpha`` with ``seeds`` seeds under ``noise_``
    (:func:`power` solved by bisection); NaN with fewer than 2 seeds or unmeasured noise. [C]."""
    seed_var, image_var, within, n, seeds, alpha = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.float64) for a in (*noise_, seeds, alpha)))
    noise_ = Noise(seed_var, image_var, within, n)
    with _nan_ok():
        scale = np.sqrt(seed_var + image_var + within) + 1e-300  # any effect far above is found
    lo, hi = np.zeros(seed_var.shape), scale.copy()
    for _ in range(60):  # widen until found
        short = power(hi, noise_, seeds, alpha) < power_
        if not short.any():
            break
        hi = np.where(short, 2 * hi, hi)
    for _ in range(50):
        mid = (lo + hi) / 2
        found = power(mid, noise_, seeds, alpha) >= power_
        lo, hi = np.where(found, lo, mid), np.where(found, mid, hi)
    bad = ~np.isfinite(seed_var + image_var + within) | (seeds < 2)
    return np.where(bad, np.nan, np.where(scale > 1e-299, hi, 0.0))  # no noise at all: any difference is found


def seeds_needed(effect, noise_: Noise, alpha=ALPHA, power_: float = POWER, max_seeds: int = MAX_SEEDS
                 ) -> np.ndarray:
    """The fewest seeds (2..max_seeds) with which a true difference ``effect`` is found with
    probability ``power_`` at two-sided level ``alpha`` on the same test images under ``noise_``
    (:func:`power`); inf when more than ``max_seeds`` would be needed (also where the test images
    alone cannot resolve it: more seeds do not shrink their part), NaN where the noise is unknown. [C]."""
    effect, seed_var, image_var, within, n, alpha = np.broadcast_arrays(
        *(np.asarray(a, dtype=np.float64) for a in (effect, *noise_, alpha)))
    seeds = np.arange(2, max_seeds + 1, dtype=np.float64)
    grid = power(effect[..., None], Noise(*(v[..., None] for v in (seed_var, image_var, within, n))),
                 seeds, alpha[..., None]) >= power_  # [...,K]
    out = np.where(grid.any(-1), seeds[np.argmax(grid, -1)], np.inf)
    return np.where(np.isfinite(seed_var + image_var + within + effect), out, np.nan)


def hypothesis_verdicts(verdicts_: list[str], expected: list[str]) -> list[str]:
    """A primary hypothesis's verdict from its comparison's (:func:`verdicts`, on Holm-adjusted p) and
    the direction it expected: confirmed (distinguishable, that way), contradicted (distinguishable,
    the other way) or not distinguishable."""
    return [v if v not in (BETTER, WORSE) else CONFIRMED if v == e else CONTRADICTED
            for v, e in zip(verdicts_, expected)]


@contextmanager
def _nan_ok():
    """Silence numpy's empty-slice / all-NaN / degrees-of-freedom warnings: such a value is NaN,
    which is the answer."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
