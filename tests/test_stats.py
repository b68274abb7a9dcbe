"""Seed-level statistics: Student-t interval over seeds with the test-image SE, Holm, verdicts."""
import numpy as np
import pytest
from scipy.stats import t as student_t
from scipy.stats import ttest_1samp, wilcoxon

from dad3dlib import stats


def differences(seed_effects, image_sd: float, n: int = 300, rng_seed: int = 0) -> np.ndarray:
    """[1,S,N] per-image differences: one offset per seed (training noise) plus image noise."""
    rng = np.random.default_rng(rng_seed)
    offsets = np.asarray(seed_effects, dtype=np.float64)[:, None]
    return (offsets + rng.normal(0, image_sd, (len(offsets), n)))[None]


def verdict(x: np.ndarray, lower_is_better: bool = True) -> tuple[str, stats.SeedTest]:
    r = stats.seed_t_test(x)
    return stats.verdicts(r.delta, r.p, [lower_is_better])[0], r


def test_known_effect_is_found_with_its_sign():
    x = differences([1.1, 0.9, 1.0], image_sd=1.0)
    v, r = verdict(x)
    assert 0 < r.lo[0] < r.delta[0] < r.hi[0] and r.p[0] < 0.01
    assert v == stats.WORSE  # lower is better, the ablation is higher
    assert verdict(x, lower_is_better=False)[0] == stats.BETTER
    assert verdict(-x)[0] == stats.BETTER


def test_null_effect_with_training_noise_is_not_distinguishable():
    """Seeds disagree (+0.8, −0.7, +0.2) while images agree to 0.01: per-image tests, and the
    test-image-only interval, see certainty; the seed-level interval does not."""
    x = differences([0.8, -0.7, 0.2], image_sd=0.01)
    assert wilcoxon(x[0, 0]).pvalue < 1e-40 and wilcoxon(x[0].ravel()).pvalue < 1e-10
    v, r = verdict(x)
    assert v == stats.NOT_DISTINGUISHABLE and r.lo[0] < 0 < r.hi[0] and r.p[0] > 0.5
    assert r.lo[0] < -0.7 and r.hi[0] > 0.8  # the interval spans the seeds, not the image noise
    assert 0 < r.img_lo[0] < r.img_hi[0] < 0.11  # test images alone: narrow, excludes 0
    assert np.isclose(r.delta_sd[0], np.std(x[0].mean(1), ddof=1))


def test_seed_level_part_is_the_one_sample_t_test_of_the_per_seed_differences():
    """Without image noise the interval and p are scipy's one-sample t-test on the S per-seed means."""
    x = np.repeat(np.array([[0.3, 0.5, 0.1, 0.6]])[..., None], 40, axis=2)  # [1,4,40], constant over images
    r = stats.seed_t_test(x)
    ref = ttest_1samp(x[0, :, 0], 0.0)
    ci = ref.confidence_interval(0.95)
    np.testing.assert_allclose([r.lo[0], r.hi[0], r.p[0]], [ci.low, ci.high, ref.pvalue], rtol=1e-10)
    assert r.se_img[0] == 0 and r.img_lo[0] == r.img_hi[0] == r.delta[0]


def test_image_noise_shared_by_the_seeds_is_added():
    """Every seed sees the same images: seeds agree exactly, yet the test split is a sample of images
    whose mean difference is uncertain. The seed spread is 0; the image SE keeps the interval honest."""
    per_image = np.random.default_rng(2).normal(0.1, 2.0, 60)
    x = np.tile(per_image, (3, 1))[None]  # [1,3,60]
    v, r = verdict(x)
    assert r.delta_sd[0] == 0 and v == stats.NOT_DISTINGUISHABLE and r.lo[0] < 0 < r.hi[0]
    se_img = per_image.std(ddof=1) / np.sqrt(60)
    np.testing.assert_allclose(r.se_img[0], se_img, rtol=1e-12)
    np.testing.assert_allclose(r.hi[0] - r.delta[0], student_t.ppf(0.975, 59) * se_img, rtol=1e-12)  # images' own t
    ci = ttest_1samp(per_image, 0.0).confidence_interval(0.95)  # test images only: paired t over images
    np.testing.assert_allclose([r.img_lo[0], r.img_hi[0]], [ci.low, ci.high], rtol=1e-10)


