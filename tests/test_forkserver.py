"""The warm worker (harness/forkserver.py): a step run through it behaves as the same step in its own process.

Each test gets its own runtime directory (DISTILLBENCH_WORKER_DIR), so its workers are its own; they exit after 5 idle seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.forkserver import worker_key

REPO = Path(__file__).resolve().parents[1]

PROBE = '''
import json, os, sys, time

def main(argv):
    cmd = argv[0]
    if cmd == "echo":
        print(json.dumps({"cwd": os.getcwd(), "probe": os.environ.get("PROBE"), "argv": argv,
                          "pid": os.getpid(), "ppid": os.getppid(), "worker_env": os.environ.get("DISTILLBENCH_WORKER")}))
        print("to-stderr", file=sys.stderr)
        return int(argv[1])
    if cmd == "sleep":
        open(argv[1], "w").write(str(os.getpid()))
        time.sleep(120)
    if cmd == "raise":
        raise RuntimeError("boom in the step")
    if cmd == "exit":
        sys.exit(int(argv[1]))
'''

CLIENT = ("import sys; from harness.forkserver import run_in_worker; "
          "code = run_in_worker(sys.argv[1:], entry='probe_step:main'); sys.exit(99 if code is None else code)")


@pytest.fixture()
def env(tmp_path):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "probe_step.py").write_text(PROBE)
    runtime = Path(tempfile.mkdtemp(prefix="dbw-", dir="/tmp"))  # short: a Unix socket path has ~100 characters
    (tmp_path / "rt").symlink_to(runtime)
    yield dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path / 'mod'}", DISTILLBENCH_WORKER_DIR=str(runtime),
               DISTILLBENCH_WORKER_IDLE="5", PROBE="probe-value")
    shutil.rmtree(runtime, ignore_errors=True)


def client(env, *argv, cwd=None, **kw):
    return subprocess.run([sys.executable, "-c", CLIENT, *argv], env=env, cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=120, **kw)


def test_a_step_gets_the_clients_arguments_directory_environment_streams_and_status(env, tmp_path):
    first = client(env, "echo", "3", cwd=tmp_path)
    assert first.returncode == 3, first.stderr
    out = json.loads(first.stdout)
    assert out["cwd"] == str(tmp_path) and out["probe"] == "probe-value" and out["argv"] == ["echo", "3"]
    assert out["worker_env"] is None  # the step does not delegate again
    assert first.stderr.strip().endswith("to-stderr")
    second = json.loads(client(env, "echo", "0").stdout)
    assert second["ppid"] == out["ppid"], "the second step must reuse the warm worker"
    assert second["pid"] != out["pid"], "every step is its own (forked) process"
    other = client(dict(env, PROBE="other"), "echo", "0")
    assert json.loads(other.stdout)["ppid"] != out["ppid"], "another environment gets another worker"


def test_a_failing_step_prints_its_traceback_and_exits_nonzero(env):
    out = client(env, "raise")
    assert out.returncode == 1 and "RuntimeError: boom in the step" in out.stderr
    assert client(env, "exit", "7").returncode == 7


def test_killing_the_client_kills_the_step(env, tmp_path):
    pid_file = tmp_path / "step.pid"
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, "sleep", str(pid_file)], env=env, cwd=REPO)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    step = int(pid_file.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{step}").exists() and "zombie" not in _state(step):
        assert time.monotonic() < deadline, "the step outlived its client"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_usage_is_written_for_the_timings_and_the_worker_exits_when_idle(env, tmp_path):
    usage = tmp_path / "usage.json"
    out = client(dict(env, DISTILLBENCH_WORKER_USAGE=str(usage)), "echo", "0")
    assert out.returncode == 0
    data = json.loads(usage.read_text())
    assert data["cpu_s"] >= 0 and data["max_rss_mb"] > 0
    sockets = list((tmp_path / "rt").rglob("*.sock"))
    assert len(sockets) == 1
    deadline = time.monotonic() + 30
    while sockets[0].exists():  # idle 5 s, then the worker removes its socket and exits
        assert time.monotonic() < deadline, "the worker did not exit when idle"
        time.sleep(0.2)
    time.sleep(0.2)
    assert not list(Path(env["DISTILLBENCH_WORKER_DIR"]).iterdir()), "the worker left its lock or an empty log"


def test_the_key_follows_the_environment_but_not_per_shell_variables():
    base = {"PATH": "/bin", "HOME": "/root"}
    assert worker_key(base) == worker_key({**base, "PWD": "/elsewhere", "SHLVL": "3", "DISTILLBENCH_WORKER": "1"})
    assert worker_key(base) != worker_key({**base, "OMP_NUM_THREADS": "2"})


def _cli(env, workdir_config, *args):
    return subprocess.run([sys.executable, "-m", "harness.cli", "--no-progress", *args, "--config",
                           str(workdir_config)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_pipeline_step_in_the_worker_writes_the_same_bytes_as_in_its_own_process(env, tmp_path):
    base = tmp_path / "base"
    config = (REPO / "config" / "smoke.yaml").read_text()
    configs = {}
    for name in ("base", "inline", "worker"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(config + f"\nworkdir: {tmp_path / name}\nrecipes_dir: {REPO / 'recipes'}\n")
    inline = dict(env, DISTILLBENCH_WORKER="0")
    for step in ("data", "tokenizer"):
        assert _cli(inline, configs["base"], step).returncode == 0
    for name, flag in (("inline", "0"), ("worker", "1")):
        shutil.copytree(base, tmp_path / name)
        for step in (["teacher"], ["student-init", "--seed", "1"]):
            out = _cli(dict(env, DISTILLBENCH_WORKER=flag), configs[name], *step)
            assert out.returncode == 0, out.stderr
    weights = sorted(p.relative_to(tmp_path / "inline") for p in (tmp_path / "inline").rglob("*.safetensors"))
    assert len(weights) == 2
    for rel in weights:
        assert (tmp_path / "inline" / rel).read_bytes() == (tmp_path / "worker" / rel).read_bytes(), rel
    assert list((tmp_path / "rt").rglob("*.sock")), "the worker was not used"


def test_not_inside_slurm_jobs_nor_for_help():
    from harness.forkserver import wanted

    assert wanted(["distill", "--config", "x"], {"DISTILLBENCH_WORKER": "1"})
    assert not wanted(["distill"], {"DISTILLBENCH_WORKER": "1", "SLURM_JOB_ID": "42"})
    assert not wanted(["distill", "--help"], {"DISTILLBENCH_WORKER": "1"})
    assert not wanted(["distill"], {"DISTILLBENCH_WORKER": "0"})


def test_a_stale_socket_left_by_a_killed_worker_is_replaced(env):
    first = json.loads(client(env, "echo", "0").stdout)
    os.kill(first["ppid"], signal.SIGKILL)  # the worker dies without removing its socket
    sockets = list(Path(env["DISTILLBENCH_WORKER_DIR"]).rglob("*.sock"))
    assert len(sockets) == 1
    second = client(env, "echo", "0")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["ppid"] != first["ppid"]


def test_a_terminated_worker_removes_its_socket_lock_and_empty_log(env):
    first = json.loads(client(env, "echo", "0").stdout)
    runtime = Path(env["DISTILLBENCH_WORKER_DIR"])
    assert list(runtime.rglob("*.sock"))
    os.kill(first["ppid"], signal.SIGTERM)  # e.g. `pkill -f "harness.forkserver serve"`
    deadline = time.monotonic() + 30
    while list(runtime.rglob("*")):
        assert time.monotonic() < deadline, f"left behind: {sorted(p.name for p in runtime.rglob('*'))}"
        time.sleep(0.1)
