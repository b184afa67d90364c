"""Issue 7: reliability guarantees, one test (or a few) provoking each failure the harness must survive.

| case                                                  | tests                                                  |
|-------------------------------------------------------|--------------------------------------------------------|
| bad recipe YAML (key, type, objective, import, ...)   | test_bad_recipe_fails_validate, test_bad_recipe_stops_distill_before_training, |
|                                                       | test_validate_cli_typo_fails_in_seconds, test_debug_shows_traceback, test_validate_ok |
| suite naming a missing / empty / bad data file        | test_bad_dataset_fails_validate                        |
| teacher and student with different tokenizers         | test_different_tokenizers_refused, test_distill_refuses_different_tokenizers |
| same tokenizer, padded vocabulary rows                | test_align_vocab_masks_padded_rows, test_train_logs_vocab_alignment_once |
| NaN / inf in the loss or the gradients                | test_non_finite_step_stops_training, test_nan_run_marked_failed_and_never_published |
| SIGKILL mid-run, then re-run                          | test_resume_after_crash_matches_uninterrupted, test_sigkill_resume_matches_uninterrupted |
| a writer dying mid-write; missing runs                | test_atomic_json_survives_sigkill, test_atomic_write_failure_keeps_old_file, |
|                                                       | test_publish_reports_missing_and_unreadable_runs       |
| same seed twice on CPU                                | test_same_seed_twice_identical                         |

The pipeline tests share one tiny workdir (config/smoke.yaml shrunk further: one seed, no lm-eval) built once
in-process; each test that writes runs gets its own copy.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from harness import cli, objectives, steps
from harness.data.tokenizer import load_tokenizer, train_tokenizer
from harness.distill import TrainConfig, TrainingDiverged, train
from harness.fingerprint import Fingerprints
from harness.io import read_json, write_json_atomic
from harness.models import ModelError, align_vocab, build_tiny, check_same_tokenizer
from harness.modes import batch_source
from harness.report import publish
from harness.report.records import find_record_files
from harness.schema import ConfigError
from harness.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
SEED = 1
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ helpers
def suite_dict(root: Path, recipes_dir: Path, **training) -> dict:
    """config/smoke.yaml with tmp paths, one seed, checkpoints every 2 of 10 steps, no lm-eval and no learning-rate
    search (these tests drive single distill runs; the search has its own tests in test_trust.py)."""
    d = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    d.pop("tuning", None)
    d.update(workdir=str(root / "work"), results=str(root / "results"), recipes_dir=str(recipes_dir),
             recipes=None, seeds=[SEED])
    d["training"] = {**d["training"], "checkpoint_every": 2, **training}
    d["evaluation"] = {**d["evaluation"], "seeds": [10], "max_items": 8}
    del d["evaluation"]["lm_eval"]
    return d


def write_suite(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def write_recipes(directory: Path, extra: dict[str, str] | None = None, modules: dict[str, str] | None = None,
                  base: tuple[str, ...] = ("sft", "fkl")) -> Path:
    """A recipes directory: copies of the repository's ``base`` recipes, plus ``extra`` YAML texts and the
    ``modules`` (user objectives) next to them."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in base:
        shutil.copy(REPO / "recipes" / f"{name}.yaml", directory / f"{name}.yaml")
    for name, text in (extra or {}).items():
        (directory / f"{name}.yaml").write_text(text)
    for name, text in (modules or {}).items():
        (directory / f"{name}.py").write_text(text)
    return directory


