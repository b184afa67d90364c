"""Results you can trust (issue "Results you can trust"): provenance, guarded resume, only the plan's records,
nothing trained is never ok, every value validated before work, bad files and faults.

Each test here failed on the code before fingerprints and the run/publish split.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from harness import cli, objectives
from harness.distill import NothingTrained, TrainConfig, train
from harness.fingerprint import Fingerprints
from harness.io import write_json_atomic
from harness.publishing import compare_scores, swap_in, update_readme
from harness.recipes import load_recipe
from harness.schema import ConfigError
from harness.suite import load_suite

from .test_reliability import (REPO, live, one_line, run_cli, suite_dict, tiny_cfg, tiny_model, tiny_reference,
                               write_recipes, write_suite)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ a checkpoint resumes only its run
def test_checkpoint_of_other_inputs_is_discarded_not_resumed(tmp_path, caplog):
    """A state.pt written at lr 1e4 must not be resumed by a run at lr 0.01 (the fingerprints differ)."""
    state = tmp_path / "state.pt"
    fkl = objectives.get("fkl")
    teacher = tiny_model(seed=2).eval()

    def stop_after(n):
        def on_step(step, _):
            if step == n:
                raise KeyboardInterrupt
        return on_step

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(seed=1), tiny_reference(), tiny_cfg(checkpoint_every=1, learning_rate=1e4), seed=1,
              objective=fkl, teacher_logits=live(teacher), state_path=state, fingerprint="lr1e4",
              on_step=stop_after(2), progress=False)
    assert torch.load(state, weights_only=False)["fingerprint"] == "lr1e4"
    fresh = train(tiny_model(seed=1), tiny_reference(), tiny_cfg(), seed=1, objective=fkl,
                  teacher_logits=live(teacher), state_path=state, fingerprint="lr0.01", progress=False)
    clean = train(tiny_model(seed=1), tiny_reference(), tiny_cfg(), seed=1, objective=fkl,
                  teacher_logits=live(teacher), progress=False)
    assert fresh.resumed_from == 0 and fresh.curve == clean.curve
    assert any("discarding checkpoint" in r.getMessage() for r in caplog.records)


def test_checkpoint_of_same_inputs_is_resumed(tmp_path):
    state = tmp_path / "state.pt"
    fkl, teacher = objectives.get("fkl"), tiny_model(seed=2).eval()

    def stop(step, _):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(seed=1), tiny_reference(), tiny_cfg(checkpoint_every=1), seed=1, objective=fkl,
              teacher_logits=live(teacher), state_path=state, fingerprint="same", on_step=stop, progress=False)
    resumed = train(tiny_model(seed=1), tiny_reference(), tiny_cfg(checkpoint_every=1), seed=1, objective=fkl,
                    teacher_logits=live(teacher), state_path=state, fingerprint="same", progress=False)
    assert resumed.resumed_from == 2  # the checkpoint of step 2; step 3 was interrupted before its own


# ------------------------------------------------------------------------------ fingerprints follow every input
@pytest.fixture()
def plan(tmp_path):
    recipes = write_recipes(tmp_path / "recipes", base=("sft", "fkl", "srkl"))
    return tmp_path, recipes


def _fp(tmp_path, recipes, **changes):
    d = suite_dict(tmp_path, recipes)
    d.pop("tuning", None)  # without a search: a run's fingerprint is its own inputs only
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            d[section] = {**d[section], sub: value}
        else:
            d[key] = value
    suite = load_suite(write_suite(tmp_path / f"suite-{len(changes)}-{abs(hash(str(changes)))}.yaml", d))
    return Fingerprints(suite)


def test_run_fingerprint_changes_with_every_input(plan):
    tmp_path, recipes = plan
    base = _fp(tmp_path, recipes)
    assert base.run("fkl", 1) == _fp(tmp_path, recipes).run("fkl", 1)  # deterministic
    assert base.run("fkl", 1) != base.run("fkl", 2)
    assert base.run("fkl", 1) != base.run("srkl", 1)
    for change in ({"training__learning_rate": 0.5}, {"training__max_steps": 11}, {"teacher__n_embd": 48},
                   {"student__n_layer": 2}, {"data__seed": 3}, {"tokenizer__vocab_size": 300}):
        assert _fp(tmp_path, recipes, **change).run("fkl", 1) != base.run("fkl", 1), change
    # neutral keys (the recipe list, the description) do not change a run
    assert _fp(tmp_path, recipes, description="other").run("fkl", 1) == base.run("fkl", 1)
    # evaluation settings change records, not runs
    other_eval = _fp(tmp_path, recipes, evaluation__seeds=[10, 20])
    assert other_eval.run("fkl", 1) == base.run("fkl", 1) and other_eval.record("fkl", 1) != base.record("fkl", 1)
    # editing the recipe file changes its runs
    (recipes / "fkl.yaml").write_text((recipes / "fkl.yaml").read_text().replace("temperature: 1.0", "temperature: 4.0"))
    assert _fp(tmp_path, recipes).run("fkl", 1) != base.run("fkl", 1)


def test_user_objective_module_is_an_input_of_its_runs(tmp_path):
    module = f"userloss_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{module}.py").write_text("def d(log_q, log_p):\n    return ((log_p.exp() - log_q.exp()) ** 2).sum(-1)\n")
    (tmp_path / "mine.yaml").write_text(f"objective: {module}:d\n")
    recipe = load_recipe(tmp_path / "mine.yaml")
    assert str((tmp_path / f"{module}.py").resolve()) in recipe.source_files()
    from harness.fingerprint import source_digest

    before = source_digest(recipe.source_files())
    (tmp_path / f"{module}.py").write_text("def d(log_q, log_p):\n    return (log_p.exp() - log_q.exp()).abs().sum(-1)\n")
    assert source_digest(recipe.source_files()) != before
    # and the Snakefile lists it as an input of the distill rule
    assert "sources=lambda wc: RECIPES[wc.recipe].source_files()" in (REPO / "Snakefile").read_text()


# ------------------------------------------------------------------------------ the leaderboard takes only the plan
def test_leaderboard_selects_only_records_of_the_current_plan(plan):
    from harness import steps

    tmp_path, recipes = plan
    d = suite_dict(tmp_path, recipes)
    d.pop("tuning", None)
    d["seeds"] = [1, 2]
    suite = load_suite(write_suite(tmp_path / "two.yaml", d))
    fps = Fingerprints(suite)
    for (target, seed), fp in fps.expected_records().items():
        write_json_atomic(steps.record_path(suite, target, seed, "test"), {"fingerprint": fp})
    chosen, left_out = steps.select_records(suite)
    assert len(chosen) == len(fps.expected_records()) and not left_out
    # seeds: [1] — seed 2's records exist on disk but are not in the plan, so never read
    d["seeds"] = [1]
    d["recipes"] = ["sft", "fkl"]
    narrower = load_suite(write_suite(tmp_path / "one.yaml", d))
    chosen, left_out = steps.select_records(narrower)
    assert {p.parts[-3] for p in chosen} == {"sft", "fkl", "teacher", "init"}
    assert all(p.parts[-2] in ("seed1", "seed0") for p in chosen) and not left_out
    # an edited configuration: the old records are stale and listed, not averaged in
    d["training"] = {**d["training"], "learning_rate": 0.123}
    edited = load_suite(write_suite(tmp_path / "edited.yaml", d))
    chosen, left_out = steps.select_records(edited)  # the teacher is trained with the suite's training section too
    assert chosen == [] and len(left_out) == 4 and all("stale, made by other inputs" in x for x in left_out)


# ------------------------------------------------------------------------------ nothing trained is never ok
def test_zero_trained_tokens_fails_with_the_reason():
    ref = tiny_reference()

    def no_response(i):
        b = ref(i)
        b["loss_mask"] = torch.zeros_like(b["loss_mask"])
        b["labels"] = torch.full_like(b["labels"], -100)
        return b

    with pytest.raises(NothingTrained, match="no response token entered the loss.*max_length"):
        train(tiny_model(seed=1), no_response, tiny_cfg(), seed=1, objective=objectives.get("fkl"),
              teacher_logits=live(tiny_model(seed=2).eval()), progress=False)


def test_a_loss_that_never_moves_fails():
    def constant(log_q, log_p):
        return (log_q * 0.0).sum(-1)

    obj = objectives.Objective(objectives.ObjectiveSpec("const", constant), {})
    with pytest.raises(NothingTrained, match="stayed at 0.0"):
        train(tiny_model(seed=1), tiny_reference(), tiny_cfg(), seed=1, objective=obj,
              teacher_logits=live(tiny_model(seed=2).eval()), progress=False)


# ------------------------------------------------------------------------------ every value validated up front
SUITE_CASES = [
    ({"training__max_length": 20, "training__max_prompt_tokens": 40}, "'training.max_prompt_tokens' (40) must be below"),
    ({"training__learning_rate": -0.1}, "'training.learning_rate' must be > 0"),
    ({"training__per_device_train_batch_size": 0}, "'training.per_device_train_batch_size' must be >= 1"),
    ({"training__max_steps": 0}, "'training.max_steps' must be >= 1"),
    ({"training__max_new_tokens": 0}, "'training.max_new_tokens' must be >= 1"),
    ({"training__learning_rate": float("nan")}, "must be a finite number"),
    ({"training__learning_rate": "0.01"}, "'training.learning_rate' must be number, got str"),
    ({"teacher_cache": {"mode": "exact", "topk": 3}}, "unknown key 'teacher_cache.topk'"),
    ({"teacher_cache": {"mode": "approx"}}, "'teacher_cache.mode' has value 'approx'; accepted values: exact, sparse"),
    ({"evaluation__seeds": []}, "'evaluation.seeds' must not be empty"),
    ({"evaluation__sets": [{"name": "test", "split": "test"}, {"name": "test", "split": "valid"}]},
     "'test' is used twice"),
    ({"evaluation__lm_eval": {"tasks": [{"name": "t", "set": "nosuchset", "kind": "mc"}]}},
     "names 'nosuchset', which is not an evaluation set"),
    ({"seeds": [1, 1]}, "lists a seed twice"),
    ({"recipes": [""]}, "key 'recipes'"),
]


@pytest.mark.parametrize("changes, needle", SUITE_CASES, ids=[c[1][:40] for c in SUITE_CASES])
def test_bad_suite_values_fail_validate_in_one_line(tmp_path, capsys, changes, needle):
    recipes = write_recipes(tmp_path / "recipes")
    d = suite_dict(tmp_path, recipes)
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            d[section] = {**d[section], sub: value}
        else:
            d[key] = value
    suite_file = write_suite(tmp_path / "suite.yaml", d)
    rc, err = run_cli(["validate", "--config", str(suite_file)], capsys)
    line = one_line(err)
    assert rc == 2 and str(suite_file) in line and needle in line, line


RECIPE_CASES = [
    ("objective: gkdjsd\n", "unknown objective id"),
    ("objective: jsd\nmode: on_policy\nmode_params: {lmbda: 2.0}\n", "'mode_params.lmbda' must lie in [0, 1]"),
    ("objective: fkl\ntemperature: .nan\n", "'temperature' must be a finite number"),
    ("objective: fkl\ntemperature: .inf\n", "'temperature' must be a finite number"),
    ("objective: fkl\ntemperature: 0\n", "'temperature' must be > 0"),
    ("objective: fkl\nkd_weight: 1.5\n", "'kd_weight' must lie in [0, 1]"),
    ("name: a/b\nobjective: fkl\n", "recipe name 'a/b'"),
    ("name: ''\nobjective: fkl\n", "recipe name ''"),
    ("objective: fkl\nloss: [{objective: ce}]\n", "cannot be combined with 'loss'"),
    ("loss: []\n", "'loss' must not be empty"),
    ("loss: [{objective: ce, weight: x}]\n", "'loss[0].weight' must be number"),
    ("loss: [{objective: fkl, temperature: -1}]\n", "'loss[0].temperature' must be > 0"),
    ("objective: fkl\ndropout: off\n", "'dropout'"),
]


@pytest.mark.parametrize("text, needle", RECIPE_CASES, ids=[c[1][:40] for c in RECIPE_CASES])
def test_bad_recipe_values_fail_in_one_line(tmp_path, capsys, text, needle):
    recipes = write_recipes(tmp_path / "recipes", {"bad": text})
    suite_file = write_suite(tmp_path / "suite.yaml", suite_dict(tmp_path, recipes))
    rc, err = run_cli(["validate", "--config", str(suite_file)], capsys)
    line = one_line(err)
    assert rc == 2 and "bad.yaml" in line and needle in line, line


def test_non_utf8_recipe_is_one_line(tmp_path, capsys):
    recipes = write_recipes(tmp_path / "recipes")
    (recipes / "latin.yaml").write_bytes("description: caf\xe9\nobjective: fkl\n".encode("latin-1"))
    suite_file = write_suite(tmp_path / "suite.yaml", suite_dict(tmp_path, recipes))
    rc, err = run_cli(["validate", "--config", str(suite_file)], capsys)
    line = one_line(err)
    assert rc == 2 and "latin.yaml: not UTF-8 text (byte 0xe9 at line 1)" in line


def test_loss_terms_recipe_trains_the_weighted_sum(tmp_path):
    """A `loss:` recipe is Σ w_k D_k: its value equals the hand-made sum of the built-in objectives."""
    path = tmp_path / "mix.yaml"
    path.write_text(textwrap.dedent("""
        loss:
          - {objective: ce, weight: 1.0}
          - {objective: fkl, weight: 0.1, temperature: 2.0}
          - {objective: tvd, weight: 0.5}
    """))
    loss = load_recipe(path).build_loss()
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 5, 11, generator=g, dtype=torch.float64), torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    total, parts = loss(zs, zt, mask, labels=labels, normalizer=float(mask.sum()))
    # independent formula
    n = mask.sum()
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ce = -(ls.gather(-1, labels[..., None]).squeeze(-1) * mask).sum() / n
    ls2, lt2 = torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1)
    fkl = ((lt2.exp() * (lt2 - ls2)).sum(-1) * mask).sum() / n
    tvd = ((0.5 * (lt.exp() - ls.exp()).abs().sum(-1)) * mask).sum() / n
    assert float(total) == pytest.approx(float(ce + 0.1 * fkl + 0.5 * tvd), rel=1e-12)
    assert parts == pytest.approx({"ce": float(ce), "fkl": float(0.1 * fkl), "tvd": float(0.5 * tvd)}, rel=1e-12)


# ------------------------------------------------------------------------------ publishing: safe, deliberate
def test_interrupted_swap_keeps_the_previous_leaderboard(tmp_path, monkeypatch):
    dest = tmp_path / "results" / "tiny"
    dest.mkdir(parents=True)
    (dest / "leaderboard.md").write_text("old")
    staging = tmp_path / "results" / ".tiny.staging"
    staging.mkdir()
    (staging / "leaderboard.md").write_text("new")
    real_replace = os.replace
    calls = []

    def failing_replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two renames
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        swap_in(staging, dest)
    monkeypatch.setattr(os, "replace", real_replace)
    old = tmp_path / "results" / ".tiny.old"
    assert (old / "leaderboard.md").read_text() == "old" and (staging / "leaderboard.md").read_text() == "new"
    swap_in(staging, dest)
    assert (dest / "leaderboard.md").read_text() == "new" and not old.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_results_directory_fails_before_writing(tmp_path, capsys):
    from harness.publishing import check_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            check_writable(ro / "tiny")
    finally:
        ro.chmod(0o755)


def test_check_writable_uses_access_rights(tmp_path, monkeypatch):
    """(Also as root:) the check asks os.access before anything is written."""
    from harness.publishing import check_writable

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"not writable .* read-only"):
        check_writable(tmp_path / "results" / "tiny")


def test_readme_table_is_generated_between_markers(tmp_path):
    lb = tmp_path / "leaderboard.md"
    lb.write_text("# Leaderboard\n\n> stamp: code abc\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- notes\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:tiny:start -->\ntyped by hand\n<!-- results:tiny:end -->\noutro\n")
    assert update_readme("tiny", lb, readme)
    text = readme.read_text()
    assert "typed by hand" not in text and "| 1 | 2 |" in text and "> stamp: code abc" in text
    assert text.startswith("intro\n") and text.endswith("outro\n")


def test_compare_scores_is_exact(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("suite,recipe,seed,metric,value\ns,fkl,1,rougeL,20.5\ns,sft,1,rougeL,\n")
    b.write_text("suite,recipe,seed,metric,value\ns,fkl,1,rougeL,20.5\ns,sft,1,rougeL,\n")
    assert compare_scores(a, b) == []
    b.write_text("suite,recipe,seed,metric,value\ns,fkl,1,rougeL,20.500000000000004\ns,sft,1,rougeL,\n")
    assert compare_scores(a, b) == ["recipe=fkl, seed=1, metric=rougeL: published 20.5, this run 20.500000000000004"]


# ------------------------------------------------------------------------------ the Snakefile and its jobs
def test_second_invocation_never_rewrites_a_running_config(tmp_path):
    """The resolved suite file is named by its content: another configuration gets another file."""
    text = (REPO / "Snakefile").read_text()
    assert 'SUITE_FILE = Path(config.get("workdir") or f"work/{config[\'suite\']}") / "config" / f"suite-{digest(' in text
    assert "if not SUITE_FILE.exists():" in text
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    recipes = write_recipes(tmp_path / "recipes")
    a = write_suite(tmp_path / "a.yaml", suite_dict(tmp_path, recipes))
    d = suite_dict(tmp_path, recipes)
    d["training"] = {**d["training"], "learning_rate": 10000.0}
    b = write_suite(tmp_path / "b.yaml", d)
    snake = [sys.executable, "-m", "snakemake", "-n", "--quiet", "--snakefile", str(REPO / "Snakefile"),
             "--directory", str(REPO)]
    for cfg in (a, b):
        proc = subprocess.run([*snake, "--configfile", str(cfg)], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted((tmp_path / "work" / "config").glob("suite-*.yaml"))
    assert len(files) == 2
    rates = sorted(yaml.safe_load(f.read_text())["training"]["learning_rate"] for f in files)
    assert rates == [0.005, 10000.0]


def test_bad_value_stops_snakemake_in_one_line_naming_the_users_file(tmp_path):
    recipes = write_recipes(tmp_path / "recipes")
    d = suite_dict(tmp_path, recipes)
    d["training"] = {**d["training"], "learning_rate": -1.0}
    cfg = write_suite(tmp_path / "mine.yaml", d)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(REPO), "--configfile", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if "distillbench" in ln]
    assert err and str(cfg) in err[0] and "'training.learning_rate' must be > 0" in err[0]
    assert "Traceback" not in proc.stderr


def test_a_step_dies_with_its_job_shell(tmp_path):
    """Killing the shell that runs a step (Snakemake's job) must not leave the Python process running."""
    pidfile = tmp_path / "pid"
    code = (f"import os, time; from harness.cli import _die_with_parent; _die_with_parent(); "
            f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    shell = subprocess.Popen(["bash", "-c", f"{sys.executable} -c \"{code}\"; true"], cwd=REPO)
    deadline = time.time() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text())
    shell.send_signal(signal.SIGKILL)
    shell.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the step outlived its job's shell")
    cli_line = next(ln for ln in (REPO / "Snakefile").read_text().splitlines() if ln.startswith("CLI = "))
    assert "exec {sys.executable} -m harness.cli" in cli_line  # exec: the job's process is the step (or its client)


def test_reference_page_is_generated_from_the_schemas():
    """docs/reference.md lists every key with type, default and meaning, and is what the generator writes."""
    from harness.docs import reference

    assert (REPO / "docs" / "reference.md").read_text() == reference(), "run: python -m harness.docs > docs/reference.md"
    text = reference()
    for key in ("`training.learning_rate`", "`loss[].weight`", "`reference.deviations`", "`teacher_cache.mode`",
                "`evaluation.lm_eval.tasks[].set`", "`dropout`"):
        assert key in text, key


def test_timings_table_sums_benchmarks_per_rule(tmp_path):
    from harness.timings import timings_table

    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, s, cpu, rss in (("distill_fkl_1", 8.0, 4.0, 400), ("distill_sft_1", 6.0, 3.0, 450), ("teacher", 5.5, 5.0, 300)):
        (tmp_path / f"{name}.tsv").write_text(head + f"{s}\t0\t{rss}\t0\t0\t0\t0\t0\t0\t{cpu}\n")
    table = timings_table(tmp_path)
    assert "| distill | 2 | 14.0 | 7.0 | 7.0 | 450 |" in table and "| teacher | 1 | 5.5 | 5.5 | 5.0 | 300 |" in table
    assert "| **all jobs** | 3 | 19.5 | | 12.0 | |" in table


def test_schedule_from_job_intervals():
    """Span, cores, the work bound and idle core-seconds of hand-made intervals (computed here by hand)."""
    from harness.timings import schedule

    # two cores: a teacher 0-10 beside inits 0-4 and 4-10; then a lone job 10-13 (3 idle core-s), a gap 13-14 (2),
    # then two jobs 14-20; a 0.2 s overlap of three jobs (a benchmark file written after the next job started)
    jobs = [("teacher", 0.0, 10.0), ("student_init", 0.0, 4.0), ("student_init", 4.0, 10.2), ("tune", 10.0, 13.0),
            ("distill", 14.0, 20.0), ("distill", 14.0, 20.0)]
    s = schedule([(r, a + 1000.0, b + 1000.0) for r, a, b in jobs])
    assert s["cores"] == 2 and s["jobs"] == 6 and s["span"] == 20.0
    assert s["work"] == pytest.approx(10 + 4 + 6.2 + 3 + 12) and s["bound"] == pytest.approx(35.2 / 2)
    assert s["idle"] == pytest.approx(0.0 + (13 - 10.2) * 1 + 1 * 2) and s["idle_teacher"] == 0.0
    assert s["teacher_s"] == 10.0 and s["rules"]["tune"] == (10.0, 13.0)
    assert s["rules"]["student_init"] == pytest.approx((0.0, 10.2))
    lone = schedule([("teacher", 0.0, 10.0), ("tune", 10.0, 12.0), ("tune", 11.0, 12.0)])
    assert lone["cores"] == 2 and lone["idle_teacher"] == 10.0 and lone["idle"] == pytest.approx(11.0)


def test_schedule_segments_sweep_equals_counting_at_each_midpoint():
    """The sweep over starts and ends gives, for every piece between two consecutive times, the jobs a direct
    count at the piece's midpoint finds (random intervals with shared end points)."""
    import random

    from harness.timings import _segments

    rng = random.Random(3)
    for _ in range(50):
        jobs = []
        for _ in range(rng.randint(1, 12)):
            a = float(rng.randint(0, 20))
            jobs.append((rng.choice(["teacher", "distill", "tune"]), a, a + rng.randint(1, 8)))
        cuts = sorted({t for _, a, b in jobs for t in (a, b)})
        expected = []
        for a, b in zip(cuts, cuts[1:]):
            running = [rule for rule, s, e in jobs if s <= (a + b) / 2 < e]
            expected.append((a, b, len(running), "teacher" in running))
        assert _segments(jobs) == expected


def test_timings_table_says_when_jobs_ran_from_file_times(tmp_path):
    import os

    from harness.timings import job_intervals, timings_table

    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, s, end in (("teacher", 30.0, 1030.0), ("student_init_1", 10.0, 1010.0), ("distill_fkl", 20.0, 1050.0)):
        path = tmp_path / f"{name}.tsv"
        path.write_text(head + f"{s}\t0\t1\t0\t0\t0\t0\t0\t0\t{s}\n")
        os.utime(path, (end, end))
    assert sorted(job_intervals(tmp_path)) == [("distill", 1030.0, 1050.0), ("student_init", 1000.0, 1010.0),
                                               ("teacher", 1000.0, 1030.0)]
    table = timings_table(tmp_path)
    assert "3 jobs in 50 s on up to 2 cores at once" in table and "at least 30.0 s" in table
    assert "40.0 core-seconds had no job to run, 20.0 of them while a teacher trained (30 s)" in table
    assert "| teacher | 0.0 | 30.0 |" in table and "| distill | 30.0 | 50.0 |" in table


def test_every_shipped_recipe_has_a_method_card(capsys):
    """Every row is the method it names: each recipe states its paper, its code at a commit, and its deviations."""
    from harness.recipes import discover

    for name, r in discover(REPO / "recipes").items():
        ref = r.reference
        assert ref.get("paper"), name
        assert ref.get("code") and ("@" in ref["code"] or "none" in ref["code"].lower()), name
        assert isinstance(ref.get("deviations"), list), name
    assert cli.main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "sinkhorn: " in out and "2018cx/SinKD@" in out and "sinkhorn_only: " in out and "ablation" in out.lower()


def test_leaderboard_lists_the_method_cards():
    import pandas as pd

    from harness.report.leaderboard import methods_table

    cards = methods_table({"fkl": {"loss": [{"objective": "fkl", "weight": 1.0}], "mode": "off_policy",
                                   "reference": {"paper": "Hinton", "code": "none released", "deviations": []}},
                           "x": None})
    assert cards.to_dict("records") == [{"Recipe": "fkl", "Loss": "1·fkl", "Mode": "off_policy", "Paper": "Hinton",
                                         "Code": "none released", "Deviations": "none"}]
    assert isinstance(cards, pd.DataFrame)


def test_report_to_tensorboard_writes_live_scalars(tmp_path, monkeypatch):
    """training.report_to: tensorboard logs loss, each term and the learning rate at every logged step."""
    from harness import distill

    logged = []

    class Writer:
        def add_scalar(self, tag, value, step):
            logged.append((tag, step, value))

        def flush(self):
            pass

        def close(self):
            logged.append(("closed", None, None))

    seen = {}

    def tracker(report_to, log_dir, is_main):
        seen.update(report_to=report_to, log_dir=log_dir)
        return Writer()

    monkeypatch.setattr(distill, "_tracker", tracker)
    train(tiny_model(seed=1), tiny_reference(), tiny_cfg(max_steps=3, report_to="tensorboard"), seed=1,
          objective=objectives.get("fkl"), kd_weight=0.5, teacher_logits=live(tiny_model(seed=2).eval()),
          state_path=tmp_path / "state.pt", progress=False)
    assert seen == {"report_to": "tensorboard", "log_dir": tmp_path / "tensorboard"}
    tags = {t for t, _, _ in logged}
    assert {"train/loss", "train/loss_ce", "train/loss_fkl", "train/learning_rate", "closed"} <= tags
    assert [s for t, s, _ in logged if t == "train/loss"] == [1, 2, 3]


def test_report_to_needs_tensorboard_installed_or_says_how():
    from harness.distill import _tracker

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install -e '\.\[tensorboard\]'"):
            _tracker("tensorboard", Path("/nonexistent"), True)
    assert _tracker("none", Path("/x"), True) is None



# ------------------------------------------------------------------------------ the equal hyperparameter search
def test_search_fingerprints_tie_final_runs_to_the_search(plan):
    """With a search, a final run's fingerprint stands on the search's records: a new grid re-runs the search and
    every final run; without one, nothing of the kind."""
    tmp_path, recipes = plan
    d = suite_dict(tmp_path, recipes)
    d["tuning"] = {"learning_rate": [0.001, 0.01], "seeds": [1]}
    a = Fingerprints(load_suite(write_suite(tmp_path / "a.yaml", d)))
    d["tuning"] = {"learning_rate": [0.001, 0.02], "seeds": [1]}
    b = Fingerprints(load_suite(write_suite(tmp_path / "b.yaml", d)))
    assert set(a.tuning_records("fkl")) == {(0, 1), (1, 1)}
    assert a.tuning_records("fkl")[(0, 1)] == b.tuning_records("fkl")[(0, 1)]  # the same grid value
    assert a.tuning_records("fkl")[(1, 1)] != b.tuning_records("fkl")[(1, 1)]
    assert a.run("fkl", 2) != b.run("fkl", 2) and a.plan_digest() != b.plan_digest()
    assert a.run("fkl", 1, lr_index=0) != a.run("fkl", 1, lr_index=1)


@pytest.mark.parametrize("tuning, needle", [
    ({"learning_rate": [0.01]}, "'tuning.learning_rate' needs at least 2 entries"),
    ({"learning_rate": [0.01, -0.1]}, "'tuning.learning_rate[1]' must be > 0"),
    ({"learning_rate": [0.01, 0.01]}, "lists a value twice"),
    ({"learning_rate": [0.01, 0.1], "set": {"name": "test", "split": "test"}}, "never on a set the leaderboard reports"),
    ({"learning_rate": [0.01, 0.1], "batch": 3}, "unknown key 'tuning.batch'"),
])
def test_bad_search_fails_validate(tmp_path, capsys, tuning, needle):
    recipes = write_recipes(tmp_path / "recipes")
    d = suite_dict(tmp_path, recipes)
    d["tuning"] = tuning
    rc, err = run_cli(["validate", "--config", str(write_suite(tmp_path / "s.yaml", d))], capsys)
    line = one_line(err)
    assert rc == 2 and needle in line, line


def test_search_chooses_by_validation_and_final_runs_use_it(tmp_path, monkeypatch):
    """tune(): every grid value trained with the search's seeds, scored on the validation split; the best mean
    wins (ties: the first grid value); distill() then trains with the choice."""
    from harness import steps
    from harness.evaluation import evaluate_run

    recipes = write_recipes(tmp_path / "recipes")
    d = suite_dict(tmp_path, recipes)
    d["tuning"] = {"learning_rate": [0.001, 0.002, 0.004], "seeds": [1]}
    suite = load_suite(write_suite(tmp_path / "s.yaml", d))
    trained = []

    def fake_distill(suite_, recipe, seed, progress=True, lr_index=None):
        out = suite_.tune_run_dir(recipe.name, lr_index, seed) if lr_index is not None else suite_.run_dir(recipe.name, seed)
        out.mkdir(parents=True, exist_ok=True)
        trained.append((lr_index, seed))
        write_json_atomic(out / "run.json", {"status": "ok", "recipe_config": recipe.to_dict()})
        return out

    scores = iter([10.0, 12.5, 12.5])  # a tie between 0.002 and 0.004: the first wins
    monkeypatch.setattr(steps, "distill", fake_distill)
    monkeypatch.setattr(steps, "load_model", lambda *a, **k: None)
    monkeypatch.setattr(steps, "load_tokenizer", lambda *a, **k: None)
    monkeypatch.setattr(steps, "load_eval_set", lambda *a, **k: [{"prompt": "p", "output": "o"}])
    monkeypatch.setattr(evaluate_run, "evaluate_model", lambda *a, **k: {"valid": {"rougeL": next(scores)}})
    path = steps.tune(suite, suite.recipes()["fkl"], progress=False)
    import json

    chosen = json.loads(path.read_text())
    assert trained == [(0, 1), (1, 1), (2, 1)]
    assert chosen["learning_rate"] == 0.002 and chosen["validation_means"] == {"0.001": 10.0, "0.002": 12.5, "0.004": 12.5}
    records = [json.loads(steps.tune_record_path(suite, "fkl", i, 1).read_text()) for i in range(3)]
    assert [r["phase"] for r in records] == ["tune"] * 3
    assert [r["hparams"]["learning_rate"] for r in records] == [0.001, 0.002, 0.004]
    assert all(r["fingerprint"] == Fingerprints(suite).tuning_records("fkl")[(i, 1)] for i, r in enumerate(records))
