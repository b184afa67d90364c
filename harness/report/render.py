"""Rendering of a :class:`~harness.report.leaderboard.Report`: string tables for people, written with
pandas' own writers — ``DataFrame.to_markdown`` (tabulate), ``Styler.to_html``, ``Styler.to_latex`` — and
``DataFrame.to_csv`` for the numeric table. No statistics are computed here.

Markdown layout (``leaderboard.md``): title, provenance stamp, the main table (rank, primary metric with
intervals, paired tests, P(best)), the notes (which variance the intervals include, what the tests are),
other metrics, costs, per-teacher results and their rank agreement (several teachers only), the tuning
table (when tuning records exist), the metrics legend (which recipe trains on each metric), failed runs,
records left out and problems. Recipes without a successful run appear only in the main table.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.report.aggregate import AVG, REFERENCE_KINDS
from harness.report.leaderboard import (
    COST_LABELS,
    P_BEST,
    TIED,
    Report,
    best_base,
    column,
    delta_base,
    score_base,
)
from harness.report.metric_info import metric_label

__all__ = [
    "agreement_table",
    "costs_table",
    "decimals_for",
    "legend_table",
    "main_table",
    "metrics_table",
    "render_csv",
    "render_html",
    "render_latex",
    "render_markdown",
    "render_markdown_table",
    "teachers_table",
    "tuning_display",
]

DASH = "—"
CHECK = "✓"


# --------------------------------------------------------------------------------------- formatting
def decimals_for(values: pd.Series) -> int:
    """Decimals to show for a column: 1 when values reach 10, 2 when they reach 1, else 3."""
    finite = pd.to_numeric(values, errors="coerce").astype("float64").abs()
    finite = finite[np.isfinite(finite)]
    if finite.empty:
        return 1
    top = finite.max()
    return 1 if top >= 10 else (2 if top >= 1 else 3)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def fmt_interval(mean: Any, low: Any, high: Any, decimals: int, signed: bool = False) -> str:
    """``"45.2 ± 1.3"`` (``"+5.0 ± 2.5"`` when signed); the mean alone when the interval is undefined."""
    m, lo, hi = _num(mean), _num(low), _num(high)
    if not np.isfinite(m):
        return DASH
    text = f"{m:{'+' if signed else ''}.{decimals}f}"
    if np.isfinite(lo) and np.isfinite(hi):
        text += f" ± {(hi - lo) / 2:.{decimals}f}"
    return text


def fmt_p(p: Any) -> str:
    """A p-value: ``"<0.001"``, ``"0.012"``, ``"1"``; ``—`` when there is no test."""
    v = _num(p)
    if not np.isfinite(v):
        return DASH
    if v < 0.001:
        return "<0.001"
    return "1" if v >= 0.9995 else f"{v:.3f}"


def fmt_cost(value: Any) -> str:
    v = _num(value)
    if not np.isfinite(v):
        return DASH
    if abs(v) >= 1000 or (abs(v) >= 1 and v.is_integer()):
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _is_true(v: Any) -> bool | None:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str):
        return {"true": True, "false": False}.get(v.strip().lower())
    return bool(v)


def _interval_col(lb: pd.DataFrame, base: str, decimals: int | None = None, signed: bool = False) -> list[str]:
    d = decimals if decimals is not None else decimals_for(lb[column(base, "mean")])
    return [fmt_interval(m, lo, hi, d, signed) for m, lo, hi in
            zip(lb[column(base, "mean")], lb[column(base, "ci_low")], lb[column(base, "ci_high")])]


def _kinds(lb: pd.DataFrame) -> list[str]:
    return lb["Kind"].astype(str).tolist() if "Kind" in lb.columns else ["student"] * len(lb)


def _recipe_names(lb: pd.DataFrame) -> list[str]:
    return [f"{r} (reference)" if k in REFERENCE_KINDS else (f"{r} (baseline)" if k == "baseline" else str(r))
            for r, k in zip(lb["Recipe"], _kinds(lb))]


def _has_success(lb: pd.DataFrame) -> pd.Series:
    return lb["Status"].astype(str) != "failed" if "Status" in lb.columns else pd.Series(True, index=lb.index)


# ------------------------------------------------------------------------------------ string tables
def main_table(lb: pd.DataFrame) -> pd.DataFrame:
    """Rank, recipe, chosen hyperparameters, the primary metric per set with intervals, the difference from
    the baseline and its Holm-adjusted p, p against the best, ``≈ best``, ``P(best)``, runs and status."""
    a = lb.attrs
    over = a.get("overrides")
    primary, baseline, overall = a["primary_metric"], a["baseline"], a["overall"]
    bases = [score_base(primary, s, over) for s in a["show_sets"]]
    decimals = max(decimals_for(lb[column(b, "mean")]) for b in bases)
    out = pd.DataFrame(index=lb.index)
    out["Rank"] = ["ref." if k in REFERENCE_KINDS else (DASH if pd.isna(r) else str(int(r)))
                   for r, k in zip(lb["Rank"], _kinds(lb))]
    out["Recipe"] = _recipe_names(lb)
    if "Hyperparameters" in lb.columns and lb["Hyperparameters"].notna().any():
        out["Hyperparameters"] = [h if isinstance(h, str) and h else DASH for h in lb["Hyperparameters"]]
    for b in bases:
        out[b] = _interval_col(lb, b, decimals)
    dbase = delta_base(primary, baseline, overall, over)
    out[f"Δ vs {baseline} [{overall}]"] = _interval_col(lb, dbase, decimals, signed=True)
    out[f"p vs {baseline} (Holm)"] = [fmt_p(p) for p in lb[column(dbase, "p_holm")]]
    out["p vs best (Holm)"] = [fmt_p(p) for p in lb[column(best_base(primary, overall, over), "p_holm")]]
    out[TIED] = [CHECK if _is_true(v) else ("" if _is_true(v) is False else DASH) for v in lb[TIED]]
    out[P_BEST] = [DASH if not np.isfinite(_num(p)) else f"{_num(p):.2f}" for p in lb[P_BEST]]
    out["Runs"] = [str(int(n)) for n in lb["n runs"]]
    if "Status" in lb.columns:
        out["Status"] = lb["Status"].astype(str).tolist()
    return out


def metrics_table(lb: pd.DataFrame) -> pd.DataFrame:
    """Every other metric (mean ± interval) for recipes with a successful run."""
    a = lb.attrs
    over = a.get("overrides")
    keep = _has_success(lb)
    sub = lb.loc[keep]
    out = pd.DataFrame({"Recipe": [n for n, k in zip(_recipe_names(lb), keep) if k]}, index=sub.index)
    for m in a.get("others", []):
        base = score_base(m, a["overall"], over)
        if column(base, "mean") in sub.columns:
            out[base] = _interval_col(sub, base)
    return out


def costs_table(lb: pd.DataFrame) -> pd.DataFrame:
    """Costs (mean over successful runs) for recipes with a successful run."""
    keep = _has_success(lb)
    sub = lb.loc[keep]
    out = pd.DataFrame({"Recipe": [n for n, k in zip(_recipe_names(lb), keep) if k]}, index=sub.index)
    for label in COST_LABELS.values():
        if label in sub.columns:
            out[label] = [fmt_cost(v) for v in sub[label]]
    return out


def teachers_table(report: Report) -> pd.DataFrame:
    """Recipe × teacher: mean ± interval over that teacher's seeds and the rank under that teacher."""
    pt = report.per_teacher
    if pt.empty:
        return pd.DataFrame()
    order = [r for r in report.leaderboard["Recipe"] if r in set(pt["recipe"])]
    d = decimals_for(pt["mean"])
    cells = {}
    for t, sub in pt.groupby("teacher_seed"):
        sub = sub.set_index("recipe")
        cells[f"teacher {t}"] = [
            DASH if r not in sub.index else fmt_interval(sub.at[r, "mean"], sub.at[r, "ci_low"], sub.at[r, "ci_high"], d)
            + ("" if pd.isna(sub.at[r, "rank"]) else f" (#{int(sub.at[r, 'rank'])})")
            for r in order
        ]
    kinds = dict(zip(report.leaderboard["Recipe"], _kinds(report.leaderboard)))
    names = [f"{r} (reference)" if kinds.get(r) in REFERENCE_KINDS else r for r in order]
    return pd.DataFrame({"Recipe": names, **cells})