def unique(prefix: str) -> str:
    """A module name no earlier test imported (user objectives keep a per-module call counter)."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


POISON = '''
import time
import torch
from harness.objectives.divergences import fkl

CALLS = [0]


def poisoned(log_q, log_p, at: int = 3, kind: str = "nan", delay: float = 0.0):
    """fkl, except on the ``at``-th call: a NaN or inf loss, or a finite loss with a NaN gradient."""
    CALLS[0] += 1
    if delay:
        time.sleep(delay)
    out = fkl(log_q, log_p)
    if CALLS[0] == at:
        if kind == "nan":
            out = out * float("nan")
        elif kind == "inf":
            out = out + float("inf")
        elif kind == "grad":  # value + 0, gradient 0 * inf = NaN
            d = log_q - log_q.detach()
            out = out + torch.sqrt((d * d).sum(-1))
    return out
'''


def clone(base: Path, dest: Path, recipes_dir: Path | None = None, **training) -> Path:
    """A private copy of the prepared workdir and a suite file pointing at it; returns the suite file."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base / "work", dest / "work")
    marker = dest / "work" / "teacher" / "teacher.json"
    meta = read_json(marker)
    meta["source"] = str(dest / "work" / "teacher")
    write_json_atomic(marker, meta)
    return write_suite(dest / "suite.yaml", suite_dict(dest, recipes_dir or base / "recipes", **training))


def model_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k}: max |diff| {float((ta[k] - tb[k]).abs().max())}"


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """The console entry point in-process: (exit code, stderr)."""
    capsys.readouterr()
    rc = cli.main(["--no-progress", *argv])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def distillbench() -> list[str]:
    script = Path(sys.executable).parent / "distillbench"
    return [str(script)] if script.exists() else [sys.executable, "-m", "harness.cli"]


# ---- a tiny in-memory training problem (no files) for the loop-level tests
V = 24


def tiny_model(vocab: int = V, seed: int = 0):
    return build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}, vocab, seed=seed, max_positions=16,
                      special_ids={"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1})


def tiny_reference(n: int = 12, bs: int = 4, length: int = 10, vocab: int = V):
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(2, vocab, (n, length), generator=g)

    def reference(i: int) -> dict:
        rows = ids[[(i * bs + k) % n for k in range(bs)]]
        mask = torch.ones_like(rows)
        loss_mask = torch.zeros(rows.shape, dtype=torch.float32)
        loss_mask[:, 3:-1] = 1.0
        labels = torch.where(loss_mask > 0, rows.roll(-1, dims=1), torch.full_like(rows, -100))
        return {"input_ids": rows, "attention_mask": mask, "labels": labels, "loss_mask": loss_mask,
                "prompt_len": torch.full((bs,), 3)}

    return reference


def tiny_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 0.01, "log_every": 1,
                          "device": "cpu", **kw})


def live(teacher):
    return lambda b: teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


