"""Bootstrap intervals over prompts: exact resampled statistics, coverage, determinism, one prompt, NaNs."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from memguard.metrics.bootstrap import (
    Above,
    Percentile,
    difference_interval,
    distribution,
    interval,
    resample_counts,
    with_intervals,
)


def prompts_data(n_prompts: int, per_prompt: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Values with a prompt effect (sd 0.1) and image noise (sd 0.05) around 0.5, and their prompt ids."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(rng.permutation(n_prompts) * 7 + 3, per_prompt)  # ids need not be 0..P-1 or sorted
    values = 0.5 + np.repeat(rng.normal(0, 0.1, n_prompts), per_prompt) + rng.normal(0, 0.05, len(ids))
    return values, ids


def expanded(values: np.ndarray, ids: np.ndarray, counts_row: np.ndarray) -> np.ndarray:
    """One resample written out: every image of the j-th prompt (sorted ids) counts_row[j] times."""
    prompts = np.unique(ids)
    return np.concatenate([values[ids == p] for j, p in enumerate(prompts) for _ in range(counts_row[j])])


@pytest.mark.parametrize("statistic", ["mean", Percentile(95), Percentile(3), Above(0.55)])
def test_each_resample_is_the_statistic_of_the_resampled_images(statistic) -> None:
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 9, 60)  # prompts with unequal numbers of images
    values = rng.normal(0.5, 0.2, 60)
    counts = resample_counts(len(np.unique(ids)), 40, seed=11)
    assert (counts.sum(axis=1) == len(np.unique(ids))).all()
    fast = distribution(values, ids, statistic, n=40, seed=11)
    naive = []
    for row in counts:
        x = expanded(values, ids, row)
        naive.append(x.mean() if statistic == "mean" else (x > statistic.threshold).mean()
                     if isinstance(statistic, Above) else np.percentile(x, statistic.q))
    np.testing.assert_allclose(fast, naive, rtol=0, atol=1e-12)


def test_intervals_contain_the_estimate_and_shrink_with_more_prompts() -> None:
    widths = {}
    for n_prompts in (10, 40, 400):
        values, ids = prompts_data(n_prompts)
        for statistic, point in [("mean", values.mean()), (Percentile(95), np.percentile(values, 95)),
                                 (Above(0.6), (values > 0.6).mean())]:
            lo, hi = interval(values, ids, statistic)
            assert lo <= point <= hi, (n_prompts, statistic, lo, point, hi)
        lo, hi = interval(values, ids, "mean")
        widths[n_prompts] = hi - lo
    assert widths[10] > 1.5 * widths[40] > 1.5 * 1.5 * widths[400]  # about 1/sqrt(prompts)


def test_coverage_of_the_mean_on_synthetic_prompts() -> None:
    """95% intervals of the mean of 200 synthetic runs (40 prompts x 4 images) cover the true mean 0.5 about
    95% of the time; resampling images instead of prompts (ignoring the prompt effect) would cover far less."""
    hits = 0
    runs = 200
    for seed in range(runs):
        values, ids = prompts_data(40, seed=seed)
        lo, hi = interval(values, ids, "mean", n=500, seed=seed)
        hits += lo <= 0.5 <= hi
    assert 0.88 * runs <= hits <= 0.99 * runs, hits
    naive = sum(interval(v, np.arange(len(v)), "mean", n=500)[0] <= 0.5 <= interval(v, np.arange(len(v)), "mean", n=500)[1]
                for v, _ in (prompts_data(40, seed=s) for s in range(60)))
    assert naive < 0.85 * 60  # images treated as independent: too narrow


def test_same_seed_same_interval_other_seed_other_interval() -> None:
    values, ids = prompts_data(30)
    assert interval(values, ids, Percentile(95), seed=0) == interval(values, ids, Percentile(95), seed=0)
    assert interval(values, ids, Percentile(95), seed=0) != interval(values, ids, Percentile(95), seed=1)
    shuffled = np.random.default_rng(2).permutation(len(values))  # row order does not matter
    np.testing.assert_allclose(interval(values[shuffled], ids[shuffled], "mean"), interval(values, ids, "mean"))


def test_one_prompt_has_no_interval_and_nans_are_left_out() -> None:
    assert all(math.isnan(b) for b in interval([0.1, 0.2, 0.3], [4, 4, 4], "mean"))
    assert all(math.isnan(b) for b in interval([], [], Percentile(95)))
    values, ids = prompts_data(20)
    with_nans = np.concatenate([values, [np.nan] * 8])
    nan_ids = np.concatenate([ids, [ids[0]] * 4 + [999] * 4])  # prompt 999 has only NaNs: never drawn
    assert interval(with_nans, nan_ids, "mean") == interval(values, ids, "mean")
    assert not any(math.isnan(b) for b in interval(with_nans, nan_ids, Percentile(95)))
    assert all(math.isnan(b) for b in interval([0.1, np.nan], [1, 2], "mean"))  # one prompt left


def test_difference_is_paired_on_the_same_prompts() -> None:
    values, ids = prompts_data(30)
    shifted = values - 0.01 + np.random.default_rng(3).normal(0, 0.001, len(values))
    lo, hi = difference_interval(values, ids, shifted, ids)
    assert 0.009 < lo <= hi < 0.011  # paired: the prompt effect cancels
    unpaired_lo, unpaired_hi = difference_interval(values, ids, shifted, ids + 1)  # other prompts: independent
    assert unpaired_hi - unpaired_lo > 10 * (hi - lo)


def test_with_intervals_keeps_keys_and_writes_none_for_nan() -> None:
    out = with_intervals({"p95": 0.9, "std": 0.1, "mean": 0.5}, {"p95": (0.8, 0.95), "mean": (math.nan, math.nan)})
    assert list(out) == ["p95", "p95_lo", "p95_hi", "std", "mean", "mean_lo", "mean_hi"]
    assert out["p95_lo"] == 0.8 and out["mean_lo"] is None and out["std"] == 0.1


def test_ten_thousand_images_take_seconds() -> None:
    values, ids = prompts_data(2500, per_prompt=4)
    start = time.perf_counter()
    for statistic in ("mean", Percentile(95), Above(0.6), Above(0.5)):
        interval(values, ids, statistic)
    assert time.perf_counter() - start < 10