def test_both_parts_add_in_quadrature():
    """Each part's margin uses its own t quantile (seeds: S-1 df, images: N-1 df); the margins add in
    quadrature, and the p-value is the level at which the interval's edge reaches 0."""
    rng = np.random.default_rng(4)
    x = rng.normal(0.2, 1.0, (2, 3, 50)) + rng.normal(0, 0.5, (2, 3, 1))
    r = stats.seed_t_test(x)
    d, m = x.mean(2), x.mean(1)
    se_seed, se_img = np.sqrt(d.var(1, ddof=1) / 3), np.sqrt(m.var(1, ddof=1) / 50)
    margin = lambda a: np.hypot(student_t.ppf(1 - a / 2, 2) * se_seed, student_t.ppf(1 - a / 2, 49) * se_img)  # noqa: E731
    np.testing.assert_allclose(r.hi - r.delta, margin(0.05), rtol=1e-12)
    np.testing.assert_allclose(margin(r.p), np.abs(d.mean(1)), rtol=1e-6)


def test_a_large_effect_with_tight_seeds_is_found_despite_few_seeds():
    """21° worse on every seed with a seed spread of 0.2° and large per-image scatter: the image part
    dominates and is judged with its own degrees of freedom (a single t on 2 df would call it noise)."""
    rng = np.random.default_rng(6)
    x = 21.0 + rng.normal(0, 0.2, (1, 3, 1)) + rng.normal(0, 20.0, (1, 1, 300)) + rng.normal(0, 1.0, (1, 3, 300))
    r = stats.seed_t_test(x)
    assert r.p[0] < 0.05 / 35 and r.lo[0] > 15


@pytest.mark.parametrize("n_seeds", [2, 3])
def test_false_positive_rate_under_a_null_effect(n_seeds):
    """400 simulated studies with no true effect: training noise (SD 1 per seed) dominates, images
    add a shared part and per-run noise. The t rule declares at most about 5 % significant at 0.05
    (fewer with 2 seeds: the image SE is a floor under the seed SE, which a t quantile on 1 degree of
    freedom makes conservative); the old percentile bootstrap over seeds declares every study whose
    seeds agree in sign (1/4 with 3 seeds, 1/2 with 2)."""
    rng = np.random.default_rng(5)
    c, n = 400, 100
    x = rng.normal(0, 1, (c, n_seeds, 1)) + rng.normal(0, 1, (c, 1, n)) + rng.normal(0, 1, (c, n_seeds, n))
    new = stats.seed_t_test(x).p < 0.05
    assert new.mean() <= 0.08 and new.any()
    # the old rule: percentile interval of the mean over seeds drawn with replacement excludes 0
    boot = x.mean(2)[:, rng.integers(0, n_seeds, (2000, n_seeds))].mean(-1)  # [C,B]
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=1)
    old = (lo > 0) | (hi < 0)
    assert old.mean() >= 0.18 and old.mean() > 3 * new.mean()


def test_one_seed_gives_only_the_test_image_interval():
    x = differences([0.5], image_sd=1.0, n=80)
    r = stats.seed_t_test(x)
    assert np.isnan([r.lo[0], r.hi[0], r.p[0], r.delta_sd[0]]).all()
    ci = ttest_1samp(x[0, 0], 0.0).confidence_interval(0.95)
    np.testing.assert_allclose([r.img_lo[0], r.img_hi[0]], [ci.low, ci.high], rtol=1e-10)


