"""A warm worker for pipeline steps: import torch, transformers and the harness once, fork a child per step.

A step's process spends ~3 s importing torch, transformers' model code, lm-eval and nltk before its first useful
work; a tiny suite has a hundred such processes. With ``DISTILLBENCH_WORKER=1`` in its environment (the Snakefile
sets it for local runs), ``python -m harness.cli <step> ...`` becomes a thin client: it connects to a worker
listening on a Unix socket, hands over its arguments, working directory, environment and its three standard file
descriptors, and exits with the step's exit status. The worker forks a child for each request; the child takes
the client's descriptors (so the step writes to the job's log as before), directory and environment, runs
``harness.cli.main(argv)`` in a fresh copy of the warm process, and exits. So each step is still its own process
(its own RNG, threads, memory, exit status); only the imports are shared, done once before any fork.

Safety
- The worker is keyed by everything that could make its imports differ from the client's: the interpreter, the
  harness package's location and its source files (path, size, mtime), and the environment (less a few per-shell
  variables). Any difference → another socket → another worker. A worker exits after ``idle`` seconds with no
  request (``DISTILLBENCH_WORKER_IDLE``, default 60).
- A client killed (Snakemake cancels a job) closes its socket; the worker then terminates that child (SIGTERM,
  SIGKILL after 5 s). A worker that dies takes its children with it (``PR_SET_PDEATHSIG``).
- Never inside a SLURM job (:func:`wanted`): a worker would live in the cgroup of the job that started it.
- When anything fails before the step starts (no worker can be started, a request is refused), the client runs
  the step itself, in-process, as without the worker: the worker only ever saves time.
- The child's CPU time and peak memory are not in the client's process tree (Snakemake's benchmark measures the
  client): the client writes them to ``$DISTILLBENCH_WORKER_USAGE`` when set (``{"cpu_s", "max_rss_mb"}``), which
  :mod:`harness.timings` prefers.

Only the standard library is imported here: the client must start in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: set to 1 (the Snakefile does for local runs) to run steps in the warm worker
ENV = "DISTILLBENCH_WORKER"
#: seconds a worker waits for a request before it exits
IDLE_ENV = "DISTILLBENCH_WORKER_IDLE"
#: where the client writes the child's CPU seconds and peak RSS (JSON), for the timings table
USAGE_ENV = "DISTILLBENCH_WORKER_USAGE"
#: where sockets, locks and worker logs live (default: a per-user directory under the temporary directory)
DIR_ENV = "DISTILLBENCH_WORKER_DIR"
DEFAULT_IDLE_S = 60.0
START_TIMEOUT_S = 120.0
#: per-shell variables that do not change what an import does (they differ between jobs)
_VOLATILE = frozenset({"PWD", "OLDPWD", "SHLVL", "_", ENV, USAGE_ENV, IDLE_ENV})
#: what the worker imports before it forks: every step's libraries (cli.STEP_MODULES) and the tiny models' code
_PRELOAD_EXTRA = ("harness.steps", "transformers.models.gpt2.modeling_gpt2", "rouge_score.rouge_scorer")  # + nltk
_HEADER = struct.Struct("!Q")


# ----------------------------------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------------------------------
def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def worker_key(env: dict[str, str] | None = None) -> str:
    """16 hex digits naming the worker this process may use: interpreter, harness sources (path, size, mtime)
    and the environment less :data:`_VOLATILE`."""
    env = os.environ if env is None else env
    h = hashlib.sha256()
    h.update(os.path.realpath(sys.executable).encode())
    root = _package_dir()
    h.update(str(root).encode())
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for key in sorted(k for k in env if k not in _VOLATILE):
        h.update(f"{key}={env[key]}\0".encode())
    return h.hexdigest()[:16]


def _runtime_dir() -> Path:
    """``$DISTILLBENCH_WORKER_DIR``, else ``<tmp>/distillbench-<uid>`` (``/tmp/...`` when the temporary directory's
    path is too long for a Unix socket's ~100 characters)."""
    path = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / f"distillbench-{os.getuid()}")
    if len(str(path)) > 60:
        path = Path("/tmp") / f"distillbench-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def socket_path(key: str | None = None) -> Path:
    return _runtime_dir() / f"w-{key or worker_key()}.sock"


