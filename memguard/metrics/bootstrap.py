"""Bootstrap intervals over prompts: how much a run's number would move with other prompts of the same kind.

A run's images are not independent: the images of one prompt share its caption (and, for a memorized prompt,
its training image), so the unit resampled is the prompt. Each of ``n`` resamples draws as many prompts as the
run has, with replacement (numpy ``default_rng(seed)``), and takes every image of a drawn prompt, once per
draw; the statistic of each resample is computed on that multiset of images, and the interval is the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the ``n`` values (the percentile bootstrap).

Statistics: ``"mean"``, :class:`Percentile` (``numpy.percentile``'s linear interpolation, exactly as if each
image were repeated as often as its prompt was drawn) and :class:`Above` (the fraction of images above a
threshold, e.g. the copy fraction). All are vectorised: one ``(n, prompts)`` matrix of draw counts, matrix
products for means and fractions, cumulative weights for percentiles; 1000 resamples of 10,000 images take
well under a second per statistic.

NaN values (an image that could not be scored) are left out with their prompt; a prompt left with no value is
not drawn. With fewer than two prompts there is nothing to resample: the interval is ``(nan, nan)``.
The same values, prompts and seed give the same interval; two value arrays over the same prompts get the same
draws (the draws depend only on the number of prompts and the seed), so their difference is paired.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Percentile:
    """The ``q``-th percentile (0-100), linear interpolation as ``numpy.percentile``."""

    q: float


@dataclass(frozen=True)
class Above:
    """The fraction of values strictly above ``threshold``."""

    threshold: float


Statistic = Literal["mean"] | Percentile | Above
ArrayLike = np.ndarray | Sequence[float]


def describe(n: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict[str, object]:
    """What an interval was computed with, as ``metrics.json`` records it."""
    return {"method": "percentile bootstrap over prompts", "level": level, "resamples": n, "seed": seed}


def resample_counts(n_prompts: int, n: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(n, n_prompts)``: how often each prompt is drawn in each resample (every row sums to ``n_prompts``)."""
    draws = np.random.default_rng(seed).integers(0, n_prompts, size=(n, n_prompts))
    flat = (draws + (np.arange(n) * n_prompts)[:, None]).ravel()
    return np.bincount(flat, minlength=n * n_prompts).reshape(n, n_prompts).astype(np.int32)