def test_missing_values_are_left_out():
    x = differences([1.0, 1.2, 0.8], image_sd=0.5, n=50)
    with_nan = np.concatenate([x, np.full((1, 3, 7), np.nan)], axis=2)
    for a, b in zip(stats.seed_t_test(with_nan), stats.seed_t_test(x)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    lost_seed = x.copy()
    lost_seed[:, 2] = np.nan  # a run without per-sample values: 2 seeds, 1 degree of freedom
    for a, b in zip(stats.seed_t_test(lost_seed), stats.seed_t_test(x[:, :2])):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_t_interval_edge_cases():
    lo, hi, p = stats.t_interval([0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, np.nan], [2, 2, 0, 2])
    np.testing.assert_array_equal(p[:2], [1.0, 0.0])  # no variation: 0 is p = 1, anything else p = 0
    assert np.isnan([lo[2], hi[2], p[2], lo[3], p[3]]).all()  # no degrees of freedom, or no SE


def test_holm_on_known_p_values():
    adjusted = stats.holm(np.array([0.01, 0.04, np.nan, 0.03, 0.005]))
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → monotone 0.06
    np.testing.assert_allclose(adjusted, [0.03, 0.06, np.nan, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm(np.array([0.5, 0.9])), [1.0, 1.0])
    assert stats.holm(np.array([])).shape == (0,)


def test_verdicts_follow_direction_and_level():
    got = stats.verdicts([0.5, 0.5, -0.5, 0.5, 0.0], [0.01, 0.01, 0.01, 0.2, 0.0], [True, False, True, True, True])
    assert got == [stats.WORSE, stats.BETTER, stats.BETTER, stats.NOT_DISTINGUISHABLE, stats.NOT_DISTINGUISHABLE]


# --------------------------------------------------------------------------------------------
# What a study could have detected: simulated studies under the interval's own model
# --------------------------------------------------------------------------------------------
def simulate(effect, sd_seed, sd_image, sd_within, n_seeds, n_images, studies, rng):
    """[C,S,N] per-image differences x[s, i] = effect + a_s + b_i + e_si: C studies of S seeds on N images."""
    return (effect + rng.normal(0, sd_seed, (studies, n_seeds, 1)) + rng.normal(0, sd_image, (studies, 1, n_images))
            + rng.normal(0, sd_within, (studies, n_seeds, n_images)))


def true_noise(sd_seed, sd_image, sd_within, n_images) -> stats.Noise:
    return stats.Noise(np.array(sd_seed ** 2 + sd_within ** 2 / n_images), np.array(sd_image ** 2),
                       np.array(sd_within ** 2), np.array(float(n_images)))


def rejection_rate(x, alpha) -> float:
    return float((stats.seed_t_test(x).p < alpha).mean())


STUDIES = 2000  # Monte-Carlo SE of a rate near 0.8: 0.009; the tolerances below are 4 of them
NOISE_CASES = [  # (sd_seed, sd_image, sd_within, seeds, images, alpha)
    (1.0, 0.5, 1.0, 3, 200, stats.ALPHA),             # training noise dominates: a t on 2 df
    (0.05, 2.0, 1.0, 3, 200, stats.ALPHA / 7),        # the images dominate, at Holm's most demanding step of 7
    (0.3, 0.3, 3.0, 2, 150, stats.ALPHA),             # seed x image noise, 2 seeds (1 df)
    (0.5, 1.0, 2.0, 5, 200, stats.ALPHA / 7),         # all three, 5 seeds
]


@pytest.mark.parametrize("sd_seed, sd_image, sd_within, n_seeds, n_images, alpha", NOISE_CASES)
def test_the_detectable_effect_is_found_by_80_percent_of_simulated_studies(sd_seed, sd_image, sd_within, n_seeds,
                                                                           n_images, alpha):
    """At the minimum detectable effect the study's own test (seed_t_test's p below alpha) rejects in
    about 80 % of studies simulated under the model; at half of it, far fewer."""
    rng = np.random.default_rng(11)
    noise = true_noise(sd_seed, sd_image, sd_within, n_images)
    mde = float(stats.detectable_effect(noise, n_seeds, alpha))
    assert np.isclose(stats.power(mde, noise, n_seeds, alpha), stats.POWER, atol=1e-6)
    x = simulate(mde, sd_seed, sd_image, sd_within, n_seeds, n_images, STUDIES, rng)
    assert abs(rejection_rate(x, alpha) - stats.POWER) < 0.036
    assert abs(rejection_rate(-x, alpha) - stats.POWER) < 0.036  # two-sided
    half = simulate(mde / 2, sd_seed, sd_image, sd_within, n_seeds, n_images, STUDIES, rng)
    assert abs(rejection_rate(half, alpha) - stats.power(mde / 2, noise, n_seeds, alpha)) < 0.036
    assert rejection_rate(half, alpha) < 0.6


def test_power_without_an_effect_is_at_most_the_level():
    for sd_seed, sd_image, sd_within, n_seeds, n_images, alpha in NOISE_CASES:
        assert stats.power(0.0, true_noise(sd_seed, sd_image, sd_within, n_images), n_seeds, alpha) <= alpha * 1.05


@pytest.mark.parametrize("sd_seed, sd_image, sd_within, alpha", [(1.0, 0.5, 1.0, stats.ALPHA),
                                                                 (0.5, 1.0, 2.0, stats.ALPHA / 7)])
def test_seeds_needed_is_the_fewest_that_find_the_effect_80_percent_of_the_time(sd_seed, sd_image, sd_within, alpha):
    """With the seeds it names, simulated studies find the effect at least 80 % of the time; with
    one seed fewer, less often (the power, checked against simulation at both)."""
    rng = np.random.default_rng(12)
    noise, effect = true_noise(sd_seed, sd_image, sd_within, 200), 1.3
    k = int(stats.seeds_needed(effect, noise, alpha))
    assert 3 <= k < stats.MAX_SEEDS
    assert stats.power(effect, noise, k - 1, alpha) < stats.POWER <= stats.power(effect, noise, k, alpha)
    for seeds in (k - 1, k):
        rate = rejection_rate(simulate(effect, sd_seed, sd_image, sd_within, seeds, 200, STUDIES, rng), alpha)
        assert abs(rate - stats.power(effect, noise, seeds, alpha)) < 0.036
    assert stats.detectable_effect(noise, k, alpha) <= effect < stats.detectable_effect(noise, k - 1, alpha)


def test_an_effect_below_the_test_images_resolution_is_not_resolved_by_seeds():
    """More seeds shrink the training-noise part only: an effect well inside the test images' own
    noise (σ_b/√N) needs more than MAX_SEEDS seeds, reported as inf; unknown noise gives NaN."""
    noise = true_noise(0.5, 3.0, 1.0, 100)
    assert np.isinf(stats.seeds_needed(0.5 * 3.0 / np.sqrt(100), noise))
    assert np.isfinite(stats.seeds_needed(4 * 3.0 / np.sqrt(100), noise))
    unknown = stats.Noise(np.array(np.nan), np.array(1.0), np.array(1.0), np.array(100.0))
    assert np.isnan(stats.seeds_needed(1.0, unknown)) and np.isnan(stats.detectable_effect(unknown, 3))
    assert np.isnan(stats.detectable_effect(noise, 1))  # one seed: training noise unmeasured


def test_noise_components_are_estimated_from_the_differences():
    """The two-way decomposition recovers the simulated variances on average (each study's estimate
    from 3 seeds is noisy; the mean over 1000 studies is close); images missing from a seed are left out."""
    rng = np.random.default_rng(13)
    x = simulate(0.7, 0.8, 1.5, 2.0, 3, 120, 1000, rng)
    est, truth = stats.noise(x), true_noise(0.8, 1.5, 2.0, 120)
    for got, want in zip(est[:3], truth[:3]):
        assert abs(got.mean() - want) < 0.06 * want + 0.02
    assert (est.n_images == 120).all()
    x[:, 0, :20] = np.nan
    assert (stats.noise(x).n_images == 100).all() and np.isfinite(stats.noise(x).seed_var).all()
    assert np.isnan(stats.noise(x[:, :1]).seed_var).all()  # one seed: nothing to estimate


def test_hypothesis_verdicts():
    got = stats.hypothesis_verdicts([stats.WORSE, stats.WORSE, stats.BETTER, stats.NOT_DISTINGUISHABLE],
                                    [stats.WORSE, stats.BETTER, stats.BETTER, stats.WORSE])
    assert got == [stats.CONFIRMED, stats.CONTRADICTED, stats.CONFIRMED, stats.NOT_DISTINGUISHABLE]
