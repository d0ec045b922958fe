"""`usema compare`: paired differences, Wilcoxon p and bootstrap CI against SciPy on a small fixed table, seed
spread, and the CLI's report files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import stats

from usema.cli import main

# a fixed table: per case (rows) and class (columns) DSC of two methods
CASES = [f"case_{i}" for i in range(8)]
A = np.array([[0.91, 0.80], [0.88, 0.75], [0.93, 0.82], [0.85, 0.70], [0.90, 0.79], [0.87, 0.74], [0.92, 0.81],
              [0.89, 0.77]])
B = np.array([[0.90, 0.78], [0.86, 0.76], [0.91, 0.79], [0.86, 0.66], [0.88, 0.76], [0.85, 0.70], [0.90, 0.80],
              [0.88, 0.73]])


def write_eval(path, table, cases=CASES, classes=("liver", "spleen")):
    """The per-case CSV as `usema evaluate` writes it (only the columns compare reads matter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", "class_id", "class_name", "dsc", "nsd"])
        writer.writeheader()
        for case, row in zip(cases, table):
            for k, (name, value) in enumerate(zip(classes, row), start=1):
                writer.writerow({"case": case, "class_id": k, "class_name": name, "dsc": value, "nsd": ""})
    path.with_suffix(".json").write_text("{}")
    return path


def test_paired_statistics_equal_scipy_on_a_fixed_table(tmp_path):
    a = write_eval(tmp_path / "usema" / "eval.csv", A)
    b = write_eval(tmp_path / "basicunet" / "eval.csv", B)
    out = tmp_path / "report.md"
    assert main(["compare", str(a.with_suffix(".json")), str(b), "--output", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    case_a, case_b = A.mean(axis=1), B.mean(axis=1)  # a case's score: the mean over its scored classes
    diff = case_a - case_b
    overall = report["overall"]
    assert overall["cases"] == 8
    assert overall["difference"] == pytest.approx(diff.mean(), abs=1e-12)
    assert overall["difference"] == pytest.approx(0.019375, abs=1e-12)  # by hand: (0.11 + 0.20) / 16
    assert overall["p_value"] == pytest.approx(stats.wilcoxon(case_a, case_b).pvalue)
    reference = stats.bootstrap((diff,), np.mean, n_resamples=10_000, method="percentile",
                                random_state=np.random.default_rng(0)).confidence_interval
    assert (overall["ci_low"], overall["ci_high"]) == pytest.approx((reference.low, reference.high))
    spleen = report["per_class"]["spleen"]
    assert spleen["difference"] == pytest.approx((A[:, 1] - B[:, 1]).mean())
    assert spleen["p_value"] == pytest.approx(stats.wilcoxon(A[:, 1], B[:, 1]).pvalue)
    assert report["headline"].startswith("usema beats basicunet by 0.0194 DSC over 8 cases (95% CI ")
    assert "seed spread" not in report["headline"]
    assert "| spleen | 8 |" in out.read_text()


def test_the_better_method_is_named_first_whatever_the_order(tmp_path):
    a = write_eval(tmp_path / "usema" / "eval.csv", A)
    b = write_eval(tmp_path / "basicunet" / "eval.csv", B)
    out = tmp_path / "r.md"
    assert main(["compare", str(b), str(a), "--output", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["overall"]["difference"] == pytest.approx(-0.019375)
    assert report["headline"].startswith("usema beats basicunet by 0.0194")
    low, high = report["overall"]["ci_low"], report["overall"]["ci_high"]
    assert f"CI {-high:.4f} to {-low:.4f}" in report["headline"]


def test_seed_runs_are_averaged_and_their_spread_reported(tmp_path):
    shifts = [0.0, 0.01, -0.01]
    runs_a = [write_eval(tmp_path / f"a{s}" / "eval.csv", A + d) for s, d in enumerate(shifts)]
    runs_b = [write_eval(tmp_path / f"b{s}" / "eval.csv", B + d / 2) for s, d in enumerate(shifts)]
    out = tmp_path / "seeds.md"
    argv = ["compare", "--a", *map(str, runs_a), "--b", *map(str, runs_b), "--names", "USEMA", "CNN", "--output", str(out)]
    assert main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    means_a = [(A + d).mean() for d in shifts]
    assert report["a"]["seed_spread"] == pytest.approx(np.std(means_a, ddof=1))
    assert report["b"]["seed_spread"] == pytest.approx(np.std([(B + d / 2).mean() for d in shifts], ddof=1))
    assert report["overall"]["difference"] == pytest.approx(0.019375)  # the shifts average out
    assert "seed spread of USEMA: ±0.0100" in report["headline"]


def test_identical_methods_have_no_significant_difference(tmp_path):
    a = write_eval(tmp_path / "x" / "eval.csv", A)
    b = write_eval(tmp_path / "y" / "eval.csv", A)
    out = tmp_path / "same.md"
    assert main(["compare", str(a), str(b), "--output", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["overall"]["difference"] == 0 and report["overall"]["p_value"] is None
    assert "no significant difference" in report["headline"]


@pytest.mark.parametrize(
    "argv_tail, expected",
    [
        (["only_one.csv"], "EVAL: expected two evaluation files (A B), got 1"),
        (["--a", "x.csv"], "--a/--b: expected at least one evaluation file for each method"),
        (["a.txt", "b.csv"], "a.txt: expected an evaluation .json or .csv file"),
        (["missing.csv", "b.csv"], "missing.csv: expected the per-case CSV written by `usema evaluate`"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, monkeypatch, capsys, argv_tail, expected):
    monkeypatch.chdir(tmp_path)
    write_eval(tmp_path / "b.csv", B)
    assert main(["compare", *argv_tail]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usema: error: ") and expected in err and err.count("\n") == 1


def test_different_cases_cannot_be_paired(tmp_path, capsys):
    a = write_eval(tmp_path / "a" / "eval.csv", A)
    b = write_eval(tmp_path / "b" / "eval.csv", B[:7], cases=CASES[:7])
    assert main(["compare", str(a), str(b)]) == 2
    assert "expected the same cases as" in capsys.readouterr().err


def test_report_is_not_overwritten_without_overwrite(tmp_path, capsys):
    a = write_eval(tmp_path / "a" / "eval.csv", A)
    b = write_eval(tmp_path / "b" / "eval.csv", B)
    out = tmp_path / "r.md"
    out.write_text("keep")
    assert main(["compare", str(a), str(b), "--output", str(out)]) == 2
    assert out.read_text() == "keep" and not out.with_suffix(".json").exists()
