"""Pair two methods' per-case scores (averaged over each method's seed runs) and test the difference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from usema.comparison.report import to_json
from usema.comparison.scores import CaseScores, read_scores
from usema.comparison.stats import PairedResult, paired_comparison, seed_spread
from usema.errors import UsemaError


def _same_cases(runs: list[CaseScores]) -> list[str]:
    cases = sorted(runs[0].overall)
    for run in runs[1:]:
        if sorted(run.overall) != cases:
            missing = sorted(set(cases) ^ set(run.overall))[:5]
            raise UsemaError(f"{run.source}: expected the same cases as {runs[0].source}; differs in {missing}")
    return cases


def _mean_over_runs(runs: list[CaseScores], cases: list[str]) -> np.ndarray:
    return np.mean([[run.overall[c] for c in cases] for run in runs], axis=0)


def _class_pairs(a: list[CaseScores], b: list[CaseScores], seed: int) -> dict[str, PairedResult]:
    """Per class, over the cases where every run of both methods scored it."""
    out = {}
    classes = sorted(set.intersection(*[set(r.per_class) for r in a + b]))
    for name in classes:
        cases = sorted(set.intersection(*[set(r.per_class[name]) for r in a + b]))
        if not cases:
            continue
        values_a = np.mean([[r.per_class[name][c] for c in cases] for r in a], axis=0)
        values_b = np.mean([[r.per_class[name][c] for c in cases] for r in b], axis=0)
        out[name] = paired_comparison(values_a, values_b, seed)
    return out


def compare(group_a: list[Path], group_b: list[Path], names: tuple[str, str], metric: str,
            seed: int = 0) -> dict[str, Any]:
    """The comparison report (``report.to_json``) of methods A and B, each given by one or more evaluations."""
    runs_a = [read_scores(p, metric) for p in group_a]
    runs_b = [read_scores(p, metric) for p in group_b]
    cases = _same_cases(runs_a)
    if _same_cases(runs_b) != cases:
        missing = sorted(set(cases) ^ set(runs_b[0].overall))[:5]
        raise UsemaError(f"{runs_b[0].source}: expected the same cases as {runs_a[0].source}; differs in {missing}")
    overall = paired_comparison(_mean_over_runs(runs_a, cases), _mean_over_runs(runs_b, cases), seed)
    spreads = (seed_spread([np.mean(list(r.overall.values())) for r in runs_a]),
               seed_spread([np.mean(list(r.overall.values())) for r in runs_b]))
    return to_json(names, metric, overall, _class_pairs(runs_a, runs_b, seed), spreads,
                   ([str(r.source) for r in runs_a], [str(r.source) for r in runs_b]))
