"""Several teachers (``teacher_seeds``): where each teacher's outputs go, what their fingerprints depend on, which
records the leaderboard expects, and the one-line errors for bad values. The pipeline itself runs with two
teachers in tests/test_pipeline.py."""

from __future__ import annotations

import pytest

from harness import steps
from harness.fingerprint import Fingerprints
from harness.io import write_json_atomic
from harness.schema import ConfigError
from harness.suite import load_suite

from .test_reliability import suite_dict, write_recipes, write_suite


@pytest.fixture()
def two(tmp_path):
    recipes = write_recipes(tmp_path / "recipes", base=("sft", "fkl", "srkl"))
    d = suite_dict(tmp_path, recipes)
    d.update(teacher_seeds=[0, 7], seeds=[1, 2], tuning={"learning_rate": [0.001, 0.01]})
    return tmp_path, recipes, d, load_suite(write_suite(tmp_path / "two.yaml", d))


def test_primary_teacher_keeps_the_plain_layout_and_another_carries_its_seed(two):
    tmp_path, _, _, suite = two
    w = suite.workdir
    assert suite.teacher_seed == 0 and suite.primary_teacher
    assert (suite.teacher_dir, suite.cache_path, suite.records_dir) == (w / "teacher", w / "teacher_cache.pt", w / "records")
    assert suite.run_dir("fkl", 1) == w / "runs" / "fkl" / "seed1"
    other = suite.for_teacher(7)
    assert not other.primary_teacher and other.teacher_seed == 7
    assert (other.teacher_dir, other.cache_path, other.records_dir) == (
        w / "teacher7", w / "teacher_cache-teacher7.pt", w / "records-teacher7")
    assert other.run_dir("fkl", 1) == w / "runs-teacher7" / "fkl" / "seed1"
    assert other.run_dir("sft", 1) == w / "runs" / "sft" / "seed1"  # SFT never sees the teacher: one run per seed
    assert other.student_init_dir(1) == suite.student_init_dir(1) and other.chosen_path("fkl") == suite.chosen_path("fkl")
    with pytest.raises(ConfigError, match="teacher seed 3 is not in 'teacher_seeds'"):
        suite.for_teacher(3)


def test_fingerprints_follow_the_teacher_and_the_search_is_the_primarys(two):
    _, _, _, suite = two
    f0 = Fingerprints(suite)
    f7 = f0.for_teacher(7)
    assert f0.teacher() != f7.teacher() and f0.teacher_cache() != f7.teacher_cache()
    assert f0.run("fkl", 1) != f7.run("fkl", 1)               # distilled from another teacher
    assert f0.run("sft", 1) == f7.run("sft", 1)               # the same SFT run serves both
    assert f0.record("sft", 1) != f7.record("sft", 1)         # but its teacher-agreement metrics differ
    assert f0.tuning_records("fkl") == f7.tuning_records("fkl")  # one search, with the primary teacher
    assert f0.student_init(1) == f7.student_init(1)
    assert ("init", 1) in f0.expected_records() and ("init", 1) not in f7.expected_records()
    # the plan digest covers both teachers: dropping the second changes it
    d = dict(suite.raw)
    assert f7.plan_digest() == f0.plan_digest()  # one plan, whichever teacher's view computes it
    one = Fingerprints(load_suite(write_suite(suite.workdir.parent / "one.yaml", {**d, "teacher_seeds": [0]})))
    assert one.plan_digest() != f0.plan_digest()


def test_leaderboard_expects_every_teachers_records(two):
    _, _, _, suite = two
    expected = steps.expected_runs(suite)
    teachers = {t for *_, t in expected}
    assert teachers == {0, 7}
    assert ("init", 1, "test", 0) in expected and ("init", 1, "test", 7) not in expected
    assert ("fkl", 2, "test", 7) in expected and ("teacher", 0, "test", 7) in expected
    fps = Fingerprints(suite)
    for f in fps.teachers():  # write every expected record with the right fingerprint, except one of teacher 7
        for (target, seed), fp in f.expected_records().items():
            if (target, seed, f.suite.teacher_seed) != ("fkl", 2, 7):
                write_json_atomic(steps.record_path(f.suite, target, seed, "test"), {"fingerprint": fp})
    chosen, left_out = [p for p in steps.select_records(suite)[0] if p.name == "test.json"], steps.select_records(suite)[1]
    assert len(chosen) == len(expected) - 1
    assert [x for x in left_out if "search" not in x] == [
        f"fkl seed 2 teacher 7 [test]: missing ({suite.for_teacher(7).records_dir / 'fkl' / 'seed2' / 'test.json'})"]