def _valid(values: ArrayLike, prompt_ids: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """The non-NaN values, their prompts as codes ``0..P-1`` (prompt ids in sorted order) and ``P``."""
    values = np.asarray(values, dtype=np.float64)
    prompt_ids = np.asarray(prompt_ids)
    if values.shape != prompt_ids.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and prompt_ids {prompt_ids.shape} must be 1-d and of one length")
    keep = ~np.isnan(values)
    _, codes = np.unique(prompt_ids[keep], return_inverse=True)
    return values[keep], codes.ravel(), int(codes.max()) + 1 if codes.size else 0


def _statistic(values: np.ndarray, statistic: Statistic) -> float:
    if statistic == "mean":
        return float(values.mean())
    if isinstance(statistic, Above):
        return float((values > statistic.threshold).mean())
    if isinstance(statistic, Percentile):
        return float(np.percentile(values, statistic.q))
    raise TypeError(f"statistic {statistic!r} is not 'mean', Percentile(q) or Above(threshold)")


def _per_resample(values: np.ndarray, codes: np.ndarray, counts: np.ndarray, statistic: Statistic,
                  max_cells: int = 20_000_000) -> np.ndarray:
    """The statistic of every resample (row of ``counts``) of ``values`` grouped by prompt ``codes``."""
    n, n_prompts = counts.shape
    if statistic == "mean" or isinstance(statistic, Above):
        x = values if statistic == "mean" else (values > statistic.threshold).astype(np.float64)
        sums = np.bincount(codes, weights=x, minlength=n_prompts)
        sizes = np.bincount(codes, minlength=n_prompts).astype(np.float64)
        return (counts @ sums) / (counts @ sizes)
    if not isinstance(statistic, Percentile):
        _statistic(values, statistic)  # raises
    # Percentile: each image weighted by how often its prompt was drawn; numpy's linear interpolation on the
    # sorted multiset, whose k-th element (0-based) is the first sorted value whose cumulative weight exceeds k.
    order = np.argsort(values, kind="stable")
    ordered, ordered_codes = values[order], codes[order]
    q = statistic.q / 100.0
    out = np.empty(n)
    step = max(1, max_cells // max(len(values), 1))
    for start in range(0, n, step):
        cum = np.cumsum(counts[start:start + step][:, ordered_codes], axis=1, dtype=np.int64)
        total = cum[:, -1]
        h = (total - 1) * q
        k0 = np.floor(h).astype(np.int64)
        k1 = np.minimum(k0 + 1, total - 1)
        j0 = (cum <= k0[:, None]).sum(axis=1)
        j1 = (cum <= k1[:, None]).sum(axis=1)
        lo, hi = ordered[j0], ordered[j1]
        out[start:start + step] = lo + (h - k0) * (hi - lo)
    return out


def distribution(values: ArrayLike, prompt_ids: ArrayLike, statistic: Statistic = "mean", n: int = RESAMPLES,
                 seed: int = SEED) -> np.ndarray:
    """The statistic of each of ``n`` resamples over prompts (``(n,)``; empty with fewer than two prompts)."""
    x, codes, n_prompts = _valid(values, prompt_ids)
    if n_prompts < 2:
        return np.empty(0)
    return _per_resample(x, codes, resample_counts(n_prompts, n, seed), statistic)


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie in (0, 1), e.g. 0.95")
    if samples.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def interval(values: ArrayLike, prompt_ids: ArrayLike, statistic: Statistic = "mean", n: int = RESAMPLES,
             seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` bootstrap interval ``(lo, hi)`` of ``statistic`` over prompts; ``(nan, nan)`` with fewer
    than two prompts (after NaN values are left out)."""
    return _bounds(distribution(values, prompt_ids, statistic, n, seed), level)


def intervals(prompt_ids: ArrayLike, statistics: Mapping[str, tuple[ArrayLike, Statistic]], n: int = RESAMPLES,
              seed: int = SEED, level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """``{name: (lo, hi)}`` for several ``name: (values, statistic)`` over the same images and prompts; values
    without NaNs share one set of draws."""
    return {name: interval(values, prompt_ids, statistic, n, seed, level)
            for name, (values, statistic) in statistics.items()}


def difference_interval(values_a: ArrayLike, prompts_a: ArrayLike, values_b: ArrayLike, prompts_b: ArrayLike,
                        statistic: Statistic = "mean", n: int = RESAMPLES, seed: int = SEED,
                        level: float = LEVEL) -> tuple[float, float]:
    """The interval of ``statistic(a) - statistic(b)`` (e.g. a mitigation's alignment minus the unmitigated
    run's). Paired, with the same draws on both sides, where both score the same prompts (after NaNs are left
    out); otherwise each side is resampled on its own (seeds ``seed`` and ``seed + 1``)."""
    xa, _, pa = _valid(values_a, prompts_a)
    xb, _, pb = _valid(values_b, prompts_b)
    ids_a = np.unique(np.asarray(prompts_a)[~np.isnan(np.asarray(values_a, dtype=np.float64))])
    ids_b = np.unique(np.asarray(prompts_b)[~np.isnan(np.asarray(values_b, dtype=np.float64))])
    paired = len(ids_a) == len(ids_b) and bool(np.all(ids_a == ids_b))
    if min(pa, pb) < 2 or xa.size == 0 or xb.size == 0:
        return math.nan, math.nan
    a = distribution(values_a, prompts_a, statistic, n, seed)
    b = distribution(values_b, prompts_b, statistic, n, seed if paired else seed + 1)
    return _bounds(a - b, level)


def with_intervals(summary: Mapping[str, object], bounds: Mapping[str, tuple[float, float]]) -> dict[str, object]:
    """``summary`` with ``<name>_lo`` and ``<name>_hi`` right after each ``name`` of ``bounds`` (NaN bounds as
    None, which JSON writes as null); every other key and value as it was."""
    out: dict[str, object] = {}
    for key, value in summary.items():
        out[key] = value
        if key in bounds:
            lo, hi = bounds[key]
            out[f"{key}_lo"] = None if math.isnan(lo) else lo
            out[f"{key}_hi"] = None if math.isnan(hi) else hi
    return out
