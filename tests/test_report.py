"""Tests for harness.io and harness.report: records, statistics, leaderboard, plots, publish.

The synthetic suite: recipes sft (baseline), fkl, rkl × seeds 1, 2, 3 × eval sets alpha, beta, plus a
teacher and an untrained init (seed 0), one failed run (rkl, seed 3, beta — its record carries an absurd
ROUGE-L of 999 that must not leak into any statistic), a corrupt JSON file and a partial record.
Expected numbers are computed by hand below from the t quantiles t_{0.975,1} and t_{0.975,2}.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pandas as pd
import pytest

from harness.io import JSONReadError, read_json, write_json_atomic, write_text_atomic
from harness.report import publish
from harness.report.leaderboard import (
    AVG,
    build_leaderboard,
    column,
    delta_base,
    display_table,
    metric_label,
    render_markdown,
    score_base,
    write_leaderboard,
)
from harness.report.plots import (
    NothingToPlot,
    curves_frame,
    plot_heatmap,
    plot_pareto,
    plot_scores,
    plot_training_curves,
)
from harness.report.records import load_records, missing_runs, parse_record
from harness.report.stats import mean_ci, paired_diff, pareto_front

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
def frame(records_dir: Path) -> pd.DataFrame:
    return load_records(records_dir).frame


@pytest.fixture()
def lb(frame: pd.DataFrame) -> pd.DataFrame:
    return build_leaderboard(frame, primary_metric="rougeL", baseline="sft")


def _row(lb: pd.DataFrame, recipe: str) -> pd.Series:
    rows = lb.loc[lb["Recipe"] == recipe]
    assert len(rows) == 1
    return rows.iloc[0]


def _cell(lb, recipe, base, stat="mean"):
    return _row(lb, recipe)[column(base, stat)]


# ------------------------------------------------------------------------------------------- stats
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


def test_pareto_front():
    xs, ys = [12, 22, 17, 30, 12], [36.5, 40.5, 42.0, 41.0, 30.0]
    assert pareto_front(xs, ys) == [0, 2]
    # lower score is better: the cheapest lowest-scoring point wins alone
    assert pareto_front(xs, ys, maximize_y=False) == [4]
    assert pareto_front([1, 1], [2, 2]) == [0, 1]  # equal points do not dominate each other
    assert pareto_front([1, float("nan")], [1, 5]) == [0]


# ----------------------------------------------------------------------------------------- records
def test_load_records_reports_bad_files_by_name(records_dir: Path):
    df, problems = load_records(records_dir)
    assert len(df) == 3 * 3 * 2 + 2 + 2  # 18 student records (incl. the failed one), teacher, init
    assert len(problems) == 2
    assert any("broken.json" in p and "invalid JSON" in p for p in problems)
    assert any("partial.json" in p and "eval_set" in p for p in problems)
    assert {"metric:rougeL", "metric:ece", "cost:train_time_s", "cost:peak_rss_mb"} <= set(df.columns)
    assert df["seed"].dtype == "int64"
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


def test_duplicate_records_are_reported(records_dir: Path):
    write_json_atomic(records_dir / "zz_copy.json", _record("sft", 1, "alpha", 1.0))
    df, problems = load_records(records_dir)
    assert any("zz_copy.json" in p and "duplicate" in p for p in problems)
    kept = df.loc[(df["recipe"] == "sft") & (df["seed"] == 1) & (df["eval_set"] == "alpha")]
    assert kept["metric:rougeL"].tolist() == [40.0]


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


def test_missing_runs(frame: pd.DataFrame):
    expected = [(r, s, e) for r in ("sft", "fkl", "rkl", "gkd") for s in SEEDS for e in SETS]
    missing = missing_runs(expected, frame)
    # the failed run exists (it is listed as failed), so it is not missing
    assert missing == [("gkd", s, e) for s in SEEDS for e in SETS]
    assert missing_runs([("sft", 1, "alpha")], frame) == []


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
    assert _row(lb, "sft")["Kind"] == "baseline" and _row(lb, "fkl")["Kind"] == "student"
    assert _row(lb, "fkl")["n seeds"] == 3 and _row(lb, "teacher")["n seeds"] == 1


def test_leaderboard_paired_differences(lb: pd.DataFrame):
    da, db, davg = (delta_base("rougeL", "sft", s) for s in (*SETS, AVG))
    assert da == "Δ ROUGE-L vs sft [alpha]"
    # fkl - sft, alpha: 5, 4, 6
    assert _cell(lb, "fkl", da) == pytest.approx(5.0)
    assert _cell(lb, "fkl", da, "ci_high") == pytest.approx(5.0 + T2 / SQ3)
    # fkl - sft, beta: 3, 4, 2; average: 4, 4, 4 (zero spread)
    assert _cell(lb, "fkl", db) == pytest.approx(3.0)
    assert _cell(lb, "fkl", davg) == pytest.approx(4.0)
    assert _cell(lb, "fkl", davg, "ci_high") == pytest.approx(4.0)
    # rkl - sft, alpha: 10, 2, 3 -> mean 5, sd sqrt(19); beta: seeds 1, 2 only -> 6, 7
    assert _cell(lb, "rkl", da, "ci_high") == pytest.approx(5.0 + T2 * math.sqrt(19) / SQ3)
    assert _cell(lb, "rkl", db) == pytest.approx(6.5)
    assert _cell(lb, "rkl", db, "n") == 2
    assert _cell(lb, "rkl", db, "ci_high") == pytest.approx(6.5 + T1 * math.sqrt(0.5) / SQ2)
    # none for the baseline itself, none for the teacher (no common seed)
    assert math.isnan(_cell(lb, "sft", da)) and math.isnan(_cell(lb, "teacher", da))


def test_leaderboard_failed_run_listed_and_excluded(lb: pd.DataFrame):
    rkl = _row(lb, "rkl")
    assert rkl["Status"] == "partial" and rkl["Failed runs"] == 1
    assert "seed 3, beta" in rkl["Failures"] and OOM in rkl["Failures"]
    assert "Traceback" not in rkl["Failures"]  # first line only; the record keeps the rest
    assert _row(lb, "fkl")["Status"] == "ok" and pd.isna(_row(lb, "fkl")["Failures"])
    score_cols = [c for c in lb.columns if "ROUGE-L" in c or "Exact match" in c]
    assert lb[score_cols].abs().max().max() < 100  # the failed run's 999 (499.5) never leaks in
    assert _row(lb, "rkl")["Train time (s)"] == pytest.approx(15.0 + 2.0)  # mean of 16, 17, 18
    assert _row(lb, "sft")["Train time (s)"] == pytest.approx(12.0)
    assert _row(lb, "sft")["Peak memory (MB)"] == pytest.approx(900.0)


def test_all_failed_recipe_is_listed_unranked(records_dir: Path):
    for seed in SEEDS:
        for s in SETS:
            write_json_atomic(records_dir / f"gkd_s{seed}_{s}.json",
                              _record("gkd", seed, s, float("nan")))  # NaN metric => failed
    lb = build_leaderboard(load_records(records_dir).frame)
    gkd = _row(lb, "gkd")
    assert gkd["Status"] == "failed" and gkd["Failed runs"] == 6 and pd.isna(gkd["Rank"])
    assert lb["Recipe"].tolist() == ["teacher", "rkl", "fkl", "sft", "gkd", "init"]
    assert "non-finite" in gkd["Failures"]


def test_higher_is_better_override_and_lower_primary(frame: pd.DataFrame):
    lb = build_leaderboard(frame, primary_metric="ece")  # ece is lower-is-better by default
    assert metric_label("ece") == "ECE ↓"
    assert column(score_base("ece", AVG), "mean") in lb.columns
    # per-seed ece is 0.05 + 0.01*seed for everyone; rkl averages seeds 1, 2 only -> best (lowest)
    assert _row(lb, "rkl")["Rank"] == 1
    lb2 = build_leaderboard(frame, primary_metric="ece", higher_is_better={"ece": True})
    assert metric_label("ece", {"ece": True}) == "ECE"
    assert _row(lb2, "rkl")["Rank"] == 3


def test_leaderboard_rejects_bad_input(frame: pd.DataFrame):
    with pytest.raises(ValueError, match="rouge_typo"):
        build_leaderboard(frame, primary_metric="rouge_typo")
    two = frame.copy()
    two.loc[two.index[0], "suite"] = "other"
    with pytest.raises(ValueError, match="several suites"):
        build_leaderboard(two)
    with pytest.raises(ValueError, match="no run records"):
        build_leaderboard(frame.iloc[0:0])


def test_missing_baseline_leaves_deltas_empty(frame: pd.DataFrame):
    lb = build_leaderboard(frame, baseline="nonexistent")
    assert lb[column(delta_base("rougeL", "nonexistent", "alpha"), "mean")].isna().all()
    assert "no successful run" in render_markdown(lb)


def test_markdown_formatting(lb: pd.DataFrame):
    table = display_table(lb)
    assert table.loc[lb["Recipe"] == "sft", "ROUGE-L [alpha]"].item() == "42.0 ± 5.0"  # 4.968
    assert table.loc[lb["Recipe"] == "fkl", "ROUGE-L [avg]"].item() == "40.5 ± 3.7"  # 3.726
    assert table.loc[lb["Recipe"] == "fkl", "Δ ROUGE-L vs sft [alpha]"].item() == "+5.0 ± 2.5"
    assert table.loc[lb["Recipe"] == "teacher", "ROUGE-L [avg]"].item() == "55.0"  # n=1: no interval
    assert table.loc[lb["Recipe"] == "sft", "ECE ↓ [avg]"].item() == "0.070 ± 0.025"
    assert table["Rank"].tolist() == ["ref.", "1", "2", "3", "ref."]
    assert table["Recipe"].tolist()[0] == "teacher (reference)"
    md = render_markdown(lb, problems=["x.json: bad"])
    header = next(line for line in md.splitlines() if line.startswith("| Rank"))
    assert "ROUGE-L [avg]" in header and "KL to teacher ↓ [avg]" in header
    assert "| 3 | sft (baseline) | 3 | 42.0 ± 5.0 | 31.0 ± 2.5 | 36.5 ± 3.7 |" in md
    assert "## Failed runs" in md and f"**rkl**: seed 3, beta: {OOM}" in md
    assert "x.json: bad" in md


# ------------------------------------------------------------------------------------------ output
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


def test_write_leaderboard_files(lb: pd.DataFrame, tmp_path: Path):
    paths = write_leaderboard(lb, tmp_path / "out", stem="board")
    assert set(paths) == {"md", "csv", "html", "tex"}
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0 and p.stem == "board"
    csv = pd.read_csv(paths["csv"])
    for stat in ("mean", "ci_low", "ci_high", "n"):
        assert f"ROUGE-L [alpha] {stat}" in csv.columns
    sft = csv.loc[csv["Recipe"] == "sft"].iloc[0]
    assert sft["ROUGE-L [alpha] ci_low"] == pytest.approx(42.0 - T2 * 2 / SQ3)
    assert csv["Recipe"].tolist() == ["teacher", "rkl", "fkl", "sft", "init"]
    html = paths["html"].read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "42.0 ± 5.0" in html and "</html>" in html
    tex = paths["tex"].read_text(encoding="utf-8")
    assert "\\toprule" in tex and "\\bottomrule" in tex and "42.0 $\\pm$ 5.0" in tex
    assert "ECE $\\downarrow$" in tex


def test_plots_written_png_and_svg(frame: pd.DataFrame, tmp_path: Path):
    out = tmp_path / "plots"
    written = []
    written += plot_scores(frame, out / "scores.png")
    written += plot_pareto(frame, out / "pareto")
    written += plot_heatmap(frame, out / "heatmap")
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
    with pytest.raises(NothingToPlot):
        plot_training_curves({"a": []}, "unused")


def test_pareto_needs_costs(frame: pd.DataFrame, tmp_path: Path):
    with pytest.raises(NothingToPlot, match="train_time_s"):
        plot_pareto(frame.drop(columns=["cost:train_time_s"]), tmp_path / "p")


def test_publish_end_to_end(records_dir: Path, tmp_path: Path):
    out = tmp_path / "report"
    expected = [(r, s, e) for r in ("sft", "fkl", "rkl") for s in (*SEEDS, 4) for e in SETS]
    curves = {"sft": [(s, 1.0 / (s + 1)) for s in range(50)]}
    written = publish(records_dir, out, primary_metric="rougeL", baseline="sft", expected=expected, curves=curves)
    keys = {f"leaderboard_{k}" for k in ("md", "csv", "html", "tex")} | {"problems"} | {
        f"{n}_{ext}" for n in ("scores", "pareto", "heatmap", "training_curves") for ext in ("png", "svg")}
    assert set(written) == keys
    for p in written.values():
        assert p.exists() and p.stat().st_size > 0
    md = written["leaderboard_md"].read_text(encoding="utf-8")
    assert "broken.json" in md and "partial.json" in md
    assert "missing run: recipe 'sft', seed 4, set 'alpha'" in md
    assert OOM in md
    problems = read_json(written["problems"])
    assert len(problems["missing_runs"]) == 6
    assert problems["failed_runs"][0]["path"].endswith("rkl_s3_beta.json")
    assert any("broken.json" in p for p in problems["unreadable_records"])
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_publish_reads_nested_record_layout_by_glob(tmp_path: Path):
    root = tmp_path / "records"
    for recipe in ("sft", "fkl"):
        for seed in SEEDS:
            for eval_set, bump in zip(SETS, (0.0, -10.0)):
                rec = _record(recipe, seed, eval_set, 40.0 + seed + bump + (2.0 if recipe == "fkl" else 0.0))
                write_json_atomic(root / recipe / f"seed{seed}" / f"{eval_set}.json", rec)
    written = publish(str(root / "*" / "seed*" / "*.json"), tmp_path / "out")
    lb = pd.read_csv(written["leaderboard_csv"])
    assert lb["Recipe"].tolist() == ["fkl", "sft"]
    assert lb.loc[lb["Recipe"] == "fkl", "Δ ROUGE-L vs sft [avg] mean"].item() == pytest.approx(2.0)


def test_publish_without_records_raises(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable run records"):
        publish(tmp_path / "empty", tmp_path / "out")


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