@pytest.mark.parametrize("value, message", [
    ([0, 0], "must be a list of distinct integers >= 0"),
    ([-1], "must be a list of distinct integers >= 0"),
    (["a"], "must be a list of distinct integers >= 0"),
    ([], "teacher_seeds"),
])
def test_bad_teacher_seeds_are_refused_in_one_line(two, value, message):
    tmp_path, _, d, _ = two
    with pytest.raises(ConfigError, match=message) as err:
        load_suite(write_suite(tmp_path / "bad.yaml", {**d, "teacher_seeds": value}))
    assert "\n" not in str(err.value) and "bad.yaml" in str(err.value)


def test_several_seeds_of_a_teacher_used_as_it_is_are_refused(two):
    tmp_path, _, d, _ = two
    d = {**d, "teacher": {"path": str(tmp_path / "some-model")}}
    with pytest.raises(ConfigError, match="existing model used as it is .*use one seed, or fine-tune the teacher"):
        load_suite(write_suite(tmp_path / "existing.yaml", d))


def test_final_run_at_the_searched_seed_is_the_search_run(tmp_path):
    """The final run of a seed the search trained, at the chosen learning rate, with the primary teacher, is
    copied from the search's run; training it again gives bit-identical weights (which is what makes the copy
    honest); a run of another teacher is never copied."""
    import json

    import torch
    from safetensors.torch import load_file

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipes = write_recipes(tmp_path / "recipes", base=("sft", "fkl"))
        d = suite_dict(tmp_path, recipes)
        d.update(teacher_seeds=[0, 1], tuning={"learning_rate": [0.002, 0.005], "seeds": [1]})
        suite = load_suite(write_suite(tmp_path / "s.yaml", d))
        steps.prepare_data(suite)
        steps.prepare_tokenizer(suite)
        for view in suite.teachers():
            steps.prepare_teacher(view, progress=False)
            steps.build_teacher_cache(view, progress=False)
        steps.init_student(suite, 1)
        fkl = suite.recipes()["fkl"]
        chosen = json.loads(steps.tune(suite, fkl, progress=False).read_text())
        src = steps.reusable_search_run(suite, fkl, 1)
        assert src == suite.tune_run_dir("fkl", d["tuning"]["learning_rate"].index(chosen["learning_rate"]), 1)
        out = steps.distill(suite, fkl, 1, progress=False)
        run = json.loads((out / "run.json").read_text())
        assert run["reused_from"] == str(src) and run["phase"] == "final"
        assert run["fingerprint"] == Fingerprints(suite).run("fkl", 1)
        copied = load_file(out / "model" / "model.safetensors")
        steps.distill(suite, fkl, 1, progress=False, reuse_search=False)  # the same run, trained again
        again = json.loads((out / "run.json").read_text())
        assert "reused_from" not in again and again["fingerprint"] == run["fingerprint"]
        retrained = load_file(out / "model" / "model.safetensors")
        assert all(torch.equal(copied[k], retrained[k]) for k in copied)
        # another teacher's run, or a search run made by other inputs, is never reused
        assert steps.reusable_search_run(suite.for_teacher(1), fkl, 1) is None
        meta = json.loads((src / "run.json").read_text())
        (src / "run.json").write_text(json.dumps({**meta, "fingerprint": "other"}))
        assert steps.reusable_search_run(suite, fkl, 1) is None
        out1 = steps.distill(suite.for_teacher(1), fkl, 1, progress=False)
        assert "reused_from" not in json.loads((out1 / "run.json").read_text())
        assert out1 == suite.workdir / "runs-teacher1" / "fkl" / "seed1"
    finally:
        torch.set_num_threads(before)
