"""``python -m harness.bench_cache scores`` (issue #17): final scores of fkl runs trained on each teacher cache.

End to end on a smoke-sized work directory built in-process with harness.steps (data, tokenizer, teacher, two
initial students and the search's ``chosen.json``), two seeds and two caches: the one-line refusals, the table's
rows and numbers (recomputed here from the evaluation records with numpy/scipy), and that the exact cache's runs
are the pipeline's own fkl runs (same records, metric for metric).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from harness import bench_cache, steps
from harness.data.tokenizer import load_tokenizer
from harness.io import read_json, write_json_atomic
from harness.suite import load_suite

from .test_reliability import suite_dict, write_recipes, write_suite

SEEDS = [1, 2]
LR = 0.005  # the "search's choice" written into chosen.json; the suite's training.learning_rate is set to 0.004


def _row(table: str, label: str) -> list[str]:
    lines = [ln for ln in table.splitlines() if ln.startswith(f"| {label} |")]
    assert len(lines) == 1, f"no single row {label!r} in:\n{table}"
    return [c.strip() for c in lines[0].strip("|").split("|")]


def _ci_cell(values, signed=False, digits=2) -> str:
    """mean ± t_{0.975, n-1} s / sqrt(n), written independently of harness.report.stats."""
    x = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    mean = f"{x.mean():+.{digits}f}" if signed else f"{x.mean():.{digits}f}"
    return f"{mean} ± {half:.{digits}f}"


def test_scores_end_to_end_on_a_smoke_workdir(tmp_path, one_thread, capsys):
    recipes = write_recipes(tmp_path / "recipes", base=("sft", "fkl"))
    d = suite_dict(tmp_path, recipes)
    d.update(seeds=SEEDS, tuning={"learning_rate": [0.002, LR]},
             training={**d["training"], "learning_rate": 0.004, "checkpoint_every": 0})
    config = write_suite(tmp_path / "s.yaml", d)
    suite = load_suite(config)
    steps.prepare_data(suite)
    steps.prepare_tokenizer(suite)
    steps.prepare_teacher(suite, progress=False)
    for seed in SEEDS:
        steps.init_student(suite, seed)
    out = tmp_path / "out" / "scores.md"
    scratch = tmp_path / "scratch"
    args = ["scores", "--config", str(config), "--workdir", str(suite.workdir), "--out", str(out),
            "--caches", "exact:float16,sampled:8", "--seeds", "1,2", "--scratch", str(scratch)]

    # not a finished work directory (no search yet): one line naming what is missing
    capsys.readouterr()
    assert bench_cache.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing" in err and str(suite.chosen_path("fkl")) in err and not out.exists()
    assert bench_cache.main([*args[:-5], "sparse:0", *args[-4:]]) == 2
    assert "'sparse:0' is not a cache setting" in capsys.readouterr().err

    write_json_atomic(suite.chosen_path("fkl"), {"recipe": "fkl", "learning_rate": LR})
    assert bench_cache.main(args) == 0
    table = out.read_text()
    err = capsys.readouterr().err
    assert "[exact float16] fkl seed 2: ok" in err and "[sampled k=8] evaluated 2 seed(s)" in err

    exact, sampled = _row(table, "exact float16"), _row(table, "sampled k=8")
    # bytes per counted token: V float16 log-probabilities; k int32 token ids
    assert exact[1] == str(2 * len(load_tokenizer(suite.tokenizer_dir))) and sampled[1] == str(8 * 4)
    assert exact[3] == "+0.00 ± 0.00"  # the reference against itself
    assert exact[8] == sampled[8] == "2/2"

    def records(slug):
        return {s: read_json(scratch / slug / "records" / "fkl" / f"seed{s}" / "test.json") for s in SEEDS}

    rec_e, rec_s = records("exact-float16"), records("sampled-k8")
    assert all(r["status"] == "ok" for r in [*rec_e.values(), *rec_s.values()])
    rouge_e = [rec_e[s]["metrics"]["rougeL"] for s in SEEDS]
    rouge_s = [rec_s[s]["metrics"]["rougeL"] for s in SEEDS]
    assert exact[2] == _ci_cell(rouge_e) and sampled[2] == _ci_cell(rouge_s)
    assert sampled[3] == _ci_cell([b - a for a, b in zip(rouge_e, rouge_s)], signed=True)  # paired by seed
    assert sampled[5] == _ci_cell([rec_s[s]["metrics"]["kl_to_teacher"] for s in SEEDS], digits=4)
    losses = [read_json(scratch / "sampled-k8" / "runs" / "fkl" / f"seed{s}" / "run.json")["curve"][-1][1]
              for s in SEEDS]
    assert sampled[7] == _ci_cell(losses, digits=4)
    # the runs used the searched learning rate, and the sampled cache is what they trained on
    run = read_json(scratch / "sampled-k8" / "runs" / "fkl" / "seed1" / "run.json")
    assert run["train_config"]["learning_rate"] == LR
    assert read_json(scratch / "sampled-k8" / "teacher_cache.json")["settings"]["mode"] == "sampled"
    res = json.loads(out.with_suffix(".json").read_text())
    assert [s["label"] for s in res["settings"]] == ["exact float16", "sampled k=8"] and res["learning_rate"] == LR

    # the exact cache's runs are the pipeline's own final fkl runs (the suite caches exact float16 too)
    fkl = suite.recipes()["fkl"]
    steps.build_teacher_cache(suite, progress=False)
    steps.distill(suite, fkl, 1, progress=False)
    steps.evaluate(suite, "fkl", [1], progress=False)
    mine = read_json(steps.record_path(suite, "fkl", 1, "test"))
    assert read_json(suite.run_dir("fkl", 1) / "run.json")["train_config"]["learning_rate"] == LR
    assert mine["metrics"] == rec_e[1]["metrics"]


@pytest.mark.parametrize("text, expected", [
    ("exact:float16", ("exact float16", "exact-float16", {"mode": "exact", "dtype": "float16"})),
    ("exact", ("exact float16", "exact-float16", {"mode": "exact", "dtype": "float16"})),
    ("sparse:32", ("sparse top-32", "sparse-top32", {"mode": "sparse", "top_k": 32, "dtype": "float16"})),
    ("sampled:8", ("sampled k=8", "sampled-k8", {"mode": "sampled", "samples": 8, "seed": 0})),
])
def test_cache_settings_parse(text, expected):
    assert bench_cache.parse_setting(text) == expected


@pytest.mark.parametrize("text", ["exact:float8", "sparse", "sparse:0", "sampled:-1", "topk:8"])
def test_bad_cache_settings_are_refused_in_one_line(text):
    with pytest.raises(ValueError, match=f"'{text}' is not a cache setting; accepted: exact"):
        bench_cache.parse_setting(text)