# ------------------------------------------------------------------------------------------------ the workdir
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """data → tokenizer → teacher → student init (seed 1) → teacher cache, in-process, once per module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reliability")
    recipes = write_recipes(root / "recipes")
    suite = load_suite(write_suite(root / "suite.yaml", suite_dict(root, recipes)))
    steps.prepare_data(suite)
    steps.prepare_tokenizer(suite)
    steps.prepare_teacher(suite, progress=False)
    steps.init_student(suite, SEED)
    steps.build_teacher_cache(suite, progress=False)
    torch.set_num_threads(before)
    return root


# ============================================================ 1. recipes: fail before training, name file/key/values
BAD_RECIPES = {
    "unknown_key": ("objective: fkl\ntemprature: 2.0\n", ["'temprature'", "accepted keys:", "temperature"]),
    "wrong_type": ("objective: fkl\ntemperature: hot\n", ["'temperature'", "must be number", "'hot'"]),
    "missing_objective": ("description: forgot the objective\n", ["missing required key 'objective'",
                                                                  "a built-in id or 'package.module:function'"]),
    "unknown_objective": ("objective: fkll\n", ["key 'objective'", "unknown objective id 'fkll'", "known ids:",
                                                ", fkl, "]),
    "import_fails": ("objective: no_such_module_xyz:loss\n", ["key 'objective'",
                                                              "cannot import module 'no_such_module_xyz'"]),
    "no_such_function": ("objective: json:no_such_fn\n", ["key 'objective'", "has no function 'no_such_fn'"]),
    "unknown_param": ("objective: skl\nparams: {alhpa: 0.2}\n", ["key 'params'", "alhpa", "accepted: alpha"]),
    "unknown_mode": ("objective: fkl\nmode: online\n", ["'mode'", "'online'",
                                                        "registered modes: adaptive_off_policy, distillm2, minillm, off_policy, on_policy, seq_kd"]),
    "unknown_mode_param": ("objective: fkl\nmode: on_policy\nmode_params: {lambda: 0.5}\n",
                           ["'mode_params.lambda'", "lmbda"]),
    "not_yaml": ("objective: [fkl\n", ["not valid YAML at line 1, column 12", "flow sequence"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_fails_validate(case, tmp_path, capsys):
    text, expected = BAD_RECIPES[case]
    recipes = write_recipes(tmp_path / "recipes", {"bad": text})
    suite_file = write_suite(tmp_path / "suite.yaml", suite_dict(tmp_path, recipes))
    rc, err = run_cli(["validate", "--config", str(suite_file), "--recipes", str(recipes)], capsys)
    assert rc == 2
    line = one_line(err)
    assert str(recipes / "bad.yaml") in line
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"


def test_bad_recipe_stops_distill_before_training(tmp_path, capsys):
    """``distill`` validates the whole plan first: a typo in the recipe it runs never reaches the loop."""
    recipes = write_recipes(tmp_path / "recipes", {"fkl": "objective: fkl\nkd_wieght: 0.5\n"}, base=("sft",))
    suite_file = write_suite(tmp_path / "suite.yaml", suite_dict(tmp_path, recipes))
    rc, err = run_cli(["distill", "--config", str(suite_file), "--recipe", "fkl", "--seed", "1"], capsys)
    assert rc == 2
    line = one_line(err)
    assert str(recipes / "fkl.yaml") in line and "'kd_wieght'" in line and "kd_weight" in line
    assert not (tmp_path / "work").exists()  # nothing ran, nothing was written


def test_debug_shows_traceback(tmp_path):
    recipes = write_recipes(tmp_path / "recipes", {"bad": "objective: fkll\n"})
    suite_file = write_suite(tmp_path / "suite.yaml", suite_dict(tmp_path, recipes))
    with pytest.raises(ConfigError, match="unknown objective id 'fkll'"):
        cli.main(["--debug", "validate", "--config", str(suite_file)])


def test_validate_ok(base, capsys):
    assert cli.main(["validate", "--config", str(base / "suite.yaml"), "--recipes", str(base / "recipes")]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "fkl [fkl, off_policy]" in out


@pytest.mark.slow
def test_validate_cli_typo_fails_in_seconds(tmp_path):
    """The installed ``distillbench validate`` on a one-letter typo: exit 2, one line, no traceback, fast."""
    recipes = write_recipes(tmp_path / "recipes", {"rkl": "objective: rkl\nmode: off_polcy\n"})
    suite_file = write_suite(tmp_path / "suite.yaml", suite_dict(tmp_path, recipes))
    t0 = time.monotonic()
    proc = subprocess.run([*distillbench(), "validate", "--config", str(suite_file), "--recipes", str(recipes)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith("distillbench validate: error: ")
    assert str(recipes / "rkl.yaml") in line and "'off_polcy'" in line and "off_policy" in line
    assert elapsed < 30, f"validate took {elapsed:.1f} s"
    ok = subprocess.run([*distillbench(), "validate", "--config", str(suite_file),
                         "--recipes", str(write_recipes(tmp_path / "good"))],
                        capture_output=True, text=True, env=ENV, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout


# ============================================================ 2. suite data: name the file and the line/field
GOOD_ROW = {"instruction": "Say hi", "input": "", "output": "hi"}


def _data_file(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    path = tmp_path / f"{case}.jsonl"
    if case == "missing_file":
        return path, [str(path), "file not found"]
    if case == "empty_file":
        path.write_text("")
        return path, [str(path), "line 1", "file is empty"]
    if case == "missing_output":
        rows = [GOOD_ROW, {**GOOD_ROW, "instruction": "Say bye", "output": "bye"}, {"instruction": "Say what"}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path, [str(path), "line 3", "field 'output'", "missing"]
    if case == "bad_json":
        path.write_text(json.dumps(GOOD_ROW) + "\n{not json\n")
        return path, [str(path), "line 2", "not valid JSON"]
    raise AssertionError(case)


@pytest.mark.parametrize("where", ["evaluation.sets[1]", "data.train"])
@pytest.mark.parametrize("case", ["missing_file", "empty_file", "missing_output", "bad_json"])
def test_bad_dataset_fails_validate(case, where, tmp_path, capsys):
    path, expected = _data_file(tmp_path, case)
    recipes = write_recipes(tmp_path / "recipes")
    d = suite_dict(tmp_path, recipes)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(GOOD_ROW) + "\n")
    if where == "data.train":
        d["data"] = {"kind": "instruct", "train": {"path": str(path)}, "valid": {"path": str(good)}}
    else:
        d["evaluation"]["sets"] = [{"name": "test", "split": "test"}, {"name": "extra", "path": str(path)}]
    suite_file = write_suite(tmp_path / "suite.yaml", d)
    rc, err = run_cli(["validate", "--config", str(suite_file)], capsys)
    assert rc == 2
    line = one_line(err)
    for part in [*expected, f"key {where!r}", str(suite_file)]:
        assert part in line, f"{part!r} not in {line!r}"


# ============================================================ 3. tokenizers: refuse cross-tokenizer pairs
def _two_tokenizers(tmp_path: Path):
    a = train_tokenizer(["the cat sat on the mat with the other cat"] * 40, 300, tmp_path / "tok_a")
    b = train_tokenizer(["0123 4567 89 zebra quartz 0123 4567 jumping"] * 40, 300, tmp_path / "tok_b")
    return a, b


def test_different_tokenizers_refused(tmp_path):
    a, b = _two_tokenizers(tmp_path)
    assert len(a) > 258 and len(b) > 258  # both learnt merges: not just the shared byte alphabet
    with pytest.raises(ModelError, match="declare it in the suite .student.tokenizer. and use a cross-tokenizer objective .uld") as exc:
        check_same_tokenizer(a, b)
    assert "teacher and student use different tokenizers" in str(exc.value)
    padded = load_tokenizer(tmp_path / "tok_a")
    padded.add_tokens(["<extra_row_0>", "<extra_row_1>"])  # same tokenizer, more rows: accepted
    check_same_tokenizer(padded, a)
    check_same_tokenizer(a, padded)


def test_distill_refuses_different_tokenizers(base, tmp_path, capsys):
    suite_file = clone(base, tmp_path)
    _, other = _two_tokenizers(tmp_path)
    other.save_pretrained(str(tmp_path / "work" / "teacher"))  # the teacher now speaks another tokenizer
    rc, err = run_cli(["distill", "--config", str(suite_file), "--recipe", "fkl", "--seed", "1"], capsys)
    assert rc == 2
    line = one_line(err)
    assert "different tokenizers" in line and "student.tokenizer" in line and "uld" in line
    run_dir = tmp_path / "work" / "runs" / "fkl" / "seed1"
    assert not (run_dir / "run.json").exists() and not (run_dir / "state.pt").exists()


# ============================================================ 4. same tokenizer, padded vocabulary rows
@pytest.mark.parametrize("name", [n for n in objectives.available() if objectives.spec(n).kind not in ("labels", "sequence")])
def test_align_vocab_masks_padded_rows(name):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 10, generator=g), torch.randn(2, 5, 12, generator=g)  # 10 vs 12 rows
    s, t = align_vocab(student, teacher, n_tokens=10)
    assert s.shape == t.shape == (2, 5, 12)
    assert torch.all(s[..., 10:] == float("-inf")) and torch.all(t[..., 10:] == float("-inf"))
    assert torch.equal(s[..., :10], student) and torch.equal(t[..., :10], teacher[..., :10])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    obj = objectives.get(name)
    s = s.clone().requires_grad_()
    padded = obj(s, t, mask)
    unpadded = obj(student, teacher[..., :10], mask)
    assert torch.isfinite(padded)
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-6)
    padded.backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[..., 10:] == 0)


def test_train_logs_vocab_alignment_once(caplog):
    student, teacher = tiny_model(V, seed=1), tiny_model(V + 6, seed=2).eval()  # teacher: 6 padded rows
    with caplog.at_level(logging.INFO, logger="harness.distill"):
        result = train(student, tiny_reference(), tiny_cfg(max_steps=3), seed=SEED, objective=objectives.get("fkl"),
                       teacher_logits=live(teacher), name="fkl/seed1", progress=False)
    aligned = [r.getMessage() for r in caplog.records if "aligned vocabularies" in r.getMessage()]
    assert aligned == ["fkl/seed1: aligned vocabularies: student 24 vs teacher 30 logit columns; the 6 padded "
                       "columns are masked as -inf on both sides"]
    assert result.steps == 3 and all(math.isfinite(loss) for _, loss in result.curve)


# ============================================================ 5. NaN / inf: stop, keep the checkpoint, report failed
@pytest.mark.parametrize("kind, what", [("nan", "non-finite loss (nan)"), ("inf", "non-finite loss (inf)"),
                                        ("grad", "non-finite gradient norm")])
def test_non_finite_step_stops_training(kind, what, tmp_path, monkeypatch):
    module = unique("poison")
    (tmp_path / f"{module}.py").write_text(POISON)
    monkeypatch.syspath_prepend(str(tmp_path))
    objective = objectives.get(f"{module}:poisoned", at=3, kind=kind)
    student, teacher = tiny_model(seed=1), tiny_model(seed=2).eval()
    state = tmp_path / "state.pt"
    with pytest.raises(TrainingDiverged) as exc:
        train(student, tiny_reference(), tiny_cfg(checkpoint_every=1), seed=SEED, objective=objective,
              teacher_logits=live(teacher), state_path=state, name="poisoned/seed1", progress=False)
    msg = str(exc.value)
    assert msg.startswith("poisoned/seed1: ") and what in msg and "at optimizer step 3" in msg
    assert f"the last checkpoint ({state}, step 2) is kept" in msg
    saved = torch.load(state, weights_only=False)
    assert saved["result"].steps == 2  # the last good step
    for k, v in student.state_dict().items():  # the bad step never reached the optimizer
        assert torch.equal(v, saved["model"][k]), k


def test_nan_message_says_no_checkpoint_when_none_exists(tmp_path, monkeypatch):
    """The error must say what is true: with checkpoint_every 0 no checkpoint exists to be 'kept'."""
    module = unique("poison")
    (tmp_path / f"{module}.py").write_text(POISON)
    monkeypatch.syspath_prepend(str(tmp_path))
    objective = objectives.get(f"{module}:poisoned", at=1, kind="nan")
    state = tmp_path / "state.pt"
    with pytest.raises(TrainingDiverged) as exc:
        train(tiny_model(seed=1), tiny_reference(), tiny_cfg(checkpoint_every=0), seed=SEED, objective=objective,
              teacher_logits=live(tiny_model(seed=2).eval()), state_path=state, name="p/seed1", progress=False)
    assert "no checkpoint was written" in str(exc.value) and "kept" not in str(exc.value)
    assert not state.exists()


def test_nan_run_marked_failed_and_never_published(base, tmp_path, capsys, caplog):
    module = unique("poison")
    recipes = write_recipes(tmp_path / "recipes",
                            {"nanfkl": f"objective: {module}:poisoned\nparams: {{at: 5, kind: nan}}\n"},
                            {module: POISON})
    suite_file = clone(base, tmp_path, recipes)
    suite = load_suite(suite_file)
    with caplog.at_level(logging.ERROR):
        rc, _ = run_cli(["distill", "--config", str(suite_file), "--recipe", "nanfkl", "--seed", "1"], capsys)
    assert rc == 0  # a diverged run is a result (failed), not a crash: the pipeline goes on to report it
    run_dir = suite.run_dir("nanfkl", SEED)
    run = read_json(run_dir / "run.json")
    assert run["status"] == "failed"
    assert "nanfkl/seed1" in run["error"] and "at optimizer step 5" in run["error"]
    assert any("nanfkl/seed1" in r.getMessage() and "step 5" in r.getMessage() for r in caplog.records)
    assert torch.load(run_dir / "state.pt", weights_only=False)["result"].steps == 4  # last good checkpoint
    assert not (run_dir / "model").exists()

    assert run_cli(["evaluate", "--config", str(suite_file), "--target", "nanfkl", "--seed", "1"], capsys)[0] == 0
    failed_record = read_json(steps.record_path(suite, "nanfkl", SEED, "test"))
    assert failed_record["status"] == "failed" and failed_record["metrics"] == {}
    fingerprints = Fingerprints(suite)
    for i, recipe in enumerate(("sft", "fkl")):  # two finished runs, written as evaluate writes them
        write_json_atomic(steps.record_path(suite, recipe, SEED, "test"), {
            "suite": suite.name, "recipe": recipe, "seed": SEED, "eval_set": "test", "role": "student",
            "fingerprint": fingerprints.record(recipe, SEED),
            "status": "ok", "error": None, "metrics": {"rougeL": 20.0 + i, "kl_to_teacher": 0.5 - 0.1 * i},
            "costs": {"train_time_s": 1.0 + i}})
    assert run_cli(["leaderboard", "--config", str(suite_file)], capsys)[0] == 0
    board = suite.leaderboard_dir
    md = (board / "leaderboard.md").read_text()
    table = [ln for ln in md.split("\n## ")[0].splitlines() if ln.startswith("|")]  # the main table
    row = [ln for ln in table if "nanfkl" in ln]
    assert len(row) == 1 and "failed" in row[0]
    assert not any(re.search(r"\b(nan|inf)\b", ln, re.IGNORECASE) for ln in table), "\n".join(table)
    every_table = [ln for ln in md.splitlines() if ln.startswith("|")]  # other metrics, costs, method cards too
    assert not any(re.search(r"\b(nan|inf)\b", ln, re.IGNORECASE) for ln in every_table)
    rows = {r["Recipe"]: r for r in csv.DictReader(io.StringIO((board / "leaderboard.csv").read_text()))}
    assert rows["nanfkl"]["Status"] == "failed" and rows["nanfkl"]["Failed runs"] == "1"
    assert all(v == "" for k, v in rows["nanfkl"].items() if k.endswith((" mean", " ci_low", " ci_high")))
    assert not any(v.strip().lower() in ("nan", "inf", "-inf") for r in rows.values() for v in r.values())
    problems = read_json(board / "report_problems.json")
    assert [(r["recipe"], r["seed"]) for r in problems["failed_runs"]] == [("nanfkl", SEED)]
    assert "step 5" in problems["failed_runs"][0]["failure"]
    missing = {(r["recipe"], r["seed"]) for r in problems["missing_runs"]}
    assert ("teacher", 0) in missing and ("init", SEED) in missing  # reported by name, no crash


# ============================================================ 6. kill mid-run, re-run: resume to the same result
MODE_PARAMS = {  # the adaptive mode with a threshold that rises at every check: samples and replays early
    "off_policy": {},
    "on_policy": {"lmbda": 0.5, "max_new_tokens": 4},
    "adaptive_off_policy": {"threshold_step": 0.5, "loss_margin": -1.0, "check_every": 1, "max_new_tokens": 4,
                            "buffer_capacity": 8},
}


@pytest.mark.parametrize("mode", sorted(MODE_PARAMS))
def test_resume_after_crash_matches_uninterrupted(mode, tmp_path):
    """Loop level: an exception after step 3 (checkpoint at 2), then a restart from the checkpoint; the mode's
    own state (batch counts, replay buffer, threshold) is checkpointed with the model, optimizer and RNG."""

    class Crash(Exception):
        pass

    def crash_at(n):
        def on_step(step, _):
            if step == n:
                raise Crash

        return on_step

    def run(state_path, on_step=None):
        student, teacher = tiny_model(seed=1), tiny_model(seed=2).eval()
        source = batch_source(mode, MODE_PARAMS[mode], reference=tiny_reference(), student=student,
                              tokenizer=SimpleNamespace(eos_token_id=0), pad_id=1, seed=SEED, max_steps=7,
                              max_length=16, val_loss=lambda: 1.0)
        result = train(student, source, tiny_cfg(max_steps=7, checkpoint_every=2), seed=SEED,
                       objective=objectives.get("fkl"), teacher_logits=live(teacher), state_path=state_path,
                       name="fkl/seed1", progress=False, on_step=on_step)
        return result, source, student

    ref, ref_source, ref_student = run(tmp_path / "ref.pt")
    with pytest.raises(Crash):
        run(tmp_path / "state.pt", crash_at(3))
    assert torch.load(tmp_path / "state.pt", weights_only=False)["result"].steps == 2
    resumed, source, student = run(tmp_path / "state.pt")
    assert resumed.resumed_from == 2
    assert resumed.curve == ref.curve
    assert (resumed.steps, resumed.tokens, resumed.samples) == (ref.steps, ref.tokens, ref.samples)
    assert source.stats == ref_source.stats  # the mode's counters, buffer and threshold resume too
    if mode != "off_policy":
        assert ref_source.stats["sampled"]["samples"] > 0  # the test did exercise sampling
    for k, v in ref_student.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k


@pytest.mark.slow
def test_sigkill_resume_matches_uninterrupted(base, tmp_path):
    """SIGKILL a ``distillbench distill`` after its first checkpoint, re-run it, compare with a clean run."""
    module = unique("slow")
    recipe = f"objective: {module}:poisoned\nparams: {{at: -1, delay: 0.25}}\n"  # fkl, slowed down, never poisoned
    interrupted = clone(base, tmp_path / "a", write_recipes(tmp_path / "recipes", {"slowfkl": recipe},
                                                            {module: POISON}))
    clean = clone(base, tmp_path / "b", tmp_path / "recipes")
    cmd = [*distillbench(), "--no-progress", "distill", "--config", str(interrupted), "--recipe", "slowfkl",
           "--seed", "1", "--threads", "1"]
    run_dir = tmp_path / "a" / "work" / "runs" / "slowfkl" / "seed1"
    log = (tmp_path / "a" / "first.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # mid-way between two checkpoints
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "a" / "first.log").read_text()
    assert not (run_dir / "run.json").exists(), "the run finished before it could be killed"
    killed_at = torch.load(run_dir / "state.pt", weights_only=False)["result"].steps
    assert 2 <= killed_at < 10

    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr
    resumed = read_json(run_dir / "run.json")
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] == killed_at
    assert not (run_dir / "state.pt").exists()
    assert f"resumed from step {killed_at}" in again.stderr

    clean_suite = load_suite(clean)  # the uninterrupted run, same seed, in another workdir
    steps.distill(clean_suite, clean_suite.recipes()["slowfkl"], SEED, progress=False)
    ref_dir = clean_suite.run_dir("slowfkl", SEED)
    ref = read_json(ref_dir / "run.json")
    assert ref["resumed_from_step"] == 0
    assert resumed["curve"] == ref["curve"]
    assert resumed["mode_stats"] == ref["mode_stats"]
    for key in ("steps", "tokens", "samples"):
        assert resumed["costs"][key] == ref["costs"][key]
    assert_same_weights(run_dir / "model", ref_dir / "model")


# ============================================================ 7. atomic results; aggregation survives gaps
WRITER = """
import sys
from harness.io import write_json_atomic
i = 0
while True:
    write_json_atomic(sys.argv[1], {"i": i, "payload": [i] * 20000})
    i += 1
