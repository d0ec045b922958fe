"""Paired statistics of per-case score differences: SciPy's Wilcoxon signed-rank test and bootstrap CI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass
class PairedResult:
    """A − B over paired cases: mean difference, its bootstrap CI, the Wilcoxon p-value and the means."""

    cases: int
    mean_a: float
    mean_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float | None


def paired_comparison(a: Sequence[float], b: Sequence[float], seed: int = 0) -> PairedResult:
    """Compare paired scores ``a`` and ``b`` (same cases, same order).

    p: two-sided Wilcoxon signed-rank test (zero differences dropped, SciPy's default; None when every
    difference is zero or there is one case). CI: percentile bootstrap of the mean difference over cases,
    ``BOOTSTRAP_RESAMPLES`` resamples with ``seed``.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = a - b
    p_value = None
    if diff.size > 1 and np.any(diff != 0):
        p_value = float(stats.wilcoxon(a, b).pvalue)
    if diff.size > 1 and np.ptp(diff) > 0:
        boot = stats.bootstrap((diff,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                               method="percentile", random_state=np.random.default_rng(seed))
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    else:  # no spread: the CI is the single value
        low = high = float(diff.mean()) if diff.size else float("nan")
    return PairedResult(int(diff.size), float(a.mean()), float(b.mean()), float(diff.mean()), low, high, p_value)


def seed_spread(run_means: Sequence[float]) -> float | None:
    """Sample standard deviation of one method's dataset scores over its seeds (None for a single run)."""
    values = np.asarray(run_means, float)
    return float(values.std(ddof=1)) if values.size > 1 else None
