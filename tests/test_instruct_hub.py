"""The paper suites' data entries load through the Hub code path, from local replicas of MiniLLM's repositories.

Each test builds a Hugging Face cache (``HF_HUB_CACHE`` layout: ``datasets--<owner>--<name>/refs/main`` and
``snapshots/<commit>/<file>``) holding a replica of a repository's file layout, with the shared files of
``../shared/data/instruct`` standing in for the real ones (written to a tmp dir, never to the repository),
and switches the Hub off (``HF_HUB_OFFLINE``). ``huggingface_hub.hf_hub_download`` then answers from the cache
exactly as it does on a user's machine after a first download, and a file name the repository does not hold
fails as it would there. Layouts (issue 22): MiniLLM/dolly raw.jsonl + valid.jsonl; MiniLLM/self-inst and
MiniLLM/Vicuna valid.jsonl; MiniLLM/sinst and MiniLLM/uinst one valid.jsonl per reference-length bucket.

Stand-ins: raw.jsonl = MiniLLM's 1000-row dev split (dolly_dev.jsonl, i.e. raw[:1000]) followed by generated
rows in Dolly's raw schema (the 14k training rows are not in shared/); uinst (absent from shared/) and the
short-reference buckets of sinst/uinst are generated rows, uinst with string outputs, one of them the text
"[]" (issue 16). Counts pinned below are those of the stand-ins.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.data import instruct
from harness.data.errors import DataError
from harness.data.instruct import (
    HUB_LAYOUTS,
    check_data_plan,
    check_set_spec,
    load_set,
    prepare_instruct_data,
)
from harness.data.prompts import build_prompt
from harness.data.tiny import generate_tiny
from harness.schema import ConfigError
from harness.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILLBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))
INSTRUCT = SHARED / "instruct"
pytestmark = pytest.mark.skipif(not (INSTRUCT / "dolly_valid.jsonl").exists(),
                                reason=f"real instruction data not found at {INSTRUCT}")

PAPER_SUITES = ["config/instruct.yaml", "config/instruct-opt.yaml", "config/instruct-openllama.yaml",
                "config/instruct-qwen.yaml"]
N_EXTRA_RAW = 120   # generated rows after MiniLLM's 1000 dev rows in the raw.jsonl stand-in
N_UINST = 30


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "dataset") -> Path:
    """Write ``files`` (path in the repository -> bytes) as a cached snapshot of ``repo_id`` at ``main``."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        target = root / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root / "snapshots" / commit