# ----------------------------------------------------------------------------------------------------------
# messages: an 8-byte length, then JSON
# ----------------------------------------------------------------------------------------------------------
def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [payload], fds)
        sock.sendall(payload[sent:])
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, got: bytes = b"") -> bytes | None:
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            return None
        got += chunk
    return got


def _recv(sock: socket.socket, with_fds: bool = False) -> tuple[dict | None, list[int]]:
    """One message (and, with ``with_fds``, the descriptors sent with its first bytes); ``None`` at EOF."""
    fds: list[int] = []
    first = b""
    if with_fds:
        first, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 3)
        if not first:
            return None, fds
    head = _recv_exact(sock, _HEADER.size, first[:_HEADER.size])
    if head is None:
        return None, fds
    (n,) = _HEADER.unpack(head)
    body = _recv_exact(sock, n, first[_HEADER.size:])
    return (None if body is None else json.loads(body)), fds


# ----------------------------------------------------------------------------------------------------------
# client
# ----------------------------------------------------------------------------------------------------------
def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _start_worker(path: Path, key: str) -> socket.socket | None:
    """Start a worker for ``path`` (one at a time: a lock file) and connect; ``None`` if it did not come up."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)  # another client may have started it while we waited for the lock
        if sock is not None:
            return sock
        env = {k: v for k, v in os.environ.items() if k not in (ENV, USAGE_ENV)}
        with open(path.with_suffix(".log"), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "harness.forkserver", "serve", str(path), key],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                    start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if path.exists():
                sock = _connect(path)
                if sock is not None:
                    return sock
            if proc.poll() is not None:
                return None
            time.sleep(0.02)
        return None


def run_in_worker(argv: list[str], entry: str = "harness.cli:main") -> int | None:
    """Run ``entry(argv)`` (``module:function``; by default ``harness.cli.main``) in the warm worker and return
    its exit status; ``None`` when no worker could take it (nothing ran: the caller runs the step itself).
    A worker that closes before it takes the request (idle exit, killed) is replaced once."""
    try:
        key = worker_key()
        path = socket_path(key)
    except OSError as exc:  # e.g. no writable temporary directory
        print(f"distillbench: no warm worker ({exc}); running the step in this process", file=sys.stderr)
        return None
    for _attempt in range(2):
        try:
            sock = _connect(path) or _start_worker(path, key)
        except OSError as exc:  # e.g. the lock file cannot be written
            print(f"distillbench: no warm worker ({exc}); running the step in this process", file=sys.stderr)
            return None
        if sock is None:
            print("distillbench: the warm worker did not start (see its log in "
                  f"{path.with_suffix('.log')}); running the step in this process", file=sys.stderr)
            return None
        with sock:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            try:
                _send(sock, {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "entry": entry},
                      [0, 1, 2])
                ack, _ = _recv(sock)
            except OSError:  # the worker was closing: it never saw the request
                ack = None
            if ack is None or "pid" not in ack:  # nothing ran
                time.sleep(0.1)
                continue
            try:
                done, _ = _recv(sock)
            except OSError:
                done = None
        if done is None:
            print(f"distillbench: the warm worker stopped while it ran the step (pid {ack['pid']})",
                  file=sys.stderr)
            return 1
        if os.environ.get(USAGE_ENV):
            Path(os.environ[USAGE_ENV]).write_text(json.dumps({"cpu_s": done["cpu_s"],
                                                               "max_rss_mb": done["max_rss_mb"]}) + "\n")
        return int(done["code"])
    return None


def wanted(argv: list[str], env: dict[str, str] | None = None) -> bool:
    """Whether this ``harness.cli`` invocation should go to the warm worker: ``DISTILLBENCH_WORKER=1``, not
    ``--help``, and not inside a SLURM job (a worker started by one job would live in that job's cgroup and
    die with it, taking other jobs' steps along)."""
    env = os.environ if env is None else env
    return env.get(ENV) == "1" and "SLURM_JOB_ID" not in env and not {"-h", "--help"} & set(argv)


# ----------------------------------------------------------------------------------------------------------
# worker
# ----------------------------------------------------------------------------------------------------------
def _preload() -> None:
    import importlib

    from . import cli

    for module in dict.fromkeys([m for mods in cli.STEP_MODULES.values() for m in mods] + list(_PRELOAD_EXTRA)):
        importlib.import_module(module)


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the client's step and exit with its status (never returns)."""
    code = 1
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):  # received descriptors are >= 3: the worker's 0-2 are open
            os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({k: v for k, v in request["env"].items() if k not in (ENV, USAGE_ENV)})
        sys.argv = [sys.argv[0], *request["argv"]]
        import importlib

        module, function = request.get("entry", "harness.cli:main").split(":")
        try:
            code = getattr(importlib.import_module(module), function)(list(request["argv"]))
            code = 0 if code is None else code
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - print the traceback as Python would, exit 1
            import traceback

            traceback.print_exc()
            code = 1
        import atexit
        import logging

        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code if isinstance(code, int) else 1)


