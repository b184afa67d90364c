"""Tests for harness.io and harness.report: records, statistics, leaderboard, rendering, plots, publish.

The synthetic suite: recipes sft (baseline), fkl, rkl × seeds 1, 2, 3 × eval sets alpha, beta, plus a
teacher and an untrained init (seed 0), one failed run (rkl, seed 3, beta — its record carries an absurd
ROUGE-L of 999 that must not leak into any statistic), a corrupt JSON file and a partial record.
Expected numbers are computed by hand below from the t quantiles t_{0.975,1} and t_{0.975,2}; p-values
from the t statistic written out here and scipy's t distribution; Holm adjustments and rank correlations
by hand.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from harness.io import JSONReadError, read_json, write_json_atomic, write_text_atomic
from harness.report import publish, render_markdown_table, tuning_table
from harness.report.aggregate import duplicate_metrics
from harness.report.leaderboard import (
    AVG,
    build_leaderboard,
    build_report,
    column,
    delta_base,
    score_base,
)
from harness.report.metric_info import METRICS, direction, loss_terms, metric_info, metric_label, recipes_training_on
from harness.report.plots import (
    NothingToPlot,
    curves_frame,
    heatmap_frames,
    pareto_cost,
    pareto_figure,
    plot_heatmap,
    plot_pareto,
    plot_scores,
    plot_training_curves,
    training_curves_figure,
)
from harness.report.records import hparams_label, load_record_list, load_records, missing_runs, parse_record
from harness.report.render import agreement_table, main_table, render_csv, render_html, render_latex, render_markdown
from harness.report.stats import (
    bootstrap_p_best,
    holm,
    mean_ci,
    paired_diff,
    paired_ttest,
    pareto_front,
    rank_correlation,
)

PUBLISH_MODULE = __import__("sys").modules["harness.report.publish"]

T1 = 12.706204736174707  # t_{0.975, 1}
T2 = 4.302652729911275  # t_{0.975, 2}
SQ2, SQ3 = math.sqrt(2), math.sqrt(3)

SETS = ("alpha", "beta")
SEEDS = (1, 2, 3)
ROUGE = {
    ("sft", "alpha"): [40, 42, 44], ("sft", "beta"): [30, 31, 32],
    ("fkl", "alpha"): [45, 46, 50], ("fkl", "beta"): [33, 35, 34],
    ("rkl", "alpha"): [50, 44, 47], ("rkl", "beta"): [36, 38, 999],  # 999: the failed run
}
TRAIN_TIME = {"sft": 10.0, "fkl": 20.0, "rkl": 15.0, "teacher": 100.0, "init": 0.0}
FAILED = ("rkl", 3, "beta")
OOM = "RuntimeError: CUDA out of memory"


def _record(recipe, seed, eval_set, rouge, role="student", status="ok", error=None):
    return {
        "suite": "tiny", "recipe": recipe, "seed": seed, "eval_set": eval_set, "role": role,
        "status": status, "error": error,
        "metrics": {
            "rougeL": rouge, "exact_match": rouge / 2, "ece": 0.05 + 0.01 * seed,
            "kl_to_teacher": 0.3, "coverage": None if eval_set == "beta" else 0.5,
        },
        "costs": {
            "train_time_s": TRAIN_TIME.get(recipe, 30.0) + seed, "eval_time_s": 4.0, "sec_per_sample": 0.002,
            "tokens_per_s": 8000, "peak_rss_mb": 900, "steps": 200, "tokens": 100000,
        },
        "config": {"lr": 1e-3}, "git_rev": "abc123", "versions": {"torch": "2.13.0"}, "device": "cpu",
    }


@pytest.fixture()
def records_dir(tmp_path: Path) -> Path:
    d = tmp_path / "records"
    for (recipe, eval_set), values in ROUGE.items():
        for seed, v in zip(SEEDS, values):
            failed = (recipe, seed, eval_set) == FAILED
            rec = _record(recipe, seed, eval_set, v, status="failed" if failed else "ok",
                          error=f"{OOM}\nTraceback (most recent call last): ..." if failed else None)
            write_json_atomic(d / f"{recipe}_s{seed}_{eval_set}.json", rec)
    for eval_set, v in zip(SETS, (60, 50)):
        write_json_atomic(d / f"teacher_s0_{eval_set}.json", _record("teacher", 0, eval_set, v, role="teacher"))
    for eval_set, v in zip(SETS, (5, 3)):
        write_json_atomic(d / f"init_s0_{eval_set}.json", _record("init", 0, eval_set, v, role="init"))
    (d / "broken.json").write_text('{"suite": "tiny", "recipe": "fkl", "se')  # truncated by a crash
    partial = _record("fkl", 9, "alpha", 1.0)
    del partial["eval_set"]
    write_json_atomic(d / "partial.json", partial)
    return d


@pytest.fixture()
def record_files(records_dir: Path) -> list[Path]:
    return sorted(records_dir.glob("*.json"))


@pytest.fixture()
def frame(records_dir: Path) -> pd.DataFrame:
    return load_records(records_dir).frame


@pytest.fixture()
def lb(frame: pd.DataFrame) -> pd.DataFrame:
    return build_leaderboard(frame, primary_metric="rougeL", baseline="sft", n_boot=500)


def _row(lb: pd.DataFrame, recipe: str) -> pd.Series:
    rows = lb.loc[lb["Recipe"] == recipe]
    assert len(rows) == 1
    return rows.iloc[0]


def _cell(lb, recipe, base, stat="mean"):
    return _row(lb, recipe)[column(base, stat)]


def _simple(recipe, seed, value, *, teacher=None, eval_set="test", role=None, **extra):
    """A one-metric record (ROUGE-L = value) for the significance / teacher / tuning tests."""
    rec = {"suite": "s", "recipe": recipe, "seed": seed, "eval_set": eval_set,
           "role": role or ("teacher" if recipe == "teacher" else "init" if recipe == "init" else "student"),
           "status": "ok", "metrics": {"rougeL": float(value)}, "costs": {"tokens": 1000.0}}
    if teacher is not None:
        rec["teacher_seed"] = teacher
    rec.update(extra)
    return rec


def _frame(recs) -> pd.DataFrame:
    df, problems = load_record_list(recs)
    assert problems == []
    return df


# --------------------------------------------------------------------------------------- intervals
def test_mean_ci_hand_computed():
    iv = mean_ci([1, 2, 3])
    assert iv.mean == pytest.approx(2.0)
    assert iv.half_width == pytest.approx(T2 * 1.0 / SQ3)  # 2.48414
    assert iv.half_width == pytest.approx(2.4841377, abs=1e-6)
    assert (iv.low, iv.high) == pytest.approx((2 - T2 / SQ3, 2 + T2 / SQ3))
    assert iv.n == 3
    # 90%: t_{0.95, 2} = 2.919985580355516
    assert mean_ci([1, 2, 3], confidence=0.9).half_width == pytest.approx(2.919985580355516 / SQ3)


def test_mean_ci_degenerate_cases():
    one = mean_ci([7.5])
    assert one.mean == 7.5 and one.n == 1
    assert math.isnan(one.low) and math.isnan(one.high) and math.isnan(one.half_width)
    none = mean_ci([])
    assert none.n == 0 and math.isnan(none.mean)
    same = mean_ci([4, 4, 4])
    assert same.half_width == 0.0
    assert mean_ci([1, None, float("nan"), 3]).n == 2  # missing values are skipped and not counted
    with pytest.raises(ValueError):
        mean_ci([1, 2], confidence=1.5)


def test_paired_diff_hand_computed():
    a = {1: 45, 2: 46, 3: 50, 5: 10}
    b = {1: 40, 2: 42, 3: 44, 4: 99}
    iv = paired_diff(a, b)  # diffs 5, 4, 6 over the common seeds 1..3
    assert iv.n == 3
    assert iv.mean == pytest.approx(5.0)
    assert iv.half_width == pytest.approx(T2 * 1.0 / SQ3)
    iv2 = paired_diff(pd.Series({1: 36.0, 2: 38.0, 3: float("nan")}), {1: 30, 2: 31, 3: 32})
    assert iv2.n == 2 and iv2.mean == pytest.approx(6.5)
    assert iv2.half_width == pytest.approx(T1 * math.sqrt(0.5) / SQ2)  # 6.3531
    assert paired_diff({1: 1.0}, {2: 1.0}).n == 0
    # (teacher, seed) keys pair the same way
    assert paired_diff({(0, 1): 3.0, (1, 1): 5.0}, {(0, 1): 1.0, (1, 1): 1.0, (1, 2): 9.0}).mean == pytest.approx(3.0)


def test_pareto_front():
    xs, ys = [12, 22, 17, 30, 12], [36.5, 40.5, 42.0, 41.0, 30.0]
    assert pareto_front(xs, ys) == [0, 2]
    # lower score is better: the cheapest lowest-scoring point wins alone
    assert pareto_front(xs, ys, maximize_y=False) == [4]
    assert pareto_front([1, 1], [2, 2]) == [0, 1]  # equal points do not dominate each other
    assert pareto_front([1, float("nan")], [1, 5]) == [0]


# ------------------------------------------------------------------------------------- significance
def _p_by_hand(diffs):
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    return 2.0 * st.t.sf(abs(t), n - 1)


def test_paired_ttest_hand_computed():
    res = paired_ttest({1: 45, 2: 47, 3: 50}, {1: 40, 2: 42, 3: 44})  # diffs 5, 5, 6: mean 16/3, sd 1/sqrt(3)
    t = (16 / 3) / ((1 / SQ3) / SQ3)
    assert res.t == pytest.approx(t)
    assert res.p == pytest.approx(2 * st.t.sf(t, 2))
    assert res.diff.mean == pytest.approx(16 / 3) and res.diff.n == 3
    assert math.isnan(paired_ttest({1: 1.0}, {1: 0.0}).p)  # one pair: no test
    assert paired_ttest({1: 2.0, 2: 3.0}, {1: 1.0, 2: 2.0}).p == 0.0  # constant non-zero difference
    assert paired_ttest({1: 2.0, 2: 3.0}, {1: 2.0, 2: 3.0}).p == 1.0  # identical


def test_holm_matches_hand_computation():
    # sorted: .005 (x4 = .02), .01 (x3 = .03), .03 (x2 = .06), .04 (x1 = .04 -> running max .06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm({"a": 0.5, "b": 0.6, "c": float("nan")})  # NaN is no test: m = 2
    assert out["a"] == pytest.approx(1.0) and out["b"] == pytest.approx(1.0) and math.isnan(out["c"])
    assert holm({"x": 0.02}) == {"x": pytest.approx(0.02)}
    assert holm([]) == []
    with pytest.raises(ValueError):
        holm([1.5])


SIG = {  # one set, seeds 1-4; a is best, b close to a, c close to sft
    "sft": [10, 11, 12, 13], "a": [15, 17, 16, 18], "b": [14.5, 17.5, 15, 18.2], "c": [11, 11.5, 13.5, 13],
}


def _sig_records(values=SIG, **extra):
    return [_simple(r, s, v, **extra) for r, vals in values.items() for s, v in zip((1, 2, 3, 4), vals)]


def test_leaderboard_paired_tests_holm_and_tied_with_best():
    lb = build_leaderboard(_frame(_sig_records()), baseline="sft", n_boot=2000)
    base = delta_base("rougeL", "sft", "test")
    best = "Δ ROUGE-L vs best [test]"
    diff = {r: np.subtract(v, SIG["sft"]) for r, v in SIG.items() if r != "sft"}
    p = {r: _p_by_hand(d) for r, d in diff.items()}
    # Holm over three tests by hand
    order = sorted(p, key=p.get)
    hand, running = {}, 0.0
    for j, r in enumerate(order):
        running = max(running, min(1.0, (3 - j) * p[r]))
        hand[r] = running
    for r in ("a", "b", "c"):
        assert _cell(lb, r, base, "p") == pytest.approx(p[r], rel=1e-9)
        assert _cell(lb, r, base, "p_holm") == pytest.approx(hand[r], rel=1e-9)
    # against the best (a): b, c and sft
    p_best = {r: _p_by_hand(np.subtract(SIG[r], SIG["a"])) for r in ("b", "c", "sft")}
    order = sorted(p_best, key=p_best.get)
    hand_best, running = {}, 0.0
    for j, r in enumerate(order):
        running = max(running, min(1.0, (3 - j) * p_best[r]))
        hand_best[r] = running
    for r in ("b", "c", "sft"):
        assert _cell(lb, r, best, "p_holm") == pytest.approx(hand_best[r], rel=1e-9)
    assert hand_best["b"] > 0.05 and hand_best["c"] < 0.05
    assert lb.attrs["best"] == "a"
    tied = {r: bool(v) for r, v in zip(lb["Recipe"], lb["≈ best"])}
    assert tied == {"a": True, "b": True, "c": False, "sft": False}
    assert math.isnan(_cell(lb, "a", best, "p"))
    table = main_table(lb).set_index("Recipe")
    assert table.at["a", "≈ best"] == "✓" and table.at["b", "≈ best"] == "✓" and table.at["c", "≈ best"] == ""
    assert table.at["sft (baseline)", "p vs sft (Holm)"] == "—"


def test_bootstrap_p_best_clear_winner_ties_and_determinism():
    clear = pd.DataFrame({"a": [100.0, 101, 102, 103], "b": [10.0, 11, 12, 13], "c": [9.0, 15, 12, 14]})
    p = bootstrap_p_best(clear, n_boot=2000, seed=1)
    assert p["a"] == 1.0 and p["b"] == 0.0 and p.sum() == pytest.approx(1.0)
    # lower is better: the winner flips
    assert bootstrap_p_best(clear, higher_is_better=False, n_boot=500)["a"] == 0.0
    # two identical recipes split every replicate
    twins = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0]})
    assert bootstrap_p_best(twins, n_boot=300).tolist() == [0.5, 0.5]
    # close recipes: deterministic for a seed, strictly between 0 and 1
    close = pd.DataFrame({"a": SIG["a"], "b": SIG["b"]}, dtype=float)
    one, two = bootstrap_p_best(close, n_boot=3000, seed=7), bootstrap_p_best(close, n_boot=3000, seed=7)
    assert one.equals(two) and 0.0 < one["b"] < one["a"] < 1.0
    # a recipe without any value never wins
    assert bootstrap_p_best(pd.DataFrame({"a": [1.0, 2.0], "b": [np.nan, np.nan]}), n_boot=50)["b"] == 0.0


def test_bootstrap_p_best_resamples_within_teachers():
    # teacher 0: x far ahead; teacher 1: y slightly ahead. Every stratified replicate keeps 2 runs of each
    # teacher, so x's mean is always 5.0 against y's 4.5: P(x best) = 1 exactly. Pooled resampling can draw
    # only teacher-1 runs, so y sometimes wins.
    values = pd.DataFrame({"x": [10.0, 10.0, 0.0, 0.0], "y": [0.0, 0.0, 9.0, 9.0]})
    strata = [0, 0, 1, 1]
    assert bootstrap_p_best(values, strata=strata, n_boot=2000)["x"] == 1.0
    assert bootstrap_p_best(values, n_boot=2000)["x"] < 1.0
    with pytest.raises(ValueError):
        bootstrap_p_best(values, strata=[0, 1], n_boot=10)


def test_leaderboard_p_best_is_one_for_a_clear_winner():
    recs = _sig_records({"sft": [10, 11, 12, 13], "a": [90, 91, 92, 93], "b": [20, 22, 21, 23]})
    lb = build_leaderboard(_frame(recs), n_boot=1000)
    assert _row(lb, "a")["P(best)"] == 1.0 and _row(lb, "b")["P(best)"] == 0.0


def test_rank_correlation_hand_computed():
    a = {"w": 1.0, "x": 2.0, "y": 3.0, "z": 4.0}
    b = {"w": 1.0, "x": 3.0, "y": 2.0, "z": 4.0, "extra": 9.0}  # one discordant pair of six
    rc = rank_correlation(a, b)
    assert rc["n"] == 4
    assert rc["kendall_tau"] == pytest.approx((5 - 1) / 6)
    assert rc["spearman_rho"] == pytest.approx(1 - 6 * (0 + 1 + 1 + 0) / (4 * (16 - 1)))
    rev = rank_correlation(a, {k: -v for k, v in a.items()})
    assert rev["kendall_tau"] == pytest.approx(-1.0) and rev["spearman_rho"] == pytest.approx(-1.0)
    assert math.isnan(rank_correlation({"a": 1.0}, {"a": 2.0})["kendall_tau"])


# -------------------------------------------------------------------------------------------- teachers
def _two_teacher_records():
    # teacher 0 ranks b > a > sft; teacher 1 ranks sft > a > b (a full reversal)
    means = {0: {"sft": 10, "a": 20, "b": 30}, 1: {"sft": 30, "a": 20, "b": 10}}
    recs = []
    for t, by in means.items():
        for r, m in by.items():
            for s, e in zip((1, 2, 3), (-1.0, 0.0, 1.5)):
                recs.append(_simple(r, s, m + e, teacher=t))
        recs.append(_simple("teacher", 0, 50 + t, teacher=t))
    return recs


def test_several_teachers_per_teacher_results_and_rank_agreement():
    report = build_report(_frame(_two_teacher_records()), baseline="sft", n_boot=200)
    lb = report.leaderboard
    assert lb.attrs["teachers"] == [0, 1]
    # pooled over teachers: n = 2 teachers x 3 seeds; the mean is the mean of all six runs
    a = score_base("rougeL", "test")
    assert _cell(lb, "a", a, "n") == 6 and _cell(lb, "a", a) == pytest.approx(20 + 0.5 / 3)
    assert _row(lb, "a")["Teachers"] == 2 and _row(lb, "a")["n runs"] == 6
    assert _cell(lb, "teacher", a, "n") == 2
    pooled = [19, 20, 21.5, 19, 20, 21.5]
    assert _cell(lb, "a", a, "ci_high") - _cell(lb, "a", a) == pytest.approx(
        st.t.ppf(0.975, 5) * np.std(pooled, ddof=1) / math.sqrt(6))
    # per teacher: intervals over that teacher's seeds, ranks under that teacher
    pt = report.per_teacher.set_index(["recipe", "teacher_seed"])
    assert pt.at[("b", 0), "mean"] == pytest.approx(30 + 0.5 / 3) and pt.at[("b", 0), "n"] == 3
    assert pt.at[("b", 0), "rank"] == 1 and pt.at[("b", 1), "rank"] == 3
    ag = report.teacher_agreement.iloc[0]
    assert (ag["teacher_a"], ag["teacher_b"], ag["n"]) == (0, 1, 3)
    assert ag["kendall_tau"] == pytest.approx(-1.0) and ag["spearman_rho"] == pytest.approx(-1.0)
    assert (ag["top_a"], ag["top_b"], bool(ag["same_top"])) == ("b", "sft", False)
    # the interval states the variance it includes
    assert "2 teachers" in lb.attrs["variance"] and "spread between these teachers" in lb.attrs["variance"]
    md = render_markdown(report)
    assert "## Per teacher" in md and "-1.00 (p" in md
    assert agreement_table(report)["Same top"].tolist() == ["no"]
    # paired comparisons pair on (teacher, seed): a - sft differences are 10 (t0) and -10 (t1)
    assert _cell(lb, "a", delta_base("rougeL", "sft", "test")) == pytest.approx(0.0)


def test_single_teacher_states_training_seed_variance_only(lb: pd.DataFrame):
    assert lb.attrs["teachers"] == [0]
    assert "training-seed variance only" in lb.attrs["variance"]


# ----------------------------------------------------------------------------------------- records
def test_load_records_reports_bad_files_by_name(records_dir: Path):
    df, problems = load_records(records_dir)
    assert len(df) == 3 * 3 * 2 + 2 + 2  # 18 student records (incl. the failed one), teacher, init
    assert len(problems) == 2
    assert any("broken.json" in p and "invalid JSON" in p for p in problems)
    assert any("partial.json" in p and "eval_set" in p for p in problems)
    assert {"metric:rougeL", "metric:ece", "cost:train_time_s", "cost:peak_rss_mb"} <= set(df.columns)
    assert df["seed"].dtype == "int64" and (df["teacher_seed"] == 0).all() and (df["phase"] == "final").all()
    failed = df.loc[df["failed"]]
    assert len(failed) == 1
    r = failed.iloc[0]
    assert (r["recipe"], r["seed"], r["eval_set"]) == FAILED
    assert r["failure"].startswith(OOM)
    # null metric = not applicable, not a failure
    beta_ok = df.loc[(df["eval_set"] == "beta") & ~df["failed"]]
    assert beta_ok["metric:coverage"].isna().all()


def test_load_records_accepts_files_globs_and_missing_paths(records_dir: Path, tmp_path: Path):
    files = sorted(records_dir.glob("sft_*.json"))
    df, problems = load_records(files)
    assert len(df) == 6 and problems == []
    df, _ = load_records(str(records_dir / "teacher_*.json"))
    assert set(df["recipe"]) == {"teacher"}
    df, problems = load_records([tmp_path / "nope.json"])
    assert df.empty and "nope.json" in problems[0]
    df, problems = load_records(tmp_path / "empty_dir_that_is_missing")
    assert df.empty and problems


def test_load_record_list_is_explicit(records_dir: Path):
    files = sorted(records_dir.glob("sft_*.json"))
    df, problems = load_record_list([*files, records_dir])  # a directory is not expanded
    assert len(df) == 6 and len(problems) == 1 and "is a directory" in problems[0]
    df, problems = load_record_list([str(records_dir / "sft_*.json")])  # nor is a pattern
    assert df.empty and "sft_*.json" in problems[0]
    df, _ = load_record_list([_record("sft", 1, "alpha", 40.0), {**_record("fkl", 1, "alpha", 41.0), "path": "x"}])
    assert df["path"].tolist() == ["<record #0>", "x"]
    with pytest.raises(TypeError, match="single"):
        load_record_list(records_dir)


def test_duplicate_records_are_reported(records_dir: Path):
    write_json_atomic(records_dir / "zz_copy.json", _record("sft", 1, "alpha", 1.0))
    df, problems = load_records(records_dir)
    assert any("zz_copy.json" in p and "duplicate" in p for p in problems)
    kept = df.loc[(df["recipe"] == "sft") & (df["seed"] == 1) & (df["eval_set"] == "alpha")]
    assert kept["metric:rougeL"].tolist() == [40.0]
    # the same run under another teacher, or a tuning run, is no duplicate
    other = [_simple("a", 1, 1.0), _simple("a", 1, 2.0, teacher=1),
             _simple("a", 1, 3.0, phase="tune", hparams={"learning_rate": 0.01})]
    assert len(_frame(other)) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "n/a"])
def test_non_finite_metric_marks_run_failed(bad):
    rec = _record("fkl", 1, "alpha", 40.0)
    rec["metrics"]["kl_to_teacher"] = bad
    row = parse_record(rec, "x.json")
    assert row["failed"] and "kl_to_teacher" in row["failure"]
    assert parse_record(_record("fkl", 1, "alpha", 40.0), "y.json")["failed"] is False


def test_parse_record_infers_role_and_rejects_partial():
    rec = _record("teacher", 0, "alpha", 60.0)
    del rec["role"]
    assert parse_record(rec, "t.json")["role"] == "teacher"
    with pytest.raises(ValueError, match="p.json"):
        parse_record({"suite": "tiny", "recipe": "x", "seed": 1, "eval_set": "a", "status": "ok"}, "p.json")
    with pytest.raises(ValueError, match="object"):
        parse_record([1, 2], "list.json")


def test_parse_record_teacher_phase_hparams():
    row = parse_record(_simple("a", 2, 1.0, teacher=3, phase="tune", hparams={"learning_rate": 0.003, "b": 1},
                               details={"n_eval_seeds": 5.0}), "r.json")
    assert (row["teacher_seed"], row["phase"], row["n_eval_seeds"]) == (3, "tune", 5.0)
    assert hparams_label(row["hparams"]) == "b=1, learning_rate=0.003"
    plain = parse_record(_simple("a", 2, 1.0), "r.json")
    assert (plain["teacher_seed"], plain["phase"], plain["hparams"]) == (0, "final", "{}")
    for bad, match in (({"teacher_seed": 1.5}, "teacher_seed"), ({"teacher_seed": True}, "teacher_seed"),
                       ({"phase": "valid"}, "phase 'valid'"), ({"hparams": [0.1]}, "hparams"),
                       ({"hparams": {"lr": [1, 2]}}, "hparams.lr")):
        with pytest.raises(ValueError, match=match):
            parse_record(_simple("a", 1, 1.0, **bad), "bad.json")


def test_missing_runs(frame: pd.DataFrame):
    expected = [(r, s, e) for r in ("sft", "fkl", "rkl", "gkd") for s in SEEDS for e in SETS]
    missing = missing_runs(expected, frame)
    # the failed run exists (it is listed as failed), so it is not missing
    assert missing == [("gkd", s, e) for s in SEEDS for e in SETS]
    assert missing_runs([("sft", 1, "alpha")], frame) == []
    # with a teacher seed: teacher 0 exists, teacher 1 does not
    assert missing_runs([("sft", 1, "alpha", 0), ("sft", 1, "alpha", 1)], frame) == [("sft", 1, "alpha", 1)]


# ------------------------------------------------------------------------------------- leaderboard
def test_leaderboard_means_and_intervals(lb: pd.DataFrame):
    a, b, avg = score_base("rougeL", "alpha"), score_base("rougeL", "beta"), score_base("rougeL", AVG)
    assert a == "ROUGE-L [alpha]"
    # sft alpha: 40, 42, 44 -> mean 42, sd 2
    assert _cell(lb, "sft", a) == pytest.approx(42.0)
    assert _cell(lb, "sft", a, "ci_high") - 42.0 == pytest.approx(T2 * 2 / SQ3)
    assert _cell(lb, "sft", a, "ci_low") == pytest.approx(42.0 - T2 * 2 / SQ3)
    # fkl average per seed: 39, 40.5, 42 -> mean 40.5, sd 1.5
    assert _cell(lb, "fkl", avg) == pytest.approx(40.5)
    assert _cell(lb, "fkl", avg, "ci_high") == pytest.approx(40.5 + T2 * 1.5 / SQ3)
    assert _cell(lb, "fkl", a) == pytest.approx(47.0)
    assert _cell(lb, "fkl", a, "ci_high") == pytest.approx(47.0 + T2 * math.sqrt(7) / SQ3)
    # rkl: the failed beta run (999) is excluded: beta 36, 38; average only over complete seeds 1, 2
    assert _cell(lb, "rkl", b) == pytest.approx(37.0)
    assert _cell(lb, "rkl", b, "n") == 2
    assert _cell(lb, "rkl", a, "n") == 3  # seed 3's alpha run succeeded and counts
    assert _cell(lb, "rkl", avg) == pytest.approx(42.0)  # per seed 43, 41
    assert _cell(lb, "rkl", avg, "n") == 2
    assert _cell(lb, "rkl", avg, "ci_high") == pytest.approx(42.0 + T1 * SQ2 / SQ2)
    # other metrics averaged over sets; lower-is-better metrics are marked
    ece = score_base("ece", AVG)
    assert ece == "ECE ↓ [avg]" and score_base("kl_to_teacher", AVG) == "KL to teacher ↓ [avg]"
    assert _cell(lb, "sft", ece) == pytest.approx(0.07)
    assert _cell(lb, "sft", score_base("exact_match", AVG)) == pytest.approx(36.5 / 2)
    assert _cell(lb, "sft", score_base("coverage", AVG)) == pytest.approx(0.5)  # null on beta skipped
    # single-seed reference rows: mean only
    assert _cell(lb, "teacher", avg) == pytest.approx(55.0)
    assert math.isnan(_cell(lb, "teacher", avg, "ci_low"))


def test_leaderboard_ranks_and_reference_rows(lb: pd.DataFrame):
    assert lb["Recipe"].tolist() == ["teacher", "rkl", "fkl", "sft", "init"]
    assert _row(lb, "rkl")["Rank"] == 1 and _row(lb, "fkl")["Rank"] == 2 and _row(lb, "sft")["Rank"] == 3
    for ref in ("teacher", "init"):
        assert pd.isna(_row(lb, ref)["Rank"]) and _row(lb, ref)["Kind"] == ref
        assert pd.isna(_row(lb, ref)["≈ best"]) and math.isnan(_row(lb, ref)["P(best)"])
    assert _row(lb, "sft")["Kind"] == "baseline" and _row(lb, "fkl")["Kind"] == "student"
    assert _row(lb, "fkl")["n runs"] == 3 and _row(lb, "teacher")["n runs"] == 1
    assert sum(_row(lb, r)["P(best)"] for r in ("rkl", "fkl", "sft")) == pytest.approx(1.0)


def test_leaderboard_paired_differences(lb: pd.DataFrame):
    da, db, davg = (delta_base("rougeL", "sft", s) for s in (*SETS, AVG))
    assert da == "Δ ROUGE-L vs sft [alpha]"
    # fkl - sft, alpha: 5, 4, 6
    assert _cell(lb, "fkl", da) == pytest.approx(5.0)
    assert _cell(lb, "fkl", da, "ci_high") == pytest.approx(5.0 + T2 / SQ3)
    # fkl - sft, beta: 3, 4, 2; average: 4, 4, 4 (zero spread: p = 0)
    assert _cell(lb, "fkl", db) == pytest.approx(3.0)
    assert _cell(lb, "fkl", davg) == pytest.approx(4.0)
    assert _cell(lb, "fkl", davg, "ci_high") == pytest.approx(4.0)
    assert _cell(lb, "fkl", davg, "p") == 0.0
    # rkl - sft, alpha: 10, 2, 3 -> mean 5, sd sqrt(19); beta: seeds 1, 2 only -> 6, 7
    assert _cell(lb, "rkl", da, "ci_high") == pytest.approx(5.0 + T2 * math.sqrt(19) / SQ3)
    assert _cell(lb, "rkl", db) == pytest.approx(6.5)
    assert _cell(lb, "rkl", db, "n") == 2
    assert _cell(lb, "rkl", db, "ci_high") == pytest.approx(6.5 + T1 * math.sqrt(0.5) / SQ2)
    # average: rkl - sft over seeds 1, 2 = 8, 4.5
    assert _cell(lb, "rkl", davg, "p") == pytest.approx(_p_by_hand([8.0, 4.5]))
    # none for the baseline itself, none for the teacher (reference rows are never compared)
    assert math.isnan(_cell(lb, "sft", da)) and math.isnan(_cell(lb, "teacher", da))


def test_leaderboard_failed_run_listed_and_excluded(lb: pd.DataFrame):
    rkl = _row(lb, "rkl")
    assert rkl["Status"] == "partial" and rkl["Failed runs"] == 1
    assert "seed 3, beta" in rkl["Failures"] and OOM in rkl["Failures"]
    assert "Traceback" not in rkl["Failures"]  # first line only; the record keeps the rest
    assert _row(lb, "fkl")["Status"] == "ok" and pd.isna(_row(lb, "fkl")["Failures"])
    score_cols = [c for c in lb.columns if ("ROUGE-L" in c or "Exact match" in c) and not c.endswith((" p", " p_holm"))]
    assert lb[score_cols].abs().max().max() < 100  # the failed run's 999 (499.5) never leaks in
    assert _row(lb, "rkl")["Train time (s)"] == pytest.approx(15.0 + 2.0)  # mean of 16, 17, 18
    assert _row(lb, "sft")["Train time (s)"] == pytest.approx(12.0)
    assert _row(lb, "sft")["Peak memory (MB)"] == pytest.approx(900.0)


def test_all_failed_recipe_is_listed_unranked(records_dir: Path):
    for seed in SEEDS:
        for s in SETS:
            write_json_atomic(records_dir / f"gkd_s{seed}_{s}.json",
                              _record("gkd", seed, s, float("nan")))  # NaN metric => failed
    lb = build_leaderboard(load_records(records_dir).frame, n_boot=100)
    gkd = _row(lb, "gkd")
    assert gkd["Status"] == "failed" and gkd["Failed runs"] == 6 and pd.isna(gkd["Rank"])
    assert lb["Recipe"].tolist() == ["teacher", "rkl", "fkl", "sft", "gkd", "init"]
    assert "non-finite" in gkd["Failures"]


def test_higher_is_better_override_and_lower_primary(frame: pd.DataFrame):
    lb = build_leaderboard(frame, primary_metric="ece", n_boot=100)  # ece is lower-is-better by default
    assert metric_label("ece") == "ECE ↓"
    assert column(score_base("ece", AVG), "mean") in lb.columns
    # per-seed ece is 0.05 + 0.01*seed for everyone; rkl averages seeds 1, 2 only -> best (lowest)
    assert _row(lb, "rkl")["Rank"] == 1
    lb2 = build_leaderboard(frame, primary_metric="ece", higher_is_better={"ece": True}, n_boot=100)
    assert metric_label("ece", {"ece": True}) == "ECE"
    assert _row(lb2, "rkl")["Rank"] == 3


def test_leaderboard_rejects_bad_input(frame: pd.DataFrame):
    with pytest.raises(ValueError, match="rouge_typo"):
        build_leaderboard(frame, primary_metric="rouge_typo")
    with pytest.raises(ValueError, match="no better direction"):
        build_leaderboard(frame.assign(**{"metric:distinct_1": 0.5}), primary_metric="distinct_1")
    two = frame.copy()
    two.loc[two.index[0], "suite"] = "other"
    with pytest.raises(ValueError, match="several suites"):
        build_leaderboard(two)
    with pytest.raises(ValueError, match="no run records"):
        build_leaderboard(frame.iloc[0:0])


def test_missing_baseline_leaves_deltas_empty(frame: pd.DataFrame):
    report = build_report(frame, baseline="nonexistent", n_boot=100)
    lb = report.leaderboard
    assert lb[column(delta_base("rougeL", "nonexistent", "alpha"), "mean")].isna().all()
    assert "no successful run" in render_markdown(report)


# --------------------------------------------------------------------------- metrics that do not pick
def test_every_metric_has_a_declared_direction():
    # the audit: response_nll and the teacher-fit divergences are lower-is-better; distinct-n has none
    produced = ["rougeL", "exact_match", "valid_rate", "coverage", "distinct_1", "distinct_2", "ece", "response_nll",
                "response_ppl", "top1_agreement", "kl_to_teacher", "jsd_to_teacher", "tvd_to_teacher",
                "rougeL_seed_std", "lm_eval/tiny_mc/acc", "lm_eval/tiny_gen/exact_match", "lm_eval/t/acc_norm"]
    assert all(metric_info(m) is not None for m in produced)
    lower = {m for m in produced if direction(m) < 0}
    assert lower == {"ece", "response_nll", "response_ppl", "kl_to_teacher", "jsd_to_teacher", "tvd_to_teacher"}
    assert {m for m in produced if direction(m) == 0} == {"distinct_1", "distinct_2", "rougeL_seed_std"}
    assert metric_label("response_nll") == "Response NLL ↓" and metric_label("distinct_1") == "Distinct-1 ·"
    assert metric_info("something_new") is None and direction("something_new") == 0
    assert set(METRICS) >= {"response_nll", "jsd_to_teacher", "tvd_to_teacher"}


def test_legend_names_the_recipes_that_train_on_each_metric():
    cfgs = {
        "fkl": {"objective": "fkl", "params": {}, "temperature": 1.0, "kd_weight": 1.0},
        "imitkd": {"objective": "fkl", "temperature": 1.0, "kd_weight": 1.0, "mode": "on_policy"},
        "jsd": {"objective": "jsd", "params": {"beta": 0.5}, "temperature": 1.0, "kd_weight": 1.0},
        "jsd9": {"objective": "jsd", "params": {"beta": 0.9}, "kd_weight": 1.0},
        "mix": {"loss": [{"objective": "ce", "weight": 1.0}, {"objective": "tvd", "weight": 0.1, "temperature": 2.0}]},
        "half": {"objective": "rkl", "kd_weight": 0.5},
        "sft": {"objective": "ce", "kd_weight": 1.0},
    }
    assert recipes_training_on("kl_to_teacher", cfgs) == ["fkl", "imitkd"]
    assert recipes_training_on("jsd_to_teacher", cfgs) == ["jsd"]  # beta 0.9 is another quantity
    assert recipes_training_on("tvd_to_teacher", cfgs) == ["mix (τ=2)"]
    assert recipes_training_on("response_nll", cfgs) == ["half", "mix", "sft"]
    assert recipes_training_on("rougeL", cfgs) == []
    assert loss_terms(cfgs["half"]) == [
        {"objective": "rkl", "weight": 0.5, "temperature": 1.0, "params": {}},
        {"objective": "ce", "weight": 0.5, "temperature": 1.0, "params": {}}]
    recs = []
    for r, cfg in (("sft", cfgs["sft"]), ("fkl", cfgs["fkl"]), ("jsd", cfgs["jsd"])):
        for s in (1, 2):
            rec = _simple(r, s, 10.0 + s + (r == "fkl"), config={"recipe": cfg})
            rec["metrics"].update(kl_to_teacher=0.5 + 0.1 * s, jsd_to_teacher=0.1 * s, top1_agreement=0.4)
            recs.append(rec)
    report = build_report(_frame(recs), n_boot=50)
    legend = report.legend.set_index("Key")
    assert legend.at["kl_to_teacher", "Trained on by"] == "fkl (objective fkl)"
    assert legend.at["jsd_to_teacher", "Trained on by"] == "jsd (objective jsd)"
    assert legend.at["top1_agreement", "Trained on by"] == "none"
    assert legend.at["kl_to_teacher", "Better"] == "lower"
    assert "## Metrics legend" in render_markdown(report)


def test_duplicate_columns_are_dropped_by_content():
    recs = []
    for r, base in (("sft", 10.0), ("fkl", 12.0)):
        for s in (1, 2, 3):
            rec = _simple(r, s, base + s)
            rec["metrics"].update(exact_match=base / 2 + s, valid_rate=base / 2 + s, coverage=0.1 * s)
            recs.append(rec)
    df = _frame(recs)
    assert duplicate_metrics(df, ["rougeL", "exact_match", "valid_rate", "coverage"]) == {"valid_rate": "exact_match"}
    report = build_report(df, n_boot=50)
    lb = report.leaderboard
    assert not [c for c in lb.columns if c.startswith("Valid rate")]
    assert not [c for c in lb.columns if "[avg]" in c]  # one set: no [avg] copy of [test]
    assert "Valid rate is not shown: identical to Exact match in every run." in render_markdown(report)
    raw, _, _ = heatmap_frames(report)
    assert list(raw.columns) == ["ROUGE-L", "Exact match", "Coverage"]
    # equal on some runs only: kept
    recs[0]["metrics"]["valid_rate"] = 99.0
    assert duplicate_metrics(_frame(recs), ["exact_match", "valid_rate"]) == {}


def test_heatmap_colours_recipes_only_in_each_metrics_direction():
    recs = []
    vals = {"sft": (10.0, 2.0, 0.3), "a": (20.0, 1.5, 0.2), "b": (15.0, 3.0, 0.1)}  # rougeL, nll, distinct_1
    for r, (rouge, nll, dist) in vals.items():
        for s in (1, 2):
            rec = _simple(r, s, rouge)
            rec["metrics"].update(response_nll=nll, distinct_1=dist)
            recs.append(rec)
    init = _simple("init", 1, 0.0)
    init["metrics"].update(response_nll=9.0, distinct_1=0.9)  # the untrained student: extreme everywhere
    teacher = _simple("teacher", 0, 50.0)
    teacher["metrics"].update(response_nll=0.5, distinct_1=0.05)
    report = build_report(_frame([*recs, init, teacher]), n_boot=50)
    raw, colour, dirs = heatmap_frames(report)
    assert dirs == {"ROUGE-L": 1, "Response NLL ↓": -1, "Distinct-1 ·": 0}
    nll = colour["Response NLL ↓"]
    assert (nll["a"], nll["sft"], nll["b"]) == pytest.approx((1.0, 2 / 3, 0.0))  # lowest NLL = best = 1
    rouge = colour["ROUGE-L"]
    assert (rouge["a"], rouge["b"], rouge["sft"]) == pytest.approx((1.0, 0.5, 0.0))  # init/teacher not the scale
    assert colour.loc[["teacher", "init"]].isna().all().all()  # references shown uncoloured
    assert raw.at["init", "Response NLL ↓"] == 9.0
    assert colour["Distinct-1 ·"].isna().all()  # no better direction: never coloured


# ------------------------------------------------------------------------------------------- tuning
def _tuning_records():
    recs = []
    grid = {"sft": {0.001: 8.0, 0.003: 10.0, 0.01: 9.0}, "fkl": {0.001: 12.0, 0.003: 11.0, 0.01: 7.0}}
    for r, by in grid.items():
        for lr, v in by.items():
            for s, e in ((1, -0.5), (2, 0.5)):
                recs.append(_simple(r, s, v + e, eval_set="valid", phase="tune", hparams={"learning_rate": lr}))
    for r, lr in (("sft", 0.003), ("fkl", 0.003)):  # fkl's final runs did not use its validation best
        for s in (1, 2, 3):
            recs.append(_simple(r, s, 20.0 + s + (r == "fkl"), hparams={"learning_rate": lr}))
    return recs


def test_tuning_table_grid_scores_and_choice():
    tt = tuning_table(_tuning_records())
    assert tt["recipe"].tolist() == ["fkl"] * 3 + ["sft"] * 3
    assert tt["learning_rate"].tolist() == [0.001, 0.003, 0.01] * 2
    fkl = tt.loc[tt["recipe"] == "fkl"].set_index("learning_rate")
    assert fkl.at[0.001, "mean"] == pytest.approx(12.0) and fkl.at[0.001, "n"] == 2
    assert fkl.at[0.001, "ci_high"] - 12.0 == pytest.approx(T1 * math.sqrt(0.5) / SQ2)  # 11.5, 12.5
    assert fkl["best_on_validation"].tolist() == [True, False, False]
    assert fkl["chosen"].tolist() == [False, True, False]  # what the final runs used
    assert tt.at[0, "setting"] == "learning_rate=0.001"
    # without final runs: the best validation score is the choice
    only_tune = [r for r in _tuning_records() if r.get("phase") == "tune"]
    tt2 = tuning_table(only_tune).set_index(["recipe", "learning_rate"])
    assert bool(tt2.at[("fkl", 0.001), "chosen"]) and bool(tt2.at[("sft", 0.003), "chosen"])
    # lower-is-better primary flips the choice
    tt3 = tuning_table(only_tune, "rougeL", higher_is_better={"rougeL": False}).set_index(["recipe", "learning_rate"])
    assert bool(tt3.at[("fkl", 0.01), "chosen"])
    assert tuning_table([_simple("a", 1, 1.0)]).empty


def test_leaderboard_shows_chosen_hyperparameters_and_ignores_tune_runs():
    report = build_report(_frame(_tuning_records()), n_boot=50)
    lb = report.leaderboard
    assert _row(lb, "fkl")["Hyperparameters"] == "learning_rate=0.003"
    assert lb.attrs["eval_sets"] == ["test"]  # the tune runs' validation set is not a leaderboard column
    assert _cell(lb, "sft", score_base("rougeL", "test"), "n") == 3
    md = render_markdown(report)
    assert "## Hyperparameter search (validation split)" in md and "12.0 ± 6.4 †" in md
    assert "**11.0 ± 6.4**" in md


# --------------------------------------------------------------------------------------- rendering
def test_main_table_formatting(lb: pd.DataFrame):
    table = main_table(lb)
    assert table.loc[lb["Recipe"] == "sft", "ROUGE-L [alpha]"].item() == "42.0 ± 5.0"  # 4.968
    assert table.loc[lb["Recipe"] == "fkl", "ROUGE-L [avg]"].item() == "40.5 ± 3.7"  # 3.726
    assert table.loc[lb["Recipe"] == "fkl", "Δ vs sft [avg]"].item() == "+4.0 ± 0.0"
    assert table.loc[lb["Recipe"] == "fkl", "p vs sft (Holm)"].item() == "<0.001"
    assert table.loc[lb["Recipe"] == "teacher", "ROUGE-L [avg]"].item() == "55.0"  # n=1: no interval
    assert table["Rank"].tolist() == ["ref.", "1", "2", "3", "ref."]
    assert table["Recipe"].tolist()[0] == "teacher (reference)"
    assert list(table.columns) == ["Rank", "Recipe", "ROUGE-L [alpha]", "ROUGE-L [beta]", "ROUGE-L [avg]",
                                   "Δ vs sft [avg]", "p vs sft (Holm)", "p vs best (Holm)", "≈ best", "P(best)",
                                   "Runs", "Status"]


def test_render_markdown_sections(frame: pd.DataFrame):
    report = build_report(frame, n_boot=100)
    md = render_markdown(report, problems=["x.json: bad"], provenance={"git_rev": "abc", "torch": "2.13"},
                         left_out=["old.json: fingerprint differs"])
    lines = md.splitlines()
    assert lines[0] == "# Leaderboard — suite `tiny`"
    assert lines[2] == "> **Provenance** — git_rev: `abc`; torch: `2.13`"  # the stamp comes first
    header = next(line for line in lines if line.startswith("| Rank"))
    assert "ROUGE-L [avg]" in header and "P(best)" in header
    row = next(line for line in lines if line.startswith("| 3 "))
    assert re.search(r"\| sft \(baseline\)\s+\|\s+42\.0 ± 5\.0 \|\s+31\.0 ± 2\.5 \|\s+36\.5 ± 3\.7 \|", row), row
    assert "## Other metrics" in md and "KL to teacher ↓ [avg]" in md and "## Costs" in md
    assert "## Failed runs" in md and f"**rkl**: seed 3, beta: {OOM}" in md
    assert "## Records left out" in md and "old.json: fingerprint differs" in md and "x.json: bad" in md
    assert "95% Student-t interval over a recipe's training runs" in md
    assert not any(re.search(r"\b(nan|inf)\b", ln, re.IGNORECASE) for ln in lines if ln.startswith("|"))


def test_render_csv_html_latex(frame: pd.DataFrame, tmp_path: Path):
    report = build_report(frame, n_boot=100)
    csv = pd.read_csv(pd.io.common.StringIO(render_csv(report)))
    for stat in ("mean", "ci_low", "ci_high", "n"):
        assert f"ROUGE-L [alpha] {stat}" in csv.columns
    assert {"Δ ROUGE-L vs sft [avg] p_holm", "Δ ROUGE-L vs best [avg] p", "≈ best", "P(best)"} <= set(csv.columns)
    sft = csv.loc[csv["Recipe"] == "sft"].iloc[0]
    assert sft["ROUGE-L [alpha] ci_low"] == pytest.approx(42.0 - T2 * 2 / SQ3)
    assert csv["Recipe"].tolist() == ["teacher", "rkl", "fkl", "sft", "init"]
    page = render_html(report, provenance={"git_rev": "abc"})
    assert page.startswith("<!DOCTYPE html>") and "42.0 ± 5.0" in page and page.rstrip().endswith("</html>")
    assert 'class="data row0 col0 reference"' in page and "<code>abc</code>" in page
    assert render_html(report) == render_html(report)  # deterministic (fixed table ids)
    tex = render_latex(report)
    assert "\\toprule" in tex and "\\bottomrule" in tex and "42.0 $\\pm$ 5.0" in tex
    assert "ECE $\\downarrow$" in tex and "$\\Delta$ vs sft" in tex and "×" not in tex and "±" not in tex


# ------------------------------------------------------------------------------------------- plots
def _png_dpi(path: Path) -> float:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"pHYs":
            ppm_x, _, unit = struct.unpack(">IIB", data[pos + 8:pos + 17])
            assert unit == 1
            return ppm_x * 0.0254
        pos += 12 + length
    raise AssertionError("no pHYs chunk")


def test_plots_written_png_and_svg(frame: pd.DataFrame, tmp_path: Path):
    out = tmp_path / "plots"
    report = build_report(frame, n_boot=100)
    written = []
    written += plot_scores(report, out / "scores.png")
    written += plot_pareto(frame, out / "pareto")  # a records table works too
    written += plot_heatmap(report, out / "heatmap")
    curves = {"sft": [(s, 3.0 / (s + 1)) for s in range(0, 100, 10)],
              "fkl": [{"step": s, "loss": 2.0 / (s + 1)} for s in range(0, 100, 10)]}
    written += plot_training_curves(curves, out / "curves")
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{ext}" for n in ("scores", "pareto", "heatmap", "curves") for ext in ("png", "svg"))
    for p in written:
        assert p.stat().st_size > 1000
        if p.suffix == ".png":
            assert _png_dpi(p) >= 120
        else:
            assert p.read_text(encoding="utf-8").lstrip().startswith("<?xml")
    assert not list(out.glob(".*.tmp"))


def test_curves_frame_accepts_tables_with_seeds():
    df = pd.DataFrame({"recipe": ["a"] * 4, "seed": [1, 1, 2, 2], "step": [0, 1, 0, 1], "loss": [2, 1, 3, 1]})
    assert curves_frame(df).shape == (4, 4)
    nested = curves_frame({"a": {1: [(0, 2.0), (1, 1.0)], 2: [(0, 3.0), (1, float("nan"))]}})
    assert len(nested) == 3 and set(nested["seed"]) == {1, 2}
    # the layout harness.steps.publish passes: recipe -> seed -> JSON list of [step, loss]; empty allowed
    mixed = curves_frame({"sft": {1: [[1, 2.0], [2, 1.0]]}, "fkl": {}, "rkl": {1: []}})
    assert mixed["recipe"].tolist() == ["sft", "sft"] and mixed["loss"].tolist() == [2.0, 1.0]
    teachers = curves_frame({"a": {(0, 1): [(0, 1.0)], (1, 1): [(0, 3.0)]}})
    assert teachers["seed"].tolist() == [(0, 1), (1, 1)]
    with pytest.raises(NothingToPlot):
        plot_training_curves({"a": []}, "unused")


def test_training_curve_band_is_the_tables_t_interval():
    losses = {1: [4.0, 2.0], 2: [5.0, 2.5], 3: [6.0, 3.5]}  # step 0: mean 5, sd 1
    fig = training_curves_figure({"a": {s: list(zip((0, 10), v)) for s, v in losses.items()}})
    ax = fig.axes[0]
    ys = np.concatenate([p.vertices[:, 1] for c in ax.collections for p in c.get_paths()])
    xs = np.concatenate([p.vertices[:, 0] for c in ax.collections for p in c.get_paths()])
    at0 = ys[np.isclose(xs, 0.0)]
    assert at0.max() == pytest.approx(5.0 + T2 * 1.0 / SQ3) and at0.min() == pytest.approx(5.0 - T2 / SQ3)
    assert "95% t-interval" in fig._suptitle.get_text()


def test_pareto_uses_a_machine_independent_cost_and_labels_do_not_overlap():
    recs = []
    for i in range(9):  # nine recipes at nearly the same cost and score: the labels must still separate
        for s in (1, 2):
            rec = _simple(f"recipe_{i}", s, 20.0 + 0.01 * i + 0.001 * s, role="student")
            rec["costs"] = {"tokens": 1000.0 + i, "train_time_s": 10.0 * (9 - i)}
            recs.append(rec)
    report = build_report(_frame(recs), baseline="recipe_0", n_boot=50)
    assert pareto_cost(report.leaderboard)[0] == "Tokens"  # never wall-clock time
    fig = pareto_figure(report)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) == 9
    assert not any(a.overlaps(b) for a, b in combinations(boxes, 2))
    assert fig.axes[0].get_xlabel().startswith("Training tokens")
    # CPU time wins when recorded for every recipe
    for rec in recs:
        rec["costs"]["cpu_time_s"] = 5.0
    assert pareto_cost(build_report(_frame(recs), baseline="recipe_0", n_boot=50).leaderboard)[0] == "CPU time (s)"


def test_pareto_needs_a_machine_independent_cost(frame: pd.DataFrame, tmp_path: Path):
    with pytest.raises(NothingToPlot, match="machine-independent"):
        plot_pareto(frame.drop(columns=["cost:tokens"]), tmp_path / "p")


# ------------------------------------------------------------------------------------------ publish
def test_publish_end_to_end(record_files: list[Path], tmp_path: Path):
    out = tmp_path / "report"
    expected = [(r, s, e) for r in ("sft", "fkl", "rkl") for s in (*SEEDS, 4) for e in SETS]
    curves = {"sft": [(s, 1.0 / (s + 1)) for s in range(50)]}
    prov = {"git_rev": "abc123", "plan_fingerprint": "f1e2", "torch": "2.13.0", "machine": "x86_64"}
    written = publish(record_files, out, primary_metric="rougeL", baseline="sft", expected=expected,
                      curves=curves, provenance=prov, left_out=["stale.json: fingerprint 99 is not the plan's"],
                      n_boot=200)
    keys = {f"leaderboard_{k}" for k in ("md", "csv", "html", "tex")} | {"problems", "provenance", "scores_csv"} | {
        f"{n}_{ext}" for n in ("scores", "pareto", "heatmap", "training_curves") for ext in ("png", "svg")}
    assert set(written) == keys
    for p in written.values():
        assert p.exists() and p.stat().st_size > 0 and p.is_relative_to(out)
    md = written["leaderboard_md"].read_text(encoding="utf-8")
    assert md.splitlines()[2].startswith("> **Provenance** — git_rev: `abc123`; plan_fingerprint: `f1e2`")
    assert "broken.json" in md and "partial.json" in md and "stale.json: fingerprint 99" in md
    assert "missing run: recipe 'sft', seed 4, set 'alpha'" in md
    assert OOM in md
    problems = read_json(written["problems"])
    assert len(problems["missing_runs"]) == 6 and problems["left_out"] == ["stale.json: fingerprint 99 is not the plan's"]
    assert problems["failed_runs"][0]["path"].endswith("rkl_s3_beta.json")
    assert any("broken.json" in p for p in problems["unreadable_records"])
    prov_json = read_json(written["provenance"])
    assert prov_json["provenance"] == prov and prov_json["report"]["primary_metric"] == "rougeL"
    assert prov_json["records_used"] == 22 and prov_json["left_out"] == problems["left_out"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records", "report"]  # no staging left behind
    assert (out.stat().st_mode & 0o777) == 0o755
    # the README table from the published files
    table = render_markdown_table(out)
    assert table.splitlines()[0].split("|")[1].strip() == "Rank" and "rkl" in table and "P(best)" in table


def test_scores_csv_holds_metric_values_at_full_precision(tmp_path: Path):
    recs = [_simple("sft", s, 1 / 3 + s) for s in (1, 2)] + [_simple("fkl", s, 2 / 7 + s) for s in (1, 2)]
    recs[0]["metrics"]["ece"] = 0.1 + 0.2  # 0.30000000000000004
    written = publish(recs, tmp_path / "out", n_boot=50)
    scores = pd.read_csv(written["scores_csv"])
    assert set(scores["metric"]) == {"rougeL", "ece"}  # no costs, no timings
    assert "tokens" not in scores.columns and "cost" not in " ".join(scores.columns)
    got = scores.set_index(["recipe", "seed", "metric"])["value"]
    assert got[("sft", 1, "rougeL")] == 1 / 3 + 1  # exact, not rounded
    assert got[("fkl", 2, "rougeL")] == 2 / 7 + 2
    assert got[("sft", 1, "ece")] == 0.1 + 0.2
    # a re-run from the same records writes the same bytes
    again = publish(recs, tmp_path / "out2", n_boot=50)
    assert again["scores_csv"].read_bytes() == written["scores_csv"].read_bytes()
    assert again["leaderboard_md"].read_bytes() == written["leaderboard_md"].read_bytes()


def test_publish_takes_an_explicit_list(records_dir: Path, tmp_path: Path):
    with pytest.raises(TypeError, match="explicit list"):
        publish(records_dir, tmp_path / "out")
    with pytest.raises(TypeError, match="explicit list"):
        publish(str(records_dir / "*.json"), tmp_path / "out")
    with pytest.raises(ValueError, match="no readable run records"):
        publish([], tmp_path / "out")
    with pytest.raises(TypeError, match="flat"):
        publish([_simple("a", 1, 1.0)], tmp_path / "out", provenance={"versions": {"torch": "2"}})


def test_publish_failure_mid_way_keeps_the_previous_leaderboard(record_files, tmp_path, monkeypatch):
    out = tmp_path / "results" / "tiny"
    first = publish(record_files, out, n_boot=50)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise RuntimeError("killed while drawing the heatmap")

    monkeypatch.setattr(PUBLISH_MODULE, "plot_heatmap", boom)
    with pytest.raises(RuntimeError, match="killed"):
        publish(record_files[:6], out, n_boot=50)  # another leaderboard would have replaced the old one
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and first["leaderboard_md"].exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # the staging directory is gone
    # a staging directory of a publish killed outright (process gone) is cleared by the next publish
    (out.parent / ".tiny.staging-4194305-abc").mkdir()  # above Linux's largest pid: no such process
    monkeypatch.undo()
    publish(record_files, out, n_boot=50)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_publish_interrupted_between_renames_recovers(record_files, tmp_path, monkeypatch):
    out = tmp_path / "results" / "tiny"
    publish(record_files, out, n_boot=50)
    old_md = (out / "leaderboard.md").read_bytes()
    real_rename = os.rename

    def rename(src, dst):
        if ".staging-" in str(src):
            raise KeyboardInterrupt  # killed after the old directory moved aside, before the new one moved in
        return real_rename(src, dst)

    monkeypatch.setattr(PUBLISH_MODULE.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        publish(record_files[:6], out, n_boot=50)
    monkeypatch.setattr(PUBLISH_MODULE.os, "rename", real_rename)
    assert not out.exists()
    (backup,) = [p for p in out.parent.iterdir() if p.name.startswith(".tiny.old-")]
    assert (backup / "leaderboard.md").read_bytes() == old_md  # complete, not deleted
    # the next publish puts it back before anything else, so a failure then still leaves it in place
    monkeypatch.setattr(PUBLISH_MODULE, "plot_scores", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        publish(record_files, out, n_boot=50)
    assert (out / "leaderboard.md").read_bytes() == old_md
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_publish_refuses_a_read_only_parent_before_any_work(record_files, tmp_path, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    calls = []
    monkeypatch.setattr(PUBLISH_MODULE, "load_record_list", lambda *a: calls.append(a))
    if os.geteuid() == 0:  # root ignores the mode bits: make mkdtemp fail the way it does for other users
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(parent))
        monkeypatch.setattr(PUBLISH_MODULE.tempfile, "mkdtemp", denied)
    try:
        with pytest.raises(PermissionError) as info:
            publish(record_files, parent / "tiny", n_boot=50)
    finally:
        parent.chmod(0o755)
    msg = str(info.value)
    assert "\n" not in msg and str(parent) in msg and "not writable" in msg
    assert calls == []  # no record was read


def test_publish_refuses_a_directory_holding_other_files(record_files, tmp_path):
    shared = tmp_path / "results"
    (shared / "other_suite").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="other_suite"):
        publish(record_files, shared, n_boot=50)
    assert (shared / "other_suite").is_dir()


def test_publish_with_teachers_and_tuning_writes_side_tables(tmp_path: Path):
    recs = _two_teacher_records() + [
        _simple("a", s, 5.0 + s, eval_set="valid", phase="tune", hparams={"learning_rate": lr})
        for s in (1, 2) for lr in (0.001, 0.01)]
    written = publish(recs, tmp_path / "out", n_boot=50)
    assert {"teachers_csv", "tuning_csv", "tuning_png", "tuning_svg"} <= set(written)
    teachers = pd.read_csv(written["teachers_csv"])
    assert set(teachers["teacher_seed"]) == {0, 1}
    md = written["leaderboard_md"].read_text(encoding="utf-8")
    assert "## Per teacher" in md and "## Hyperparameter search" in md


# ------------------------------------------------------------------------------------------ io
def test_atomic_writers_round_trip_without_temp_files(tmp_path: Path):
    target = tmp_path / "deep" / "dir" / "x.json"
    write_json_atomic(target, {"a": 1, "b": [1.5, None], "s": "ü"})
    assert read_json(target) == {"a": 1, "b": [1.5, None], "s": "ü"}
    write_json_atomic(target, {"a": 2})
    assert read_json(target) == {"a": 2}
    write_text_atomic(tmp_path / "t.txt", "hello\n")
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["t.txt", "x.json"]


def test_atomic_json_keeps_old_file_when_serialisation_fails(tmp_path: Path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"ok": True})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic(target, {"ok": False, "bad": object()})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_keeps_old_file_when_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"ok": True})
    before = target.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(target, {"ok": False, "payload": "x" * 100_000})
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    # the same when the process is "interrupted" mid-replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, "partial")
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_read_json_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ')
    with pytest.raises(JSONReadError, match="bad.json") as info:
        read_json(bad)
    assert info.value.path == str(bad) and "line 1" in str(info.value)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.json.*empty"):
        read_json(empty)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(JSONReadError, match="bin.json"):
        read_json(binary)
    json_ok = tmp_path / "ok.json"
    json_ok.write_text(json.dumps({"x": float("nan")}))
    assert math.isnan(read_json(json_ok)["x"])
