"""Seed-level statistics: hierarchical bootstrap, bootstrap p, Holm, verdicts."""
import numpy as np
from scipy.stats import wilcoxon

from dad3dlib import stats


def differences(seed_effects, image_sd: float, n: int = 300, rng_seed: int = 0) -> np.ndarray:
    """[1,S,N] per-image differences: one offset per seed (training noise) plus image noise."""
    rng = np.random.default_rng(rng_seed)
    offsets = np.asarray(seed_effects, dtype=np.float64)[:, None]
    return (offsets + rng.normal(0, image_sd, (len(offsets), n)))[None]


def verdict(x: np.ndarray, lower_is_better: bool = True) -> tuple[str, float, float, float]:
    boot = stats.hierarchical_bootstrap(x)
    (lo,), (hi,) = stats.percentile_interval(boot)
    (p,) = stats.bootstrap_p(boot)
    return stats.verdicts(stats.seed_mean(x), [p], [lower_is_better])[0], lo, hi, p


def test_known_effect_is_found_with_its_sign():
    x = differences([1.1, 0.9, 1.0], image_sd=1.0)
    v, lo, hi, p = verdict(x)
    assert 0 < lo < stats.seed_mean(x)[0] < hi and p < 0.01
    assert v == stats.WORSE  # lower is better, the ablation is higher
    assert verdict(x, lower_is_better=False)[0] == stats.BETTER
    assert verdict(-x)[0] == stats.BETTER


def test_null_effect_with_training_noise_is_not_distinguishable():
    """Seeds disagree (+0.8, −0.7, +0.2) while images agree to 0.01: per-image tests see certainty."""
    x = differences([0.8, -0.7, 0.2], image_sd=0.01)
    assert wilcoxon(x[0, 0]).pvalue < 1e-40 and wilcoxon(x[0].ravel()).pvalue < 1e-10
    v, lo, hi, p = verdict(x)
    assert v == stats.NOT_DISTINGUISHABLE and lo < 0 < hi and p > 0.5
    assert lo < -0.6 and hi > 0.7  # the interval spans the seeds, not the image noise


def test_bootstrap_is_the_two_stage_resampling():
    """The vectorised bootstrap equals drawing seeds, then images within each drawn seed, by hand."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 3, 20))
    boot = stats.hierarchical_bootstrap(x, n_boot=5, seed=3)
    r = np.random.default_rng(3)
    seeds, items = r.integers(0, 3, (5, 3)), r.integers(0, 20, (15, 20)).reshape(5, 3, 20)
    by_hand = [[np.mean([x[c, seeds[b, k], items[b, k]].mean() for k in range(3)]) for b in range(5)]
               for c in range(2)]
    np.testing.assert_allclose(boot, by_hand, rtol=1e-12)
    np.testing.assert_array_equal(boot, stats.hierarchical_bootstrap(x, n_boot=5, seed=3))  # reproducible


def test_missing_values_are_left_out():
    x = differences([1.0, 1.2, 0.8], image_sd=0.5, n=50)
    with_nan = np.concatenate([x, np.full((1, 3, 7), np.nan)], axis=2)
    np.testing.assert_allclose(stats.seed_mean(with_nan), stats.seed_mean(x))
    assert np.isfinite(stats.hierarchical_bootstrap(with_nan, n_boot=200)).all()
    assert np.isnan(stats.bootstrap_p(np.full((1, 10), np.nan)))[0]


def test_bootstrap_p_values():
    b = 999
    assert stats.bootstrap_p(np.ones((1, b)))[0] == 2 / (b + 1)
    assert stats.bootstrap_p(np.zeros((1, b)))[0] == 1.0
    sym = np.linspace(-1, 1, b)[None]
    assert stats.bootstrap_p(sym)[0] == 1.0
    assert abs(stats.bootstrap_p(sym + 0.9)[0] - 0.1) < 0.005  # 5 % of draws below 0


def test_holm_on_known_p_values():
    adjusted = stats.holm(np.array([0.01, 0.04, np.nan, 0.03, 0.005]))
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → monotone 0.06
    np.testing.assert_allclose(adjusted, [0.03, 0.06, np.nan, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm(np.array([0.5, 0.9])), [1.0, 1.0])
    assert stats.holm(np.array([])).shape == (0,)


def test_verdicts_follow_direction_and_level():
    got = stats.verdicts([0.5, 0.5, -0.5, 0.5, 0.0], [0.01, 0.01, 0.01, 0.2, 0.0], [True, False, True, True, True])
    assert got == [stats.WORSE, stats.BETTER, stats.BETTER, stats.NOT_DISTINGUISHABLE, stats.NOT_DISTINGUISHABLE]
