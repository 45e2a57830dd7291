"""Bootstrap intervals against independent references: scipy.stats.bootstrap called directly, and a paired bootstrap
written here in numpy from the same resampled indices."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.stats

from kldb.metrics import (
    BOOTSTRAP_CONFIDENCE,
    BOOTSTRAP_METHOD,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    bootstrap_settings,
    median_interval,
    paired_relative_change_interval,
)

SAMPLE = np.random.default_rng(11).gamma(2.0, size=37)


def scipy_interval(samples, statistic, resamples, seed, confidence, method, paired=False):
    result = scipy.stats.bootstrap(
        samples,
        statistic,
        n_resamples=resamples,
        confidence_level=confidence,
        method=method,
        paired=paired,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def numpy_paired_interval(guided, baseline, resamples, seed, confidence):
    """A paired percentile bootstrap by hand: draw seed indices, keep each seed's two values together."""
    n = len(guided)
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # the draws scipy makes
    changes = np.median(guided[indices], axis=1) / np.median(baseline[indices], axis=1) - 1.0
    tail = (1.0 - confidence) / 2
    return tuple(np.quantile(changes, [tail, 1.0 - tail]))


def test_defaults_are_recorded():
    record = bootstrap_settings()
    defaults = (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, BOOTSTRAP_CONFIDENCE, BOOTSTRAP_METHOD)
    assert defaults == (2000, 0, 0.95, "percentile")
    assert (record["resamples"], record["seed"], record["confidence"], record["method"]) == defaults
    assert record["implementation"] == f"scipy.stats.bootstrap (scipy {scipy.__version__})"


@pytest.mark.parametrize("method", ["percentile", "basic", "BCa"])
@pytest.mark.parametrize(("resamples", "seed", "confidence"), [(999, 7, 0.95), (500, 0, 0.9)])
def test_median_interval_equals_scipy(method, resamples, seed, confidence):
    got = median_interval(SAMPLE, resamples=resamples, seed=seed, confidence=confidence, method=method)
    assert got == scipy_interval((SAMPLE,), np.median, resamples, seed, confidence, method)
    assert got[0] < float(np.median(SAMPLE)) < got[1]


def test_median_interval_equals_a_numpy_percentile_bootstrap():
    indices = np.random.default_rng(3).integers(0, len(SAMPLE), size=(800, len(SAMPLE)))
    medians = np.median(SAMPLE[indices], axis=1)
    expected = np.quantile(medians, [0.025, 0.975])
    assert median_interval(SAMPLE.tolist(), resamples=800, seed=3) == pytest.approx(tuple(expected), abs=1e-12)


def test_median_interval_is_reproducible_and_depends_on_the_seed():
    assert median_interval(SAMPLE, seed=5) == median_interval(SAMPLE, seed=5)
    # resampled medians of 37 values are order statistics, so nearby seeds may share an interval; five do not
    assert len({median_interval(SAMPLE, resamples=200, seed=s) for s in range(5)}) > 1


def paired_sample(seed=0, n=24):
    rng = np.random.default_rng(seed)
    baseline = rng.gamma(3.0, size=n)
    guided = baseline * rng.uniform(0.3, 0.7, size=n)  # strongly correlated with its own seed's baseline
    return guided, baseline


def test_paired_interval_equals_numpy_paired_bootstrap():
    guided, baseline = paired_sample()
    seeds = [int(s) for s in np.random.default_rng(1).permutation(np.arange(100, 124))]  # scrambled keys
    guided_by_seed = {s: float(v) for s, v in zip(seeds, guided)}
    baseline_by_seed = {s: float(v) for s, v in zip(seeds, baseline)}
    guided_by_seed[999] = 50.0  # a seed only the guided setting has: left out
    baseline_by_seed[-5] = 0.001  # and one only the baseline has
    result = paired_relative_change_interval(guided_by_seed, baseline_by_seed, resamples=1500, seed=4)

    order = np.argsort(seeds)  # the pairs in sorted seed order
    expected = numpy_paired_interval(guided[order], baseline[order], 1500, 4, 0.95)
    assert (result["low"], result["high"]) == pytest.approx(expected, abs=1e-12)
    assert result["change"] == pytest.approx(np.median(guided) / np.median(baseline) - 1.0, abs=1e-12)
    assert result["n_paired"] == 24
    assert (result["low"], result["high"]) == scipy_interval(
        (guided[order], baseline[order]),
        lambda g, b, axis: np.median(g, axis=axis) / np.median(b, axis=axis) - 1.0,
        1500,
        4,
        0.95,
        "percentile",
        paired=True,
    )


