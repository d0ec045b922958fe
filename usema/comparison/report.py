"""Comparison results as plain data (JSON) and as Markdown a reader takes in at a glance."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from usema.comparison.stats import CONFIDENCE, PairedResult


def headline(name_a: str, name_b: str, metric: str, result: PairedResult,
             spread_a: float | None, spread_b: float | None) -> str:
    """'A beats B by 0.012 DSC (95% CI 0.004–0.020, p = 0.003); seed spread of A: ±0.006'."""
    if result.difference >= 0:
        winner, loser, diff, low, high = name_a, name_b, result.difference, result.ci_low, result.ci_high
    else:  # state it from the better method's side: signs and interval flip
        winner, loser, diff, low, high = name_b, name_a, -result.difference, -result.ci_high, -result.ci_low
    p = "p not defined (no non-zero difference)" if result.p_value is None else f"p = {result.p_value:.3g}"
    text = (f"{winner} beats {loser} by {diff:.4f} {metric.upper()} over {result.cases} cases "
            f"({CONFIDENCE:.0%} CI {low:.4f} to {high:.4f}, {p})")
    if result.ci_low <= 0 <= result.ci_high:
        text += "; the confidence interval includes 0: no significant difference"
    spreads = [f"seed spread of {n}: ±{s:.4f}" for n, s in ((name_a, spread_a), (name_b, spread_b)) if s is not None]
    return text + ("; " + "; ".join(spreads) if spreads else "")


def to_json(names: tuple[str, str], metric: str, overall: PairedResult, per_class: dict[str, PairedResult],
            spreads: tuple[float | None, float | None], runs: tuple[list[str], list[str]]) -> dict[str, Any]:
    return {
        "a": {"name": names[0], "runs": runs[0], "seed_spread": spreads[0]},
        "b": {"name": names[1], "runs": runs[1], "seed_spread": spreads[1]},
        "metric": metric,
        "confidence": CONFIDENCE,
        "headline": headline(names[0], names[1], metric, overall, *spreads),
        "overall": asdict(overall),
        "per_class": {name: asdict(r) for name, r in per_class.items()},
    }


def _p(result: PairedResult) -> str:
    return "–" if result.p_value is None else f"{result.p_value:.3g}"


def to_markdown(report: dict[str, Any]) -> str:
    a, b, metric = report["a"]["name"], report["b"]["name"], report["metric"].upper()
    lines = [
        f"# {a} vs {b} ({metric}, paired by case)",
        "",
        report["headline"] + ".",
        "",
        f"Runs of {a}: {', '.join(report['a']['runs'])}  ",
        f"Runs of {b}: {', '.join(report['b']['runs'])}  ",
        "Per-case scores are averaged over each method's runs (seeds) before pairing. p: two-sided Wilcoxon "
        "signed-rank test; CI: percentile bootstrap of the mean difference (10,000 resamples).",
        "",
        f"| class | cases | {a} | {b} | difference | {report['confidence']:.0%} CI | p |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("all classes (case score)", report["overall"])] + list(report["per_class"].items())
    for name, r in rows:
        result = PairedResult(**r)
        lines.append(f"| {name} | {result.cases} | {result.mean_a:.4f} | {result.mean_b:.4f} | "
                     f"{result.difference:+.4f} | {result.ci_low:+.4f} to {result.ci_high:+.4f} | {_p(result)} |")
    return "\n".join(lines) + "\n"