def agreement_table(report: Report) -> pd.DataFrame:
    """Teacher pairs: Kendall τ, Spearman ρ (with p), recipes compared, top recipe under each, same top."""
    ag = report.teacher_agreement
    if ag.empty:
        return pd.DataFrame()

    def corr(v: Any, p: Any) -> str:
        return DASH if not np.isfinite(_num(v)) else f"{_num(v):+.2f} (p {fmt_p(p)})"

    return pd.DataFrame({
        "Teachers": [f"{a} vs {b}" for a, b in zip(ag["teacher_a"], ag["teacher_b"])],
        "Recipes": [str(int(n)) for n in ag["n"]],
        "Kendall τ": [corr(v, p) for v, p in zip(ag["kendall_tau"], ag["kendall_p"])],
        "Spearman ρ": [corr(v, p) for v, p in zip(ag["spearman_rho"], ag["spearman_p"])],
        "Top recipe": [f"{x or DASH} / {y or DASH}" for x, y in zip(ag["top_a"], ag["top_b"])],
        "Same top": ["yes" if s else "no" for s in ag["same_top"]],
    })


def tuning_display(report: Report) -> pd.DataFrame:
    """Recipe × grid setting: validation score (± interval when several runs); the chosen one in bold."""
    tt = report.tuning
    if tt.empty:
        return pd.DataFrame()
    d = decimals_for(tt["mean"])
    settings = list(dict.fromkeys(tt.sort_values(["learning_rate", "setting"])["setting"]))
    rows = []
    for recipe, sub in tt.groupby("recipe", sort=True):
        row = {"Recipe": recipe}
        by = sub.set_index("setting")
        for s in settings:
            if s not in by.index:
                row[s] = DASH
                continue
            text = fmt_interval(by.at[s, "mean"], by.at[s, "ci_low"], by.at[s, "ci_high"], d)
            if bool(by.at[s, "best_on_validation"]) and not bool(by.at[s, "chosen"]):
                text += " †"
            row[s] = f"**{text}**" if bool(by.at[s, "chosen"]) else text
        picked = sub.loc[sub["chosen"].astype(bool), "setting"].tolist()
        row["Chosen"] = picked[0] if picked else DASH
        rows.append(row)
    return pd.DataFrame(rows)