def test_pairing_is_by_seed_not_by_position():
    guided, baseline = paired_sample(seed=2)
    guided_by_seed = dict(enumerate(guided.tolist()))
    baseline_by_seed = dict(enumerate(baseline.tolist()))
    result = paired_relative_change_interval(guided_by_seed, baseline_by_seed)
    # the same pairs in another record order: the same interval
    reordered = dict(reversed(list(baseline_by_seed.items())))
    assert paired_relative_change_interval(guided_by_seed, reordered) == result
    # the same values, assigned to other seeds: another interval (wider, as the pairing no longer cancels noise)
    shuffled = dict(zip(baseline_by_seed, np.random.default_rng(0).permutation(baseline).tolist()))
    broken = paired_relative_change_interval(guided_by_seed, shuffled)
    assert broken["change"] == pytest.approx(result["change"])  # medians do not see the pairing
    assert broken["high"] - broken["low"] > 1.5 * (result["high"] - result["low"])


def test_constant_sample_gives_a_point_for_every_method():
    for method in ("percentile", "basic", "BCa"):
        assert median_interval([2.5, 2.5, 2.5, 2.5], method=method) == (2.5, 2.5)
    with pytest.warns(RuntimeWarning):  # the reason for the rule: scipy's BCa has no interval there
        bca = scipy.stats.bootstrap(([2.5, 2.5, 2.5, 2.5],), np.median, method="BCa", rng=np.random.default_rng(0))
    assert np.isnan(bca.confidence_interval.low)
    result = paired_relative_change_interval({0: 1.0, 1: 1.0, 2: 1.0}, {0: 4.0, 1: 4.0, 2: 4.0}, method="BCa")
    assert result == {"change": -0.75, "low": -0.75, "high": -0.75, "n_paired": 3}


def test_one_value_or_one_pair_has_no_interval():
    assert median_interval([0.7]) == (None, None)
    one = paired_relative_change_interval({3: 1.0, 4: 2.0}, {3: 2.0})
    assert one == {"change": -0.5, "low": None, "high": None, "n_paired": 1}
    none = paired_relative_change_interval({3: 1.0}, {4: 2.0})
    assert none == {"change": None, "low": None, "high": None, "n_paired": 0}


def test_degenerate_bca_is_reported_as_no_interval(caplog):
    sample = [0.0] * 7 + [1.0]  # nearly every resampled median is the observed one
    with caplog.at_level(logging.WARNING, logger="kldb.metrics"):
        assert median_interval(sample, method="BCa") == (None, None)
    assert "The BCa bootstrap gave no finite interval" in caplog.text
    low, high = median_interval(sample)  # the percentile interval exists
    assert low == 0.0 and high in (0.0, 0.5, 1.0)


def test_zero_baseline_median_has_no_change():
    result = paired_relative_change_interval({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert result == {"change": None, "low": None, "high": None, "n_paired": 3}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resamples": 0}, "Expected argument `resamples` to be a positive integer but got 0."),
        ({"resamples": -3}, "Expected argument `resamples` to be a positive integer but got -3."),
        ({"resamples": 2.5}, "Expected argument `resamples` to be a positive integer but got 2.5."),
        ({"resamples": True}, "Expected argument `resamples` to be a positive integer but got True."),
        ({"seed": -1}, "Expected argument `seed` to be an integer >= 0 but got -1."),
        ({"seed": "0"}, "Expected argument `seed` to be an integer >= 0 but got '0'."),
        ({"confidence": 0.0}, r"Expected argument `confidence` to be a number in \(0, 1\) but got 0.0."),
        ({"confidence": 1}, r"Expected argument `confidence` to be a number in \(0, 1\) but got 1."),
        ({"confidence": 95}, r"Expected argument `confidence` to be a number in \(0, 1\) but got 95."),
        ({"confidence": float("nan")}, r"Expected argument `confidence` to be a number in \(0, 1\) but got nan."),
        (
            {"method": "bca"},
            r"Expected argument `method` to be one of \['percentile', 'basic', 'BCa'\] but got 'bca'.",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        median_interval(SAMPLE, **kwargs)
    with pytest.raises(ValueError, match=message):
        paired_relative_change_interval({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}, **kwargs)


def test_prefixed_names_and_bad_values():
    with pytest.raises(ValueError, match="Expected argument `bootstrap_resamples` to be a positive integer but got 0"):
        bootstrap_settings(resamples=0, prefix="bootstrap_")
    with pytest.raises(
        ValueError, match="Expected argument `values` to be a non-empty 1-d sequence of finite numbers"
    ):
        median_interval([])
    with pytest.raises(
        ValueError, match="Expected argument `values` to be a non-empty 1-d sequence of finite numbers"
    ):
        median_interval([1.0, float("inf")])
    with pytest.raises(
        ValueError, match="Expected argument `guided` to be a non-empty 1-d sequence of finite numbers"
    ):
        paired_relative_change_interval({0: float("nan"), 1: 1.0}, {0: 1.0, 1: 1.0})
    with pytest.raises(
        ValueError, match="Expected argument `baseline` to be a non-empty 1-d sequence of finite numbers"
    ):
        paired_relative_change_interval({0: 1.0, 1: 1.0}, {0: 1.0, 1: None})