def serve(path: Path, key: str, idle_s: float) -> None:
    """Listen on ``path`` until ``idle_s`` seconds pass with no request and no running step."""
    env = dict(os.environ)  # as the client had it (imports may add variables)
    _preload()
    if worker_key(env) != key:  # the sources changed while we imported: let a new worker start
        print(f"worker {key}: the harness sources changed during start-up; exiting", file=sys.stderr)
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp))
    listener.listen(64)
    os.replace(tmp, path)
    inode = path.stat().st_ino
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    jobs: dict[int, socket.socket] = {}
    killed: dict[int, float] = {}
    last = time.monotonic()
    # SIGTERM (pkill, a session's end) leaves through the clean-up below like an idle exit; the running steps
    # follow by PDEATHSIG. (SIGKILL cannot be caught: the next client replaces the stale socket.)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            for sk, _ in sel.select(timeout=0.05):
                if sk.fileobj is listener:
                    conn, _ = listener.accept()
                    conn.settimeout(10.0)
                    try:
                        request, fds = _recv(conn, with_fds=True)
                    except OSError:
                        request, fds = None, []
                    conn.settimeout(None)
                    if request is None or len(fds) != 3:
                        for fd in fds:
                            os.close(fd)
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:  # the child keeps no descriptor of the worker's: only the client's three
                        sel.close()
                        for other in (listener, conn, *jobs.values()):
                            other.close()
                        _child(request, fds)
                    for fd in fds:
                        os.close(fd)
                    jobs[pid] = conn
                    try:
                        _send(conn, {"pid": pid})
                        sel.register(conn, selectors.EVENT_READ, pid)
                    except OSError:  # the client went away before the step started: stop it
                        killed[pid] = time.monotonic()
                        _signal(pid, signal.SIGTERM)
                else:  # a client's socket: readable means it went away
                    pid = sk.data
                    if pid not in killed:
                        killed[pid] = time.monotonic()
                        _signal(pid, signal.SIGTERM)
                    sel.unregister(sk.fileobj)
            now = time.monotonic()
            for pid, since in list(killed.items()):
                if pid in jobs and now - since > 5.0:
                    _signal(pid, signal.SIGKILL)
            for pid in list(jobs):
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done == 0:
                    continue
                conn = jobs.pop(pid)
                killed.pop(pid, None)
                code = os.waitstatus_to_exitcode(status)
                try:
                    _send(conn, {"code": code if code >= 0 else 128 - code,
                                 "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                                 "max_rss_mb": round(usage.ru_maxrss / 1024, 1)})
                except OSError:
                    pass
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                conn.close()
                last = now
            if not jobs and now - last > idle_s:
                break
    finally:
        try:
            if path.stat().st_ino == inode:  # still ours: remove the socket, the lock and an empty log
                path.unlink()
                path.with_suffix(".lock").unlink(missing_ok=True)
                log = path.with_suffix(".log")
                if log.exists() and log.stat().st_size == 0:
                    log.unlink()
        except OSError:
            pass
        listener.close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "serve":
        serve(Path(args[1]), args[2], float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE_S))
        return 0
    print("usage: python -m harness.forkserver serve <socket path> <key>  (started by harness.cli; see the "
          "module's docstring)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