def _lines(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _generated(n: int, seed: int, *, drop_prompt: bool = True) -> list[dict]:
    rows = []
    for it in generate_tiny(seed, n_train=max(n, 60), n_valid=20, n_test=20)["train"][:n]:
        row = {"instruction": it["instruction"], "input": it["input"], "output": it["output"], "category": it["task"]}
        if not drop_prompt:
            row["prompt"] = it["prompt"]
        rows.append(row)
    return rows


def replica_files() -> dict[str, dict[str, bytes]]:
    """Repository id -> {file: bytes} for the five MiniLLM dataset repositories."""
    dev = [json.loads(x) for x in (INSTRUCT / "dolly_dev.jsonl").read_text(encoding="utf-8").splitlines()]
    raw = [{k: r[k] for k in ("instruction", "input", "output")} for r in dev] + _generated(N_EXTRA_RAW, seed=7)
    uinst = _generated(N_UINST, seed=8, drop_prompt=False)
    uinst[3]["output"] = "[]"  # a text answer that only looks like a JSON list (issue 16, item 4)
    short_bucket = _lines(_generated(5, seed=9, drop_prompt=False))
    return {
        "MiniLLM/dolly": {"raw.jsonl": _lines(raw), "raw.txt": b"stand-in\n",
                          "valid.jsonl": (INSTRUCT / "dolly_valid.jsonl").read_bytes(), "valid.txt": b"stand-in\n"},
        "MiniLLM/self-inst": {"valid.jsonl": (INSTRUCT / "self-inst_valid.jsonl").read_bytes(), "valid.txt": b"x\n"},
        "MiniLLM/Vicuna": {"valid.jsonl": (INSTRUCT / "vicuna_valid.jsonl").read_bytes(), "valid.txt": b"x\n"},
        "MiniLLM/sinst": {f: (INSTRUCT / "sinst_valid.jsonl").read_bytes() if f.startswith("11_") else short_bucket
                          for f in HUB_LAYOUTS["MiniLLM/sinst"]},
        "MiniLLM/uinst": {f: _lines(uinst) if f.startswith("11_") else short_bucket
                          for f in HUB_LAYOUTS["MiniLLM/uinst"]},
    }


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf_cache")
    for repo, files in replica_files().items():
        make_hub_cache(cache, repo, files)
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """The Hub is unreachable and the cache is the replica: what hf_hub_download sees on an offline machine."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_replica_layout_matches_the_issue(hub_cache):
    found = {p.relative_to(hub_cache).as_posix().split("/", 3)[-1]
             for p in hub_cache.glob("datasets--MiniLLM--sinst/snapshots/*/**/*") if p.is_file()}
    assert found == {"0_2/valid.jsonl", "3_6/valid.jsonl", "6_10/valid.jsonl", "11_/valid.jsonl"}
    assert set(HUB_LAYOUTS["MiniLLM/dolly"]) == {"raw.jsonl", "raw.txt", "valid.jsonl", "valid.txt"}


@pytest.mark.parametrize("suite_file", PAPER_SUITES)
def test_paper_suite_entries_load_through_the_hub_path(suite_file, offline_hub):
    suite = load_suite(REPO / suite_file)
    where = str(suite_file)
    expected = {"dolly": 500, "self-inst": 242, "vicuna": 80, "sinst": 1694, "uinst": N_UINST}
    for i, entry in enumerate(suite.evaluation["sets"]):  # what the evaluate step loads (download if needed)
        assert len(load_set(entry, where=where, key=f"evaluation.sets[{i}]")) == expected[entry["name"]]
    counts = check_data_plan(suite.data, suite.evaluation["sets"], where=where)  # validation: cache + overlap
    assert counts == {"train": N_EXTRA_RAW, "valid": 1000, **expected}
    train = load_set(suite.data["train"], where=where, key="data.train", default_name="train")
    valid = load_set(suite.data["valid"], where=where, key="data.valid", default_name="valid")
    # MiniLLM's split: validation = raw rows [:1000], training = rows [1000:], by physical line number
    assert [it["id"] for it in valid] == [f"valid-{i:05d}" for i in range(1, 1001)]
    assert [it["id"] for it in train] == [f"train-{i:05d}" for i in range(1001, 1001 + N_EXTRA_RAW)]
    dev = [json.loads(x) for x in (INSTRUCT / "dolly_dev.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [it["instruction"] for it in valid] == [r["instruction"] for r in dev]
    template = suite.data["valid"].get("template", "file")
    if template == "file":  # raw.jsonl has no prompt field: the Alpaca prompt is built, byte-identical to MiniLLM's
        assert [it["prompt"] for it in valid] == [r["prompt"] for r in dev]
    else:
        assert valid[0]["prompt"].startswith("<|im_start|>Below is an instruction")
        assert valid[0]["prompt"].endswith("### Response:\n<|im_end|><|im_start|>Assistant:")


def test_sinst_and_uinst_use_bucket_11_only(offline_hub):
    where = "config/instruct.yaml"
    sets = {s["name"]: s for s in load_suite(REPO / where).evaluation["sets"]}
    sinst = load_set(sets["sinst"], where=where, key="evaluation.sets[3]")
    raw = [json.loads(x) for x in (INSTRUCT / "sinst_valid.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [it["answers"] for it in sinst] == [r["output"] for r in raw]
    assert any(len(it["answers"]) > 1 for it in sinst)
    uinst = load_set(sets["uinst"], where=where, key="evaluation.sets[4]")
    assert uinst[3]["answers"] == ["[]"] and uinst[3]["output"] == "[]"  # text, as MiniLLM scores it
    other = load_set({"name": "x", "hub": "MiniLLM/sinst", "file": "0_2/valid.jsonl"}, where=where, key="k")
    assert len(other) == 5  # a bucket MiniLLM does not evaluate is a different file, not merged in


@pytest.mark.parametrize("entry, words", [
    ({"name": "dolly", "hub": "MiniLLM/dolly", "split": "test"}, ["evaluation.sets[0].split", "file: valid.jsonl",
                                                                  "holds raw.jsonl"]),
    ({"name": "dolly", "hub": "MiniLLM/dolly"}, ["missing required key 'evaluation.sets[0].file'"]),
])
def test_old_split_entries_fail_in_seconds(entry, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        check_set_spec(entry, "config/x.yaml", "evaluation.sets[0]")
    msg = str(e.value)
    assert msg.startswith("config/x.yaml: ") and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("repo, file", [("MiniLLM/dolly", "train.jsonl"), ("MiniLLM/sinst", "valid.jsonl"),
                                        ("MiniLLM/dolly", "test/valid.jsonl")])
def test_a_file_the_repository_lacks_fails(repo, file, offline_hub):
    with pytest.raises(DataError) as e:
        load_set({"name": "x", "hub": repo, "file": file}, where="config/x.yaml", key="evaluation.sets[2]")
    msg = str(e.value)
    assert f"hub:{repo}/{file}" in msg and "key 'evaluation.sets[2]' of config/x.yaml" in msg
    assert "holds" in msg and "Fix:" in msg and "\n" not in msg
    # the validation pass (cache only) does not download: it skips what is not cached
    assert load_set({"name": "x", "hub": repo, "file": file}, where="w", key="k", local_only=True) is None


def test_hub_errors_name_the_cause(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def missing(**kwargs):
        raise EntryNotFoundError("404")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(DataError) as e:
        load_set({"name": "d", "hub": "MiniLLM/dolly", "file": "test.jsonl"}, where="s.yaml", key="data.valid")
    msg = str(e.value)
    assert "the repository has no such file (MiniLLM/dolly holds raw.jsonl" in msg
    assert "files, not dataset splits" in msg

    def down(**kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", down)
    with pytest.raises(DataError, match="ConnectionError: network unreachable.*Fix: check the network"):
        load_set({"name": "d", "hub": "MiniLLM/dolly", "file": "raw.jsonl"}, where="s.yaml", key="data.train")


def test_naive_fix_leaks_the_test_set_and_is_refused(offline_hub):
    suite = load_suite(REPO / "config/instruct.yaml")
    data = {**suite.data, "valid": {"hub": "MiniLLM/dolly", "file": "valid.jsonl"}}  # 500 Dolly test items
    with pytest.raises(DataError) as e:
        check_data_plan(data, suite.evaluation["sets"], where="config/instruct.yaml")
    msg = str(e.value)
    assert msg.startswith("config/instruct.yaml (key 'data.valid')")
    assert "500 item(s) of data.valid are also in evaluation.sets[0] (dolly)" in msg
    assert "select: {stop: 1000}" in msg


def test_local_copy_of_a_repository_is_the_same_data(offline_hub, tmp_path):
    snapshot = next((offline_hub / "datasets--MiniLLM--dolly" / "snapshots").iterdir())
    via_hub = load_set({"name": "train", "hub": "MiniLLM/dolly", "file": "raw.jsonl", "select": {"start": 1000}})
    via_dir = load_set({"name": "train", "path": str(snapshot), "file": "raw.jsonl", "select": {"start": 1000}})
    assert via_hub == via_dir and len(via_hub) == N_EXTRA_RAW
    with pytest.raises(DataError, match="is a directory; name the file in it with 'file:'"):
        load_set({"name": "train", "path": str(snapshot)}, where="s.yaml", key="data.train")


def test_data_step_writes_minillm_split(offline_hub, tmp_path):
    suite = load_suite(REPO / "config/instruct.yaml")
    paths = prepare_instruct_data({**suite.data, "max_train_items": 50}, suite.evaluation["sets"], tmp_path,
                                  where="config/instruct.yaml")
    assert set(paths) == {"train", "valid"}
    train = [json.loads(x) for x in paths["train"].read_text(encoding="utf-8").splitlines()]
    valid = [json.loads(x) for x in paths["valid"].read_text(encoding="utf-8").splitlines()]
    assert len(train) == 50 and len(valid) == 1000
    assert train[0]["id"] == "train-01001" and valid[-1]["id"] == "valid-01000"
    assert train[0]["prompt"] == build_prompt(train[0]["instruction"], train[0]["input"])
    bad = {**suite.data, "valid": {"hub": "MiniLLM/dolly", "file": "valid.jsonl"}}
    with pytest.raises(DataError, match="are also in evaluation.sets"):
        prepare_instruct_data(bad, suite.evaluation["sets"], tmp_path / "bad", where="config/instruct.yaml")
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_offline_user_environment_end_to_end(hub_cache, tmp_path):
    """The exact situation of a user: HF_HUB_CACHE + HF_HUB_OFFLINE=1 in the environment, a fresh process."""
    code = ("import json, sys; from harness.suite import load_suite; from harness.data.instruct import "
            "check_data_plan; s = load_suite(sys.argv[1]); "
            "print(json.dumps(check_data_plan(s.data, s.evaluation['sets'], where=sys.argv[1])))")
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = subprocess.run([sys.executable, "-c", code, "config/instruct.yaml"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["dolly"] == 500


def test_hub_layout_hint_lists_known_files():
    assert instruct._hub_hint("MiniLLM/uinst") == (
        " (MiniLLM/uinst holds 0_2/valid.jsonl, 3_5/valid.jsonl, 6_10/valid.jsonl, 11_/valid.jsonl)")
    assert instruct._hub_hint("someone/else") == ""