def legend_table(report: Report) -> pd.DataFrame:
    """The metrics legend: column, better direction, meaning, which recipes train on it."""
    return report.legend[["Column", "Better", "Meaning", "Trained on by"]].copy()


def notes(lb: pd.DataFrame) -> list[str]:
    """The reading instructions printed under the main table."""
    a = lb.attrs
    primary_label = metric_label(a["primary_metric"], a.get("overrides"))
    baseline, alpha = a["baseline"], a.get("alpha", 0.05)
    n_cmp = a.get("n_compared", 0)
    out = [
        a.get("variance", ""),
        f"Rank: {primary_label} on [{a['overall']}]" + (" (the mean of a run's per-set scores; runs with every "
        "set only)" if a["overall"] == AVG else "") + "; reference rows (teacher, untrained init) are not ranked.",
        f"Δ vs {baseline}: mean and interval of the per-run differences, runs paired on (teacher, training seed). "
        f"p vs {baseline}: two-sided paired t-test on these differences, Holm-adjusted over the "
        f"{max(n_cmp - 1, 0)} recipes compared with {baseline}.",
        f"p vs best: the same test against the best recipe ({a.get('best') or DASH}), Holm-adjusted over the "
        f"{max(n_cmp - 1, 0)} other recipes. {TIED} {CHECK}: the best, or not significantly different from it "
        f"(adjusted p ≥ {alpha:g}) — not a proof of equivalence; {DASH}: fewer than 2 shared runs.",
        f"{P_BEST}: share of {a.get('n_boot', 0):,} bootstrap replicates in which the recipe has the best mean "
        "(runs resampled with replacement, the same runs for every recipe, within each teacher; "
        f"numpy default_rng({a.get('rng_seed', 0)})).",
    ]
    if a.get("baseline_found") is False:
        out.append(f"Baseline recipe {baseline!r} has no successful run: Δ and p vs {baseline} are empty.")
    return [n for n in out if n]