"""


@pytest.mark.slow
def test_atomic_json_survives_sigkill(tmp_path):
    """A writer rewriting a large record in a loop, read concurrently and then SIGKILLed: never a partial read."""
    target = tmp_path / "records" / "run.json"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=ENV)
    reads = 0
    try:
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        stop = time.monotonic() + 1.5
        while time.monotonic() < stop:
            rec = read_json(target)  # raises JSONReadError on a partial file
            assert rec["payload"] == [rec["i"]] * 20000
            reads += 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    rec = read_json(target)
    assert rec["payload"] == [rec["i"]] * 20000 and rec["i"] > 0 and reads > 0
    assert find_record_files(target.parent) == [target]  # a temporary left by the kill is never read as a record


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    write_json_atomic(target, {"status": "ok", "v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"status": "ok", "v": object()})  # fails while serialising
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        write_json_atomic(target, {"status": "ok", "v": 2})  # fails at the very last moment
    monkeypatch.undo()
    assert read_json(target) == {"status": "ok", "v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no temporary left behind


def test_publish_reports_missing_and_unreadable_runs(tmp_path):
    records = tmp_path / "records"

    def record(recipe, seed, rouge):
        return {"suite": "s", "recipe": recipe, "seed": seed, "eval_set": "test", "role": "student",
                "status": "ok", "error": None, "metrics": {"rougeL": rouge}, "costs": {"train_time_s": 1.0}}

    for recipe, seed, rouge in (("sft", 1, 20.0), ("sft", 2, 21.0), ("fkl", 1, 22.0)):
        write_json_atomic(records / f"{recipe}-{seed}.json", record(recipe, seed, rouge))
    text = json.dumps(record("rkl", 1, 30.0))
    (records / "rkl-1.json").write_text(text[: len(text) // 2])  # a non-atomic writer died here
    expected = [(r, s, "test") for r in ("sft", "fkl", "rkl") for s in (1, 2)]
    out = publish(sorted(records.glob("*.json")), tmp_path / "results", baseline="sft", expected=expected)
    problems = read_json(out["problems"])
    assert any("rkl-1.json" in p and "invalid JSON" in p for p in problems["unreadable_records"])
    assert {(r["recipe"], r["seed"]) for r in problems["missing_runs"]} == {("fkl", 2), ("rkl", 1), ("rkl", 2)}
    md = out["leaderboard_md"].read_text()
    assert "missing run: recipe 'rkl', seed 2, set 'test'" in md and "rkl-1.json" in md
    assert "30.0" not in md  # nothing of the partial record leaks into the table


# ============================================================ 8. same seed twice on CPU: identical
@pytest.mark.slow
def test_same_seed_twice_identical(base, tmp_path):
    results = []
    for name in ("one", "two"):
        suite = load_suite(clone(base, tmp_path / name))
        steps.distill(suite, suite.recipes()["fkl"], SEED, progress=False)
        steps.evaluate(suite, "fkl", SEED, progress=False)
        results.append((suite, read_json(suite.run_dir("fkl", SEED) / "run.json"),
                        read_json(steps.record_path(suite, "fkl", SEED, "test"))))
    (s1, run1, rec1), (s2, run2, rec2) = results
    assert run1["status"] == run2["status"] == "ok"
    assert run1["curve"] == run2["curve"]
    assert_same_weights(s1.run_dir("fkl", SEED) / "model", s2.run_dir("fkl", SEED) / "model")
    assert rec1["metrics"] == rec2["metrics"] and rec1["metrics"]
    assert rec1["details"] == rec2["details"]