def _other_notes(lb: pd.DataFrame) -> list[str]:
    a = lb.attrs
    over = a.get("overrides")
    out = [f"Metrics on [{a['overall']}]" + (" are averaged over the sets that report them" if a["overall"] == AVG
           else "") + "; ↓ lower is better, · no better direction (never ranked or coloured as better)."]
    for dropped, kept in (a.get("duplicates") or {}).items():
        out.append(f"{metric_label(dropped, over)} is not shown: identical to {metric_label(kept, over)} in "
                   "every run.")
    return out


def _failure_lines(lb: pd.DataFrame, max_len: int = 300) -> list[tuple[str, str]]:
    out = []
    if "Failures" not in lb.columns:
        return out
    for recipe, text in zip(lb["Recipe"], lb["Failures"]):
        if isinstance(text, str) and text:
            out.append((str(recipe), text if len(text) <= max_len else text[: max_len - 1] + "…"))
    return out


# ------------------------------------------------------------------------------------------ markdown
_TEXT_COLS = {"Rank", "Recipe", "Status", "Loss", "Mode", "Paper", "Code", "Deviations", "Hyperparameters", "Chosen", "Teachers", "Top recipe", "Same top",
              "Column", "Better", "Meaning", "Trained on by", TIED}


def _md_escape(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(table: pd.DataFrame) -> str:
    """``DataFrame.to_markdown`` (GitHub pipe table) of a string table: text columns left-aligned,
    numbers right-aligned, cells kept verbatim (no number parsing)."""
    safe = table.map(_md_escape)
    safe.columns = [_md_escape(c) for c in table.columns]
    align = tuple("left" if c in _TEXT_COLS or c.startswith("teacher ") else "right" for c in table.columns)
    return safe.to_markdown(index=False, colalign=align, disable_numparse=True)


def _provenance_lines(provenance: Mapping[str, Any] | None) -> list[str]:
    if not provenance:
        return []
    items = "; ".join(f"{k}: `{v}`" for k, v in provenance.items())
    return [f"> **Provenance** — {_md_escape(items)}", ""]


def render_markdown(
    report: Report,
    problems: Sequence[str] = (),
    *,
    provenance: Mapping[str, Any] | None = None,
    left_out: Sequence[str] | None = None,
) -> str:
    """The whole ``leaderboard.md`` (see the module docstring for the layout)."""
    lb = report.leaderboard
    a = lb.attrs
    lines = [f"# Leaderboard — suite `{a.get('suite', '?')}`", "", *_provenance_lines(provenance)]
    lines += [to_markdown(main_table(lb)), "", *[f"- {n}" for n in notes(lb)]]
    mt = metrics_table(lb)
    if mt.shape[1] > 1:
        lines += ["", "## Other metrics", "", to_markdown(mt), "", *[f"- {n}" for n in _other_notes(lb)]]
    ct = costs_table(lb)
    if ct.shape[1] > 1:
        lines += ["", "## Costs", "", to_markdown(ct), "",
                  "- Mean over successful runs. Times in seconds (wall clock, load-dependent; CPU time where "
                  "recorded); memory is peak RSS (CPU) or peak allocated (GPU). Tokens/s: training tokens per "
                  "second of training. For the modes that generate: Generating (share) is the share of the training "
                  "time spent sampling, Generated tok/s the tokens sampled (by the student, the teacher or their "
                  "mixture) per second of sampling."]
    tt = teachers_table(report)
    if not tt.empty:
        lines += ["", "## Per teacher", "",
                  f"{metric_label(a['primary_metric'], a.get('overrides'))} [{a['overall']}] per teacher: mean ± "
                  f"{int(round(100 * a['confidence']))}% t-interval over that teacher's training seeds "
                  "(training-seed variance only), rank under that teacher in parentheses.", "",
                  to_markdown(tt), "", to_markdown(agreement_table(report)), "",
                  "- Rank correlation of the recipes' means between two teachers (students and baseline): "
                  "Kendall τ-b and Spearman ρ with scipy's two-sided p-values; 'Same top': whether both "
                  "teachers rank the same recipe first."]
    td = tuning_display(report)
    if not td.empty:
        lines += ["", "## Hyperparameter search (validation split)", "", to_markdown(td), "",
                  f"- Validation {metric_label(a['primary_metric'], a.get('overrides'))}, mean over the tuning "
                  "runs' seeds (± when several); **bold** = the setting the final (test) runs used; † = best on "
                  "validation but not the one the final runs used."]
    lines += ["", "## Metrics legend", "", to_markdown(legend_table(report))]
    if not report.methods.empty:
        lines += ["", "## Methods (each recipe's method card)", "", to_markdown(report.methods), "",
                  "- Paper and released code (at the commit read) each recipe follows; its deviations from that code "
                  "are listed in the recipe file (`distillbench recipes`)."]
    failures = _failure_lines(lb)
    if failures:
        lines += ["", "## Failed runs (excluded from all statistics)", ""]
        lines += [f"- **{r}**: {_md_escape(t)}" for r, t in failures]
    if left_out:
        lines += ["", "## Records left out", ""]
        lines += [f"- {_md_escape(x)}" for x in left_out]
    if problems:
        lines += ["", "## Problems", ""]
        lines += [f"- {_md_escape(p)}" for p in problems]
    return "\n".join(lines) + "\n"


def render_csv(report: Report | pd.DataFrame) -> str:
    """The numeric leaderboard as CSV (mean, ci_low, ci_high, n, p in separate columns; NaN left empty)."""
    lb = report.leaderboard if isinstance(report, Report) else report
    return lb.to_csv(index=False, lineterminator="\n")


# ---------------------------------------------------------------------------------------------- html
_HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 14px; margin-bottom: 1em; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { background: #f4f4f4; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.reference { color: #666; font-style: italic; background: #fafafa; }
td.baseline { font-weight: 600; }
td.failed { color: #a00; }
td.wrap { white-space: normal; max-width: 40em; }
caption { caption-side: top; text-align: left; font-weight: 600; margin-bottom: .5em; }
.notes, .stamp { color: #555; font-size: 13px; max-width: 70em; }
"""


def _styled_html(table: pd.DataFrame, name: str, kinds: Sequence[str] | None = None,
                 statuses: Sequence[str] | None = None, caption: str | None = None) -> str:
    classes = pd.DataFrame("", index=table.index, columns=table.columns)
    for j, c in enumerate(table.columns):
        base = "" if c in _TEXT_COLS or c.startswith("teacher ") else "num"
        if c in ("Meaning", "Trained on by"):
            base = "wrap"
        for i in range(len(table)):
            cls = [base] if base else []
            if kinds is not None:
                k = kinds[i]
                cls += ["reference"] if k in REFERENCE_KINDS else (["baseline"] if k == "baseline" else [])
            if statuses is not None and statuses[i] == "failed":
                cls.append("failed")
            classes.iat[i, j] = " ".join(cls)
    styler = table.style.hide(axis="index").format(escape="html").set_td_classes(classes).set_uuid(name)
    if caption:
        styler = styler.set_caption(html.escape(caption))
    return styler.to_html(doctype_html=False)


def render_html(
    report: Report,
    problems: Sequence[str] = (),
    *,
    provenance: Mapping[str, Any] | None = None,
    left_out: Sequence[str] | None = None,
) -> str:
    """A standalone HTML page: the same sections as the Markdown, tables by ``Styler.to_html``."""
    lb = report.leaderboard
    a = lb.attrs
    esc = html.escape
    suite = esc(str(a.get("suite", "?")))
    keep = _has_success(lb)
    kinds = _kinds(lb)
    statuses = lb["Status"].astype(str).tolist() if "Status" in lb.columns else None
    kinds_ok = [k for k, ok in zip(kinds, keep) if ok]
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>DistillBench leaderboard — {suite}</title>", f"<style>{_HTML_STYLE}</style>", "</head>",
             "<body>", f"<h1>Leaderboard — suite <code>{suite}</code></h1>"]
    if provenance:
        parts.append('<p class="stamp"><b>Provenance</b> — ' + "; ".join(
            f"{esc(str(k))}: <code>{esc(str(v))}</code>" for k, v in provenance.items()) + "</p>")
    parts.append(_styled_html(main_table(lb), "main", kinds, statuses,
                              f"Primary metric: {a['primary_metric']}; baseline: {a['baseline']}"))
    parts += ['<div class="notes"><ul>', *[f"<li>{esc(n)}</li>" for n in notes(lb)], "</ul></div>"]
    mt = metrics_table(lb)
    if mt.shape[1] > 1:
        parts += ["<h2>Other metrics</h2>", _styled_html(mt, "metrics", kinds_ok),
                  '<div class="notes"><ul>', *[f"<li>{esc(n)}</li>" for n in _other_notes(lb)], "</ul></div>"]
    ct = costs_table(lb)
    if ct.shape[1] > 1:
        parts += ["<h2>Costs</h2>", _styled_html(ct, "costs", kinds_ok)]
    tt = teachers_table(report)
    if not tt.empty:
        parts += ["<h2>Per teacher</h2>", _styled_html(tt, "teachers"), _styled_html(agreement_table(report), "agreement")]
    td = tuning_display(report)
    if not td.empty:
        td = td.map(lambda s: s.replace("**", "") + (" (chosen)" if str(s).startswith("**") else ""))
        parts += ["<h2>Hyperparameter search (validation split)</h2>", _styled_html(td, "tuning")]
    parts += ["<h2>Metrics legend</h2>", _styled_html(legend_table(report), "legend")]
    failures = _failure_lines(lb)
    if failures:
        parts += ["<h2>Failed runs (excluded from all statistics)</h2>", "<ul>",
                  *[f"<li><b>{esc(r)}</b>: {esc(t)}</li>" for r, t in failures], "</ul>"]
    if left_out:
        parts += ["<h2>Records left out</h2>", "<ul>", *[f"<li>{esc(x)}</li>" for x in left_out], "</ul>"]
    if problems:
        parts += ["<h2>Problems</h2>", "<ul>", *[f"<li>{esc(p)}</li>" for p in problems], "</ul>"]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------- latex
_TEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "↓": r"$\downarrow$", "Δ": r"$\Delta$", "—": "--", "…": r"\ldots{}", "≈": r"$\approx$",
    "✓": r"$\checkmark$", "·": r"$\cdot$", "<": r"$<$", ">": r"$>$", "τ": r"$\tau$", "ρ": r"$\rho$",
    "×": r"$\times$", "−": "--", "–": "--", "≤": r"$\leq$", "≥": r"$\geq$", "‖": r"$\|$", "β": r"$\beta$",
    "Σ": r"$\Sigma$", "½": r"$\frac{1}{2}$", "★": r"$\star$", "†": r"$\dagger$",
}


def tex(text: Any) -> str:
    """Escape LaTeX specials and map the few Unicode symbols the tables use to math-mode commands."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def _styled_latex(table: pd.DataFrame, caption: str) -> str:
    spec = "".join("l" if c in _TEXT_COLS else "r" for c in table.columns)
    styler = table.style.hide(axis="index").format(tex).format_index(tex, axis=1)
    return styler.to_latex(column_format=spec, hrules=True, caption=caption, position="t",
                           position_float="centering")


def render_latex(report: Report) -> str:
    """booktabs tables (``\\usepackage{booktabs}``, ``amssymb`` for ✓): the main table and the other
    metrics, by ``Styler.to_latex``."""
    lb = report.leaderboard
    a = lb.attrs
    conf = int(round(100 * a.get("confidence", 0.95)))
    suite = tex(a.get("suite", "?"))
    head = ("% Generated by DistillBench (harness.report). Requires \\usepackage{booktabs} and "
            "\\usepackage{amssymb}.\n")
    main = _styled_latex(main_table(lb), f"DistillBench leaderboard, suite \\texttt{{{suite}}}. "
                         f"{tex(a.get('variance', ''))}")
    parts = [head, main]
    mt = metrics_table(lb)
    if mt.shape[1] > 1:
        parts.append(_styled_latex(mt, f"Other metrics, suite \\texttt{{{suite}}} (mean $\\pm$ {conf}\\% "
                                   "interval; $\\downarrow$ lower is better, $\\cdot$ no better direction)."))
    return "\n".join(parts)


# ------------------------------------------------------------------------------------- README table
def _load_published(results_dir: str | os.PathLike) -> pd.DataFrame:
    d = Path(results_dir)
    csv, prov = d / "leaderboard.csv", d / "provenance.json"
    for p in (csv, prov):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: not found; run publish() into {d} first")
    lb = pd.read_csv(csv)
    settings = json.loads(prov.read_text(encoding="utf-8")).get("report")
    if not isinstance(settings, dict):
        raise ValueError(f"{prov}: no 'report' settings; re-run publish() with this version")
    lb["Rank"] = pd.array([pd.NA if pd.isna(r) else int(r) for r in lb["Rank"]], dtype="Int64")
    lb.attrs.update(settings)
    return lb


def render_markdown_table(
    source: str | os.PathLike | Report | pd.DataFrame,
    *,
    columns: Sequence[str] | None = None,
    include_reference: bool = True,
) -> str:
    """The compact results table (rank, recipe, primary metric, Δ vs baseline, ≈ best, P(best)) as Markdown,
    e.g. for the README.

    ``source``: a published results directory (reads ``leaderboard.csv`` and the ``report`` settings in
    ``provenance.json``), a :class:`Report`, or its ``leaderboard`` frame. ``columns`` picks columns of
    :func:`main_table` (default: Rank, Recipe, the primary metric on every shown set, ``Δ vs <baseline>``,
    ``≈ best``, ``P(best)``).
    """
    if isinstance(source, Report):
        lb = source.leaderboard
    elif isinstance(source, pd.DataFrame):
        lb = source
    else:
        lb = _load_published(source)
    table = main_table(lb)
    if not include_reference:
        table = table.loc[[k not in REFERENCE_KINDS for k in _kinds(lb)]]
    if columns is None:
        a = lb.attrs
        over = a.get("overrides")
        columns = ["Rank", "Recipe", *[score_base(a["primary_metric"], s, over) for s in a["show_sets"]],
                   f"Δ vs {a['baseline']} [{a['overall']}]", TIED, P_BEST]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"unknown column(s) {missing}; available: {list(table.columns)}")
    return to_markdown(table[list(columns)]) + "\n"
