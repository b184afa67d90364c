"""Micro-benchmarks of the harness (``python -m harness.bench objectives|startup|steps|runs|evaluate ...``).

``startup``, ``steps``, ``runs`` and ``evaluate`` are described in :data:`STARTUP_DOC`, :data:`STEPS_DOC`,
:data:`RUNS_DOC` and :data:`EVALUATE_DOC`
(below).

``objectives`` has two suites (``--suite``; default: ``gpu`` on CUDA, ``cpu`` otherwise):

- ``cpu``: forward+backward time and peak extra memory of every objective on random ``[positions, V]``
  logits, as ratios to plain ``torch.nn.functional.cross_entropy`` and to TRL's
  ``GKDTrainer.generalized_jsd_loss`` (β = 0.5) measured in the same run: dense, chunked (``--chunk-size``,
  capped by ``wrapper.CHUNK_ELEMENTS``) and chunked with the gradient written over the logits (in place).
- ``gpu`` (``--device cuda`` writes ``results/bench/objectives-cuda.md``): every per-token objective through
  the Triton kernels (out of place and in place), eager PyTorch, ``torch.compile`` of the same formula, and
  the peers TRL ``generalized_jsd_loss`` and Liger's JSD / KL-div / TVD kernels (when installed), at
  8,192 × 151,936 bf16 by default; times and memory as ratios to the floor (an op that reads both logits once
  and writes one logits-sized tensor: ``torch.add(student, teacher, out=buffer)``, timed in the same run). Then
  the fused LM head + loss in Liger's setting (8,192 × 4,096 hidden, V = 128,256, JSD β = 0.5): our fused
  path, the unfused matmul + loss, TRL, Liger's fused-linear JSD (both of its implementations), and the four
  matmuls alone. The suite also runs on CPU (Triton under ``TRITON_INTERPRET=1``) with tiny shapes, which is
  how the tests exercise it.

Memory
------
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the call.
- CPU: the process's resident-set high-water mark (``VmHWM`` of ``/proc/self/status``, reset before each
  call by writing ``5`` to ``/proc/self/clear_refs``) minus the resident set before the call. tracemalloc
  does not see torch's allocations. So that freed buffers really leave the resident set (and a later call
  cannot hide its buffers in memory malloc kept from an earlier one), glibc's mmap threshold is fixed at
  1 MiB (``mallopt(M_MMAP_THRESHOLD)``): every tensor ≥ 1 MiB is its own mapping, returned on free. glibc
  does the same by default for buffers ≥ 32 MiB, i.e. for every full-size logits buffer here.
- The "extra" includes the student's gradient, one logits-sized tensor the caller must hold anyway unless it
  is written over the logits (``in place`` rows); ``beyond grad`` subtracts it.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# memory probes
# ----------------------------------------------------------------------------------------------------------
_M_MMAP_THRESHOLD = -3


def _fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except OSError:
        return False


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak extra bytes allocated while the context is open (CUDA allocator or CPU resident set)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra = 0
        self.method = (
            "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "RSS high-water (VmHWM after /proc/self/clear_refs), glibc mmap threshold 1 MiB"
        )

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.extra = _status_kib("VmHWM") * 1024 - self._base
        return False


# ----------------------------------------------------------------------------------------------------------
# the objectives benchmark
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    vocab: int
    name: str
    chunk: int | str | None
    times: list[float]
    extra: int
    value: float
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _trl_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for mod in ("trl.experimental.gkd.gkd_trainer", "trl.trainer.gkd_trainer", "trl"):
        try:
            module = __import__(mod, fromlist=["GKDTrainer"])
            return module.GKDTrainer.generalized_jsd_loss
        except Exception:  # ImportError, AttributeError, or a broken optional dependency
            continue
    return None


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {_status_meminfo_gib():.0f} GiB RAM"
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}{mem}"


def _status_meminfo_gib() -> float:
    with open("/proc/meminfo") as fh:
        return int(fh.readline().split()[1]) / 2**20


def _measure(fn, student, device, repeats: int, budget_s: float, before=None,
             holders=()) -> tuple[list[float], int, float]:
    """Run ``fn()`` (returns the loss) + backward up to ``repeats`` times; stop early past ``budget_s``.

    ``before()`` runs before each call, outside the timed and measured window (restores logits that an
    in-place case overwrote); the ``.grad`` of ``student`` and of ``holders`` is dropped after each call.
    """
    times, peak, value = [], 0, float("nan")
    start = time.perf_counter()
    tensors = (student, *holders)
    for _ in range(repeats):
        for x in tensors:
            x.grad = None
        if before is not None:
            before()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            value = float(loss.detach())
            del loss
            for x in tensors:
                x.grad = None
        peak = max(peak, mem.extra)
        if time.perf_counter() - start > budget_s:
            break
    return times, peak, value


def bench_objectives(args) -> str:
    """The CPU suite (see the module docstring)."""
    import harness.objectives as O
    from harness.objectives import wrapper as W

    device = torch.device(args.device)
    if device.type == "cpu":
        _fix_mmap_threshold()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or "float32"
    ]
    positions = args.positions or ([8192] if device.type == "cuda" else [512, 256])
    if len(positions) == 1:
        positions = positions * len(args.vocab)
    if len(positions) != len(args.vocab):
        raise SystemExit("--positions takes one value, or one per --vocab")
    ids = args.ids or O.available()
    trl_jsd = None if args.no_trl else _trl_jsd()
    trl_version = "not installed"
    if trl_jsd is not None:
        import trl

        trl_version = trl.__version__
    elif not args.no_trl:
        print("trl not importable: the × TRL column is left out", file=sys.stderr)

    load_before = _load()
    rows: list[Row] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for vocab, n in zip(args.vocab, positions):
        student = (2.0 * torch.randn(n, vocab, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)
        teacher = (2.0 * torch.randn(n, vocab, generator=gen)).to(device=device, dtype=dtype)
        labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
        backup = student.detach().clone()  # in-place cases overwrite the logits: restored before each call
        ones = torch.ones(n, device=device)

        def restore():
            with torch.no_grad():
                student.copy_(backup)

        cases = [("cross_entropy (torch)", None, lambda: F.cross_entropy(student.float(), labels)
                  if dtype != torch.float32 else F.cross_entropy(student, labels), "")]
        if trl_jsd is not None:
            # TRL's own path, as GKDTrainer calls it: [B, T, V] with labels (all positions valid here)
            cases.append(("TRL generalized_jsd_loss β=0.5", None,
                          lambda: trl_jsd(student.unsqueeze(0), teacher.unsqueeze(0), labels=labels.unsqueeze(0),
                                          beta=0.5), ""))
        for name in ids:
            obj = O.get(name)
            kw = {"labels": labels} if name == "ce" else {}
            tch = None if name == "ce" else teacher
            batchwise = O.spec(name).kind == "batch"
            chunks = [None] if batchwise else [None, args.chunk_size]
            for chunk in chunks:
                note = ""
                if batchwise:
                    cap = obj.params.get("max_positions")
                    note = f"batch-wise, default cap max_positions={cap} of {n}; chunking n/a"
                cases.append((name, chunk, (lambda obj=obj, tch=tch, kw=kw, chunk=chunk:
                                            obj(student, tch, chunk_size=chunk, **kw)), note))
            if not batchwise:  # chunked, the gradient written over the logits (wrapper-level option)
                fn = W._nll if name == "ce" else obj.spec.fn
                tgt = labels[:, None] if name == "ce" else teacher
                cases.append((name, f"{args.chunk_size} in place", (
                    lambda fn=fn, tgt=tgt, params=({} if name == "ce" else obj.params):
                    W.reduce_per_position(fn, student, tgt, ones, params, temperature=1.0, reduction="mean",
                                          chunk_size=args.chunk_size, normalizer=None, kernel="torch",
                                          inplace=True)), ""))

        # warm-up on a small slice (first-call costs), not at full size: full-size calls take seconds here
        small_s = student.detach()[:8].clone().requires_grad_(True)
        for name in ids:
            kw = {"labels": labels[:8]} if name == "ce" else {}
            O.get(name)(small_s, None if name == "ce" else teacher[:8], **kw).backward()
        F.cross_entropy(small_s.float(), labels[:8]).backward()
        if trl_jsd is not None:
            trl_jsd(small_s[None], teacher[None, :8], labels=labels[None, :8]).backward()

        for name, chunk, fn, note in cases:
            repeats = 1 if "batch-wise" in note else args.repeats
            inplace = isinstance(chunk, str)
            times, extra, value = _measure(fn, student, device, repeats, args.case_budget,
                                           before=restore if inplace else None)
            if inplace:
                restore()
            rows.append(Row(vocab, name, chunk, times, extra, value, note))
            print(f"V={vocab} N={n} {name:32s} chunk={chunk!s:5s} {statistics.median(times)*1e3:10.1f} ms "
                  f"extra {extra / 2**20:9.1f} MiB  value {value:.6f}  (n={len(times)})", file=sys.stderr)
        restore()
        del student, teacher, backup

    load = f"{load_before} before, {_load()} after"
    return _render(rows, args, device, dtype, dict(zip(args.vocab, positions)), trl_version,
                   PeakMemory(device).method, load)


# ----------------------------------------------------------------------------------------------------------
# the GPU suite: Triton kernels against eager PyTorch, torch.compile, TRL and Liger
# ----------------------------------------------------------------------------------------------------------
@dataclass
class KRow:
    objective: str
    impl: str
    times: list[float]
    extra: int
    value: float
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


class _Seeded:
    """Backward of a non-scalar output with a fixed incoming gradient (the matmuls-alone reference)."""

    def __init__(self, out, grad):
        self.out, self.grad = out, grad

    def backward(self):
        self.out.backward(self.grad)

    def detach(self):
        return torch.zeros(())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _floor_time(a: torch.Tensor, b: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median time of ``torch.add(a, b, out=c)``: reads both logits once and writes one logits-sized tensor."""
    out = torch.empty_like(a)
    with torch.no_grad():
        torch.add(a, b, out=out)
        times = []
        for _ in range(max(repeats, 3)):
            _sync(device)
            t0 = time.perf_counter()
            torch.add(a, b, out=out)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _liger() -> dict | None:
    try:
        import liger_kernel
        from liger_kernel.transformers import LigerFusedLinearJSD, LigerJSD, LigerKLDIVLoss, LigerTVDLoss
    except Exception:  # not installed, or no GPU backend
        return None
    found = {"version": getattr(liger_kernel, "__version__", "?"), "jsd": LigerJSD, "kldiv": LigerKLDIVLoss,
             "tvd": LigerTVDLoss, "fused_jsd": LigerFusedLinearJSD}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        found["chunked_jsd"] = LigerFusedLinearJSDLoss
    except Exception:
        pass
    return found


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


def _run_case(rows, objective, impl, fn, student, device, args, before=None, holders=(), note=""):
    """Warm up once (compilation, autotuning), then measure; a failure (e.g. out of memory) becomes a note."""
    try:
        for x in (student, *holders):
            x.grad = None
        if before is not None:
            before()
        loss = fn()
        loss.backward()
        del loss
        _sync(device)
        times, extra, value = _measure(fn, student, device, args.repeats, args.case_budget, before=before,
                                       holders=holders)
    except Exception as exc:  # noqa: BLE001 (a benchmark row, not a crash)
        for x in (student, *holders):
            x.grad = None
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(KRow(objective, impl, [], 0, float("nan"), f"{type(exc).__name__}: {str(exc)[:120]}"))
        print(f"{objective:5s} {impl:40s} FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
        return
    if before is not None:
        before()  # leave the inputs as found (an in-place case overwrote the logits)
    rows.append(KRow(objective, impl, times, extra, value, note))
    print(f"{objective:5s} {impl:40s} {statistics.median(times) * 1e3:10.2f} ms  extra {extra / 2**30:8.3f} GiB  "
          f"value {value:.6f}  (n={len(times)})", file=sys.stderr)


def bench_kernels(args) -> str:
    """The GPU suite (see the module docstring); on CPU it runs Triton under TRITON_INTERPRET=1."""
    import harness.objectives as O
    from harness.objectives import kernels as K
    from harness.objectives import wrapper as W
    from harness.objectives.fused import fused_linear_loss

    device = torch.device(args.device)
    if device.type == "cpu":
        _fix_mmap_threshold()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype or "bfloat16"]
    n, vocab = args.positions[0], args.vocab[0]
    ids = args.ids or [i for i in O.available() if O.spec(i).kind != "batch"]
    has_triton = K.triton_available() and (device.type == "cuda" or K.interpreting())
    passes = {}
    if has_triton:
        from harness.objectives.kernels import triton_divergence

        passes = triton_divergence.PASSES
    trl_jsd = None if args.no_trl else _trl_jsd()
    liger = None if args.no_liger else _liger()
    notes = []
    if not has_triton:
        notes.append("triton not usable here (not installed, or CPU without TRITON_INTERPRET=1): Triton rows left out")
    if liger is None:
        notes.append("liger-kernel not installed (or not importable here): Liger rows left out"
                     + (" (--no-liger)" if args.no_liger else ""))
    if trl_jsd is None:
        notes.append("TRL not importable: its rows left out" + (" (--no-trl)" if args.no_trl else ""))
    if args.no_compile:
        notes.append("torch.compile rows left out (--no-compile)")

    load_before = _load()
    rows: list[KRow] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    student = (2.0 * torch.randn(n, vocab, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = (2.0 * torch.randn(n, vocab, generator=gen)).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    ones = torch.ones(n, device=device)
    backup = student.detach().clone()

    def restore():
        with torch.no_grad():
            student.copy_(backup)

    floor = _floor_time(student.detach(), teacher, device, args.repeats)
    logits_bytes = student.numel() * student.element_size()

    for name in ids:
        spec = O.spec(name)
        params = dict(O.get(name).params)
        fn = W._nll if name == "ce" else spec.fn
        tgt = labels[:, None] if name == "ce" else teacher

        def call(kernel, inplace=False, fn=fn, tgt=tgt, params=params, name=name):
            return W.reduce_per_position(fn, student, tgt, ones, {} if name == "ce" else params, temperature=1.0,
                                         reduction="mean", chunk_size=None, normalizer=None, kernel=kernel,
                                         inplace=inplace)

        if has_triton and K.kernel_id(fn) is not None:
            _run_case(rows, name, "triton", lambda call=call: call("triton"), student, device, args)
            _run_case(rows, name, "triton, in place", lambda call=call: call("triton", True), student, device, args,
                      before=restore)
            for programs in args.programs or ():  # persistent grids: fewer rows in flight (L2 reuse)
                def persistent(call=call, programs=programs):
                    before, triton_divergence.PROGRAMS = triton_divergence.PROGRAMS, programs
                    try:
                        return call("triton", True)
                    finally:
                        triton_divergence.PROGRAMS = before
                _run_case(rows, name, f"triton, in place, {programs} programs", persistent, student, device, args,
                          before=restore)
        _run_case(rows, name, "torch eager", lambda call=call: call("torch"), student, device, args)
        if not args.no_compile:
            if name == "ce":
                def formula(s, t):
                    return F.cross_entropy(s.float(), labels)
            else:
                def formula(s, t, fn=fn, params=params):
                    return fn(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1), **params).mean()
            compiled = torch.compile(formula)
            _run_case(rows, name, "torch.compile", lambda c=compiled: c(student, teacher), student, device, args)
        if name == "jsd" and params.get("beta") == 0.5:
            if trl_jsd is not None:
                _run_case(rows, name, "TRL generalized_jsd_loss", lambda: trl_jsd(
                    student[None], teacher[None], labels=labels[None], beta=0.5), student, device, args)
            if liger is not None:
                jsd = liger["jsd"](beta=0.5)
                _run_case(rows, name, "Liger LigerJSD (on log_softmax)", lambda: jsd(
                    torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1)),
                    student, device, args)
        if name == "fkl" and liger is not None:
            kld = liger["kldiv"](reduction="batchmean", log_target=True)
            _run_case(rows, name, "Liger LigerKLDIVLoss (on log_softmax)", lambda: kld(
                torch.log_softmax(student.float(), -1), torch.log_softmax(teacher.float(), -1)), student, device, args)
        if name == "tvd" and liger is not None:
            tvd = liger["tvd"](reduction="batchmean")
            _run_case(rows, name, "Liger LigerTVDLoss (on softmax)", lambda: tvd(
                torch.softmax(student.float(), -1), torch.softmax(teacher.float(), -1)), student, device, args)
    restore()
    del student, teacher, backup
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- fused LM head + loss --------------------------------------------------------------------------------
    fn_, hidden, fvocab = args.fused_shape
    frows: list[KRow] = []
    hs = (torch.randn(fn_, hidden, generator=gen) / 2).to(device=device, dtype=dtype).requires_grad_(True)
    ws = (torch.randn(fvocab, hidden, generator=gen) / hidden ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    ht = (torch.randn(fn_, hidden, generator=gen) / 2).to(device=device, dtype=dtype)
    wt = (torch.randn(fvocab, hidden, generator=gen) / hidden ** 0.5).to(device=device, dtype=dtype)
    flabels = torch.randint(0, fvocab, (fn_,), generator=gen).to(device)
    fones = torch.ones(fn_, device=device)
    seed_grad = torch.randn(fn_, fvocab, generator=gen).to(device=device, dtype=dtype) * 1e-6

    def matmuls():
        with torch.no_grad():
            zt = ht @ wt.t()
        del zt
        return _Seeded(hs @ ws.t(), seed_grad)

    _run_case(frows, "-", "the two head matmuls + their backward", matmuls, hs, device, args, holders=(ws,))
    del seed_grad
    for name in args.fused_ids:
        params = dict(O.get(name).params)
        fn = W._nll if name == "ce" else O.spec(name).fn
        for kernel in (["triton"] if has_triton else []) + ["torch"]:
            _run_case(frows, name, f"ours fused ({kernel})", lambda name=name, kernel=kernel: fused_linear_loss(
                name, hs, ws, ht, wt, labels=flabels, kernel=kernel), hs, device, args, holders=(ws,))
        for kernel in (["triton"] if has_triton else []) + ["torch"]:
            def unfused(kernel=kernel, fn=fn, params=params, name=name):
                with torch.no_grad():
                    zt = flabels[:, None] if name == "ce" else ht @ wt.t()
                return W.reduce_per_position(fn, hs @ ws.t(), zt, fones, {} if name == "ce" else params,
                                             temperature=1.0, reduction="mean", chunk_size=None, normalizer=None,
                                             kernel=kernel, inplace=kernel == "triton")
            label = "matmul + our kernel (in place)" if kernel == "triton" else "matmul + eager torch"
            _run_case(frows, name, label, unfused, hs, device, args, holders=(ws,))
        if name == "jsd" and params.get("beta") == 0.5:
            if trl_jsd is not None:
                def trl_unfused():
                    with torch.no_grad():
                        zt = ht @ wt.t()
                    return trl_jsd((hs @ ws.t())[None], zt[None], labels=flabels[None], beta=0.5)
                _run_case(frows, name, "matmul + TRL generalized_jsd_loss", trl_unfused, hs, device, args,
                          holders=(ws,))
            if liger is not None:
                fused_jsd = liger["fused_jsd"](jsd_beta=0.5)
                _run_case(frows, name, "Liger LigerFusedLinearJSD", lambda: fused_jsd(hs, ws, ht, wt, None),
                          hs, device, args, holders=(ws,))
                if "chunked_jsd" in liger:
                    chunked = liger["chunked_jsd"](weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5)
                    _run_case(frows, name, "Liger chunked LigerFusedLinearJSDLoss", lambda: chunked(
                        hs, ws, ht, wt, flabels), hs, device, args, holders=(ws,))
    del hs, ws, ht, wt

    load = f"{load_before} before, {_load()} after"
    return _render_kernels(rows, frows, args, device, dtype, n, vocab, floor, logits_bytes, passes, liger, notes,
                           load)


def _render_kernels(rows, frows, args, device, dtype, n, vocab, floor, logits_bytes, passes, liger, notes,
                    load) -> str:
    cmd = "python -m harness.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    gib = 2**30
    fn_, hidden, fvocab = args.fused_shape
    lines = [
        f"# Objectives: loss kernels ({device.type})",
        "",
        f"- command: `{cmd}`",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {_machine(device)}; load average (1/5/15 min): {load}",
        f"- python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
        f"trl {_version('trl')}, liger-kernel {liger['version'] if liger else 'not installed'}",
        f"- logits: student and teacher `[{n:,}, {vocab:,}]` {str(dtype).replace('torch.', '')}, N(0, 2²) random, "
        f"every position counted, τ = 1, default parameters; one logits tensor = {logits_bytes / gib:.3f} GiB",
        f"- floor: {floor * 1e3:.3f} ms = `torch.add(student, teacher, out=buffer)` (reads both logits once, writes "
        f"one logits-sized tensor: {3 * logits_bytes / floor / 1e9:,.0f} GB/s), timed in this run; memory floor: "
        "the gradient (1 × logits), or 0 in place",
        f"- time: median of up to {args.repeats} timed fwd+bwd calls (n) after one full-size warm-up call "
        "(compilation, autotuning); memory: "
        + PeakMemory(device).method + "; 'extra' includes the student gradient unless written in place",
        "- targets (shared/design/performance.md): every per-token objective ≤ 2 × floor and extra ≤ 0.1 × one "
        "logits tensor; fused head + loss ≤ 60 ms and ≤ 1 GB extra in the fused setting",
        "- passes: reads of the vocabulary per position by the Triton kernel (akl: 3 full + 7 teacher-only)",
        *(f"- {note}" for note in notes),
        "",
        f"## Per-token objectives, N = {n:,}, V = {vocab:,}",
        "",
        "| objective | implementation | passes | fwd+bwd ms | n | × floor | × eager | × compile | extra GiB "
        "| extra × logits | value | Δ value vs eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r.objective for r in rows):
        vr = [r for r in rows if r.objective == name]
        eager = next((r for r in vr if r.impl == "torch eager" and r.times), None)
        comp = next((r for r in vr if r.impl == "torch.compile" and r.times), None)
        for r in vr:
            if not r.times:
                lines.append(f"| {name} | {r.impl} | | | | | | | | | | {r.note} |")
                continue
            ratio = (lambda ref: f"{r.median / ref.median:.2f}" if ref else "")
            delta = f"{abs(r.value - eager.value):.1e}" if eager else ""
            lines.append(
                f"| {name} | {r.impl} | {passes.get(name, '') if r.impl.startswith('triton') else ''} | "
                f"{r.median * 1e3:,.2f} | {len(r.times)} | {r.median / floor:.2f} | {ratio(eager)} | {ratio(comp)} | "
                f"{r.extra / gib:,.3f} | {r.extra / logits_bytes:.2f} | {r.value:.6f} | {delta} |"
            )
    f_logits = fn_ * fvocab * torch.tensor([], dtype=dtype).element_size()
    mm = next((r for r in frows if r.objective == "-" and r.times), None)
    lines += [
        "",
        f"## Fused LM head + loss, N = {fn_:,}, H = {hidden:,}, V = {fvocab:,} (one logits tensor = "
        f"{f_logits / gib:.3f} GiB; the weight gradient alone = {fvocab * hidden * torch.tensor([], dtype=dtype).element_size() / gib:.3f} GiB)",
        "",
        "| objective | implementation | fwd+bwd ms | n | × matmuls | extra GiB | extra GB | value |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in frows:
        if not r.times:
            lines.append(f"| {r.objective} | {r.impl} | | | | | | {r.note} |")
            continue
        lines.append(
            f"| {r.objective} | {r.impl} | {r.median * 1e3:,.2f} | {len(r.times)} | "
            f"{(r.median / mm.median) if mm else float('nan'):.2f} | {r.extra / gib:,.3f} | {r.extra / 1e9:,.3f} | "
            f"{'' if r.objective == '-' else f'{r.value:.6f}'} |"
        )
    lines.append("")
    return "\n".join(lines)


def _chunk_elements() -> int:
    from harness.objectives import wrapper

    return wrapper.CHUNK_ELEMENTS


def _rows_per_chunk(chunk, vocab, n) -> int:
    from harness.objectives import wrapper

    return wrapper.rows_per_chunk(chunk, vocab, n)


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _render(rows, args, device, dtype, positions, trl_version, mem_method, load) -> str:
    cmd = "python -m harness.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"# Objectives: forward+backward cost ({device.type})",
        "",
        f"- command: `{cmd}`",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {_machine(device)}",
        f"- load average (1/5/15 min): {load} — other processes share these cores, so times are noisy; "
        "ratios are taken within one run",
        f"- python {platform.python_version()}, torch {torch.__version__}, trl {trl_version}",
        f"- logits: student and teacher `[N, V]` {str(dtype).replace('torch.', '')}, N(ormal)(0, 2²) random, "
        "every position counted (mask=None; CE and TRL get all-valid labels); math in float32",
        "- positions per vocabulary: " + ", ".join(f"V={v:,}: N={n:,}" for v, n in positions.items())
        + (" (reduced from ~2,048 so the whole run fits ~10 minutes on this machine)" if device.type == "cpu"
           else ""),
        f"- time: median of up to {args.repeats} timed fwd+bwd calls after a warm-up on an 8-position slice; "
        f"a case stops repeating once it has used {args.case_budget:g} s (column n); batch-wise objectives "
        "run once",
        f"- memory: {mem_method}; 'extra' includes the student gradient (1 × logits); "
        "'beyond grad' = extra − one logits tensor (in-place rows hold no gradient buffer: beyond grad = extra)",
        f"- chunked rows: chunk_size={args.chunk_size}, capped at wrapper.CHUNK_ELEMENTS = "
        f"{_chunk_elements():,} logits per chunk ("
        + ", ".join(f"V={v:,}: {_rows_per_chunk(args.chunk_size, v, n)} positions" for v, n in positions.items())
        + "); 'in place' rows write the gradient over the student logits (`inplace=True`), restored before "
        "each call outside the measurement",
        "",
    ]
    has_trl = any(r.name.startswith("TRL") for r in rows)
    for vocab in dict.fromkeys(r.vocab for r in rows):
        vr = [r for r in rows if r.vocab == vocab]
        ce = next(r for r in vr if r.name.startswith("cross_entropy"))
        trl = next((r for r in vr if r.name.startswith("TRL")), None)
        n = positions[vocab]
        logits_bytes = n * vocab * (2 if dtype == torch.bfloat16 else 4)
        lines += [
            f"## V = {vocab:,}, N = {n:,} (one logits tensor = {logits_bytes / 2**20:,.0f} MiB)",
            "",
            "| objective | chunk | fwd+bwd ms | n | × CE | " + ("× TRL JSD | " if has_trl else "")
            + "extra MiB | extra × logits | beyond grad × logits | value |",
            "|---|---|---:|---:|---:|" + ("---:|" if has_trl else "") + "---:|---:|---:|---:|",
        ]
        for r in vr:
            cells = [
                r.name, "-" if r.chunk is None else str(r.chunk), f"{r.median * 1e3:,.1f}", str(len(r.times)),
                f"{r.median / ce.median:.2f}",
            ]
            if has_trl:
                cells.append(f"{r.median / trl.median:.2f}" if trl else "")
            cells += [
                f"{r.extra / 2**20:,.0f}", f"{r.extra / logits_bytes:.2f}",
                f"{(r.extra - (0 if isinstance(r.chunk, str) else logits_bytes)) / logits_bytes:.2f}",
                f"{r.value:.5f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        notes = sorted({r.note for r in vr if r.note})
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
        if trl is not None:
            jsd = next((r for r in vr if r.name == "jsd" and r.chunk is None), None)
            if jsd is not None:
                lines += ["", f"- value check at β = 0.5: ours jsd = {jsd.value:.6f}, TRL = {trl.value:.6f}"]
        lines.append("")
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------------
# start-up of each pipeline step (``python -m harness.bench startup``)
# ----------------------------------------------------------------------------------------------------------
STARTUP_DOC = """Start-up of each pipeline step: seconds from process start until the step is ready to work.

    python -m harness.bench startup [--config config/tiny.yaml] [--repeats 3] [--out FILE]

Every Snakemake job is a fresh ``python -m harness.cli <step> ...`` process, so its imports are paid once per
job. For each step this runs that exact command with ``DISTILLBENCH_STARTUP_PROBE=1``
(:data:`harness.cli.PROBE_ENV`): the command parses its arguments, loads the suite (and, for ``distill`` and
``tune``, validates the plan and reads the recipe), imports what the step needs (:data:`harness.cli.STEP_MODULES`
plus the suite's model classes), prints ``ready <unix time>`` and exits before doing the step's work, so
nothing is written. Start-up = that time minus the time just before the process was spawned (interpreter
start included). ``--help``, ``recipes`` and ``objectives`` do all their work before exiting: their whole run
is timed. The median of ``--repeats`` runs is printed per step, with whether the step loaded torch, twice: the
step in its own process (``DISTILLBENCH_WORKER=0``) and through the warm worker the Snakefile uses on a CPU
(``DISTILLBENCH_WORKER=1``, :mod:`harness.forkserver`: the client connects, the worker forks a child that
already imported torch, transformers and lm-eval; the warm-up run starts the worker).
"""

#: the target of issue #18: a job's start-up, in seconds
TARGET_S = 1.5


def _commands(config: str, recipe: str, tuning: bool) -> list[tuple[str, list[str], bool]]:
    """(label, cli arguments, probed) per step; probed = stops at ready (else the whole run is timed)."""
    c = ["--config", config, "--threads", "1"]
    rows = [
        ("--help", ["--help"], False),
        ("data", ["data", *c], True),
        ("tokenizer", ["tokenizer", *c], True),
        ("teacher", ["teacher", *c], True),
        ("student-init", ["student-init", *c, "--seed", "1"], True),
        ("teacher-cache", ["teacher-cache", *c], True),
        (f"distill ({recipe})", ["distill", *c, "--recipe", recipe, "--seed", "1"], True),
    ]
    if tuning:
        rows.append((f"tune ({recipe})", ["tune", *c, "--recipe", recipe], True))
    rows += [
        ("evaluate (teacher)", ["evaluate", *c, "--target", "teacher"], True),
        ("leaderboard", ["leaderboard", *c], True),
        ("publish", ["publish", *c], True),
        ("status", ["status", *c], True),
        ("check", ["check", *c], True),
        ("recipes", ["recipes"], False),
        ("objectives", ["objectives"], False),
    ]
    return rows


def time_command(args: list[str], probed: bool, worker: bool = False) -> tuple[float, bool | None]:
    """(seconds from spawn to ready — or to exit when not probed, whether torch was loaded or None); with
    ``worker``, the step runs in the warm worker (:mod:`harness.forkserver`)."""
    from .cli import PROBE_ENV
    from .forkserver import ENV as WORKER_ENV

    env = {**os.environ, PROBE_ENV: "1" if probed else "", WORKER_ENV: "1" if worker else "0"}
    env.pop("OMP_NUM_THREADS", None)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "harness.cli", "--no-progress", *args], env=env,
                         capture_output=True, text=True)
    end = time.time()
    if not probed:
        if out.returncode != 0:
            raise RuntimeError(f"harness.cli {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
        return end - t0, None
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ready ")), None)
    if line is None:
        raise RuntimeError(f"harness.cli {' '.join(args)} never got ready (exit {out.returncode}): "
                           f"{(out.stderr or out.stdout).strip()[-500:]}")
    fields = line.split()
    return float(fields[1]) - t0, fields[2] == "torch=yes"


def bench_startup(args) -> str:
    """The ``startup`` benchmark (see :data:`STARTUP_DOC`): the Markdown report."""
    from .suite import load_suite

    suite = load_suite(args.config)
    names = list(suite.recipe_names or []) or sorted(p.stem for p in Path(suite.recipes_dir).glob("*.yaml"))
    recipe = args.recipe or ("fkl" if "fkl" in names else names[0])
    rows = []
    for label, cli_args, probed in _commands(args.config, recipe, bool(suite.tuning)):
        medians, torch_loaded = [], None
        for worker in (False, True):
            time_command(cli_args, probed, worker)  # warm-up: file-system caches (and the worker's start)
            times = []
            for _ in range(args.repeats):
                t, loaded = time_command(cli_args, probed, worker)
                times.append(t)
                torch_loaded = loaded if not worker else torch_loaded  # the step's own need (the worker has it)
            medians.append((statistics.median(times), min(times)))
        rows.append((label, *medians[0], *medians[1], torch_loaded, probed))
        print(f"{label:24s} {medians[0][0]:6.2f} s; warm worker {medians[1][0]:6.2f} s", file=sys.stderr,
              flush=True)
    try:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    lines = [
        "# Start-up per pipeline step",
        "",
        f"- command: `python -m harness.bench startup --config {args.config} --repeats {args.repeats}`",
        f"- seconds from spawning `python -m harness.cli <step> ...` to the step being ready (imports done, "
        f"suite loaded; see STARTUP_DOC in harness/bench.py); median and min of {args.repeats} runs after a warm-up",
        "- own process: `DISTILLBENCH_WORKER=0`; warm worker: `DISTILLBENCH_WORKER=1`, as the Snakefile runs steps "
        "on a CPU (harness/forkserver.py)",
        f"- target: <= {TARGET_S} s per job; load average (1/5/15 min): {load} (other processes share the cores)",
        "",
        "| step | own process: start-up s (median) | min s | warm worker: start-up s (median) | min s | "
        "torch loaded (own process) | warm worker <= target |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for label, med, lo, wmed, wlo, torch_loaded, probed in rows:
        what = label if probed else f"{label} (whole run)"
        flag = "—" if torch_loaded is None else ("yes" if torch_loaded else "no")
        lines.append(f"| {what} | {med:.2f} | {lo:.2f} | {wmed:.2f} | {wlo:.2f} | {flag} | "
                     f"{'yes' if wmed <= TARGET_S else 'NO'} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# a distillation step against the SFT step (``python -m harness.bench steps``)
# ----------------------------------------------------------------------------------------------------------
STEPS_DOC = """Cost of one cached-teacher off-policy distillation step against the bare SFT step of the same student.

    python -m harness.bench steps --config config/tiny.yaml --out results/tiny/bench-steps.md

The suite's student and teacher architectures (tiny ones, built here with random weights); batches of
``--batch`` of the suite's own first ``--examples`` training examples, encoded by its data and tokenizer steps
(run in a temporary directory), so lengths and the response share of the loss mask are those of its training
(``--batches suite``, the default), or sequences of exactly ``--length`` random token ids with a random prompt
length (``--batches synthetic``: about half of every sequence is response, a heavier share of the loss than
instruction data has). The teacher's log-probabilities are cached once with the
suite's ``teacher_cache`` settings (:func:`harness.teacher_cache.build_cache`), so a distillation step reads
them from the cache as a cached off-policy run does. Every objective then trains a fresh copy of the same
initial student through the real loop (:func:`harness.distill.train`: batch, cache lookup, forward, loss,
backward, clipping, AdamW) with the loss ``1.0 · objective`` at temperature 1; ``ce`` (SFT) is the same loop
without a teacher. One optimizer step = one micro-batch; the time of a step is the time between two
consecutive steps (``on_step``), as the process's CPU time (the ratio's basis: with one torch thread it is the
work done, and it is less disturbed than wall time by other processes on shared cores) and as wall time. The
first ``--warmup`` steps are dropped and the median of the next ``--steps`` is reported, with its ratio to the
``ce`` median of the same run, and the per-phase means (wall) from :class:`harness.distill.TrainResult`'s
timings (all steps, warm-up included).
"""

#: ratios above this are profiled (issue #18's threshold)
STEPS_FLAG_RATIO = 1.5
PHASES = ("teacher_forward_s", "student_forward_s", "loss_s", "student_backward_s", "optimizer_s")


def synthetic_examples(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    """``n`` encoded examples (``input_ids`` of exactly ``length`` ids in ``[3, vocab)``, ``prompt_len`` in
    ``[length // 6, length // 2]``), the format of :func:`harness.data.batching.encode`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    prompt = torch.randint(length // 6, length // 2 + 1, (n,), generator=g)
    return [{"input_ids": ids[i].tolist(), "prompt_len": int(prompt[i])} for i in range(n)]


def suite_examples(suite, n: int) -> tuple[list[dict], int, dict]:
    """The first ``n`` encoded training examples of ``suite`` as its pipeline encodes them (its data and
    tokenizer steps, run in a temporary directory: nothing under the suite's work directory is touched),
    the tokenizer's vocabulary size and special ids."""
    import dataclasses
    import tempfile

    from . import steps

    with tempfile.TemporaryDirectory(prefix="bench-steps-") as tmp:
        scratch = dataclasses.replace(suite, workdir=Path(tmp))
        steps.prepare_data(scratch)
        tok = steps.prepare_tokenizer(scratch)
        examples = steps.encoded_train(scratch)[:n]
    return examples, len(tok), {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                "pad_token_id": tok.pad_token_id}


def reference_batches(examples: list[dict], pad_id: int, batch_size: int, seed: int):
    """``next_batch(i)`` exactly as the pipeline builds it (:func:`harness.steps.reference_batches`, with
    ``example_ids``), for ``batch_size`` rows."""
    from types import SimpleNamespace

    from .steps import reference_batches as pipeline_batches

    return pipeline_batches(SimpleNamespace(training=SimpleNamespace(per_device_train_batch_size=batch_size)),
                            examples, pad_id, seed)


def time_steps(student, next_batch, cfg, objective: str, teacher_fn) -> tuple[list[float], list[float], dict]:
    """Per-step CPU and wall times of ``cfg.max_steps`` steps of the real loop, and the run's phase timings."""
    from .distill import train
    from .objectives import get

    stamps = [(time.process_time(), time.perf_counter())]
    result = train(student, next_batch, cfg, seed=0, objective=get(objective), kd_weight=1.0, temperature=1.0,
                   teacher_logits=None if objective == "ce" else teacher_fn, progress=False,
                   on_step=lambda step, res: stamps.append((time.process_time(), time.perf_counter())))
    cpu = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    wall = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    return cpu, wall, dict(result.timings)


def bench_steps(args) -> tuple[str, list[dict]]:
    """The ``steps`` benchmark (see :data:`STEPS_DOC`): the Markdown report and its rows."""
    import copy

    from .distill import TrainConfig
    from .models import build_tiny
    from .objectives import available, spec
    from .suite import load_suite
    from .teacher_cache import build_cache, cached_or_live

    suite = load_suite(args.config)
    torch.set_num_threads(args.threads)
    batch_size = args.batch or suite.training.per_device_train_batch_size
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if args.batches == "suite":
        examples, vocab, special = suite_examples(suite, args.examples)
        args.length = max(len(e["input_ids"]) for e in examples)
    else:
        vocab = args.vocab or suite.tokenizer["vocab_size"]
        examples = synthetic_examples(args.examples, args.length, vocab, seed=0)
    student0 = build_tiny(suite.student, vocab, seed=1, max_positions=args.length, special_ids=special)
    teacher = build_tiny(suite.teacher, vocab, seed=0, max_positions=args.length, special_ids=special)
    settings = suite.teacher_cache or {"mode": "exact", "top_k": 64, "samples": 64, "temperature": 1.0, "seed": 0,
                                       "dtype": "float16", "batch_size": 64}
    cache = build_cache(teacher, examples, 0, mode=settings["mode"], top_k=settings["top_k"],
                        samples=settings["samples"], temperature=settings["temperature"], seed=settings["seed"],
                        dtype=settings["dtype"], batch_size=settings["batch_size"], progress=False)
    teacher_fn = cached_or_live(cache, None)
    next_batch = reference_batches(examples, special["pad_token_id"], batch_size, seed=0)
    cfg = TrainConfig(max_steps=args.warmup + args.steps, per_device_train_batch_size=batch_size,
                      max_length=args.length, warmup_ratio=0.0, log_every=10**6, device="cpu")
    ids = args.ids or ["ce"] + [i for i in available() if i != "ce" and spec(i).kind != "labels"]
    rows = []
    for name in ids:
        try:
            cpu, wall, timings = time_steps(copy.deepcopy(student0), next_batch, cfg, name, teacher_fn)
        except Exception as exc:  # an objective that cannot train on cached off-policy batches: say why
            rows.append({"objective": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(f"{name:10s} skipped: {exc}", file=sys.stderr, flush=True)
            continue
        per_step = {k: timings.get(k, 0.0) / len(cpu) for k in PHASES}
        rows.append({"objective": name, "median_s": statistics.median(cpu[args.warmup:]),
                     "wall_s": statistics.median(wall[args.warmup:]), "n": len(cpu) - args.warmup, **per_step})
        print(f"{name:10s} {rows[-1]['median_s'] * 1e3:8.2f} ms/step (CPU)", file=sys.stderr, flush=True)
    return _render_steps(rows, args, suite, vocab, batch_size, settings), rows


def _render_steps(rows: list[dict], args, suite, vocab: int, batch_size: int, settings: dict) -> str:
    ce = next((r for r in rows if r["objective"] == "ce" and "median_s" in r), None)
    try:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    arch = ", ".join(f"{k} {suite.student[k]}" for k in ("arch", "n_layer", "n_embd", "n_head"))
    t_arch = ", ".join(f"{k} {suite.teacher[k]}" for k in ("arch", "n_layer", "n_embd", "n_head"))
    lines = [
        "# Distillation step vs SFT step (cached teacher, off-policy)",
        "",
        f"- command: `python -m harness.bench {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        f"- student: {arch}, vocabulary {vocab}; teacher (cached once, random weights): {t_arch}; cache "
        f"mode {settings['mode']}, {settings['dtype']}",
        (f"- batches of {batch_size} of the suite's own training examples (its data and tokenizer steps; first "
         f"{args.examples} examples, right-padded to the longest of each batch, ≤ {args.length} tokens; the loss "
         "mask covers the responses), " if args.batches == "suite" else
         f"- batch {batch_size} × {args.length} tokens (random ids; the response = the tokens after a random "
         "prompt length), ")
        + f"{args.threads} torch thread(s), {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}",
        f"- one step = harness.distill.train's optimizer step (batch + cache lookup + forward + loss + backward + "
        f"clip + AdamW); median of {args.steps} steps after {args.warmup} warm-up steps; phases: mean per step "
        "over all steps",
        f"- load average (1/5/15 min): {load} — the cores are shared, ratios are taken within one run",
        "",
        "| objective | CPU ms / step | × ce | wall ms / step | cache ms | fwd ms | loss ms | bwd ms | optim ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['objective']} (skipped: {r['error']}) | — | — | — | | | | | |")
            continue
        ratio = f"{r['median_s'] / ce['median_s']:.2f}" if ce else "—"
        lines.append(f"| {r['objective']} | {r['median_s'] * 1e3:.1f} | {ratio} | {r['wall_s'] * 1e3:.1f} | "
                     + " | ".join(f"{r[k] * 1e3:.1f}" for k in PHASES) + " |")
    flagged = [r["objective"] for r in rows if ce and "median_s" in r and r["median_s"] / ce["median_s"] > STEPS_FLAG_RATIO]
    lines += ["", f"- above {STEPS_FLAG_RATIO}× ce: {', '.join(flagged) if flagged else 'none'}"]
    return "\n".join(lines) + "\n"


def _steps_rows_json(argv: list[str], root: Path, out: Path) -> list[dict]:
    """Run ``python -m harness.bench steps <argv> --json out`` with ``harness`` imported from ``root``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               DISTILLBENCH_WORKER="0")
    subprocess.run([sys.executable, "-m", "harness.bench", "steps", *argv, "--json", str(out)], env=env, cwd=root,
                   check=True, stdout=subprocess.DEVNULL)  # cwd: `-m` puts it first on sys.path
    return [r for r in json.loads(out.read_text()) if "median_s" in r]


def _revision(root: Path, name: str, command: str) -> str:
    """The short hash of git revision ``name`` of the checkout at ``root``; a one-line exit when there is none."""
    rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", name], capture_output=True, text=True)
    if rev.returncode != 0:
        raise SystemExit(f"bench {command}: --against {name!r} is not a git revision of {root} "
                         f"({rev.stderr.strip()}); name a commit, e.g. --against HEAD~1")
    return rev.stdout.strip()


def _extract(root: Path, rev: str, dest: Path, *paths: str) -> None:
    """``paths`` of revision ``rev`` (``git archive``) written under ``dest``."""
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, *paths], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def bench_steps_against(args, argv: list[str]) -> str:
    """The ``steps`` benchmark of this checkout and of the harness at ``args.against`` (a git revision), run
    alternately ``args.rounds`` times by this file's measurement code (copied next to that revision's package),
    so that both see the same machine state: on these shared cores whole runs of the same code differed by up to a
    third, alternated runs by a few percent."""
    import tempfile

    root = Path(__file__).resolve().parents[1]
    rev = _revision(root, args.against, "steps")
    passthrough, skip = [], False
    for a in argv:  # the same options less these (and their values); the suite file by absolute path
        if skip or a.split("=")[0] in ("--against", "--rounds", "--out", "--json", "--config"):
            skip = not skip and "=" not in a
            continue
        passthrough.append(a)
    passthrough += ["--config", str(Path(args.config).resolve())]
    with tempfile.TemporaryDirectory(prefix="bench-against-") as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        _extract(root, rev, old, "harness")
        (old / "harness" / "bench.py").write_text(Path(__file__).read_text())
        runs: dict[str, list[dict]] = {"this": [], rev: []}
        for k in range(args.rounds):
            for label, where in (("this", root), (rev, old)):
                rows = _steps_rows_json(passthrough, where, Path(tmp) / "rows.json")
                runs[label].append({r["objective"]: r for r in rows})
                print(f"round {k + 1}/{args.rounds}: {label} done", file=sys.stderr, flush=True)
    names = [n for n in runs["this"][0] if all(n in r for rs in runs.values() for r in rs)]
    lines = [
        f"# Distillation steps: this checkout against {rev}",
        "",
        f"- command: `python -m harness.bench {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        f"- the `steps` benchmark ({' '.join(passthrough[:-2] + ['--config', args.config])}) run {args.rounds}× for "
        "each, alternately, "
        "by the same measurement code; CPU ms per optimizer step (median of its steps), min–max over the rounds; "
        "ratio = median over rounds of this / that",
        "",
        f"| objective | this: CPU ms / step | {rev}: CPU ms / step | this / {rev} | this: optim ms | {rev}: optim ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        a = [r[n]["median_s"] * 1e3 for r in runs["this"]]
        b = [r[n]["median_s"] * 1e3 for r in runs[rev]]
        oa = statistics.median(r[n]["optimizer_s"] * 1e3 for r in runs["this"])
        ob = statistics.median(r[n]["optimizer_s"] * 1e3 for r in runs[rev])
        lines.append(f"| {n} | {min(a):.1f}–{max(a):.1f} | {min(b):.1f}–{max(b):.1f} | "
                     f"{statistics.median(x / y for x, y in zip(a, b)):.2f} | {oa:.1f} | {ob:.1f} |")
    return "\n".join(lines) + "\n"

# ----------------------------------------------------------------------------------------------------------
# whole training runs against another revision (``python -m harness.bench runs``)
# ----------------------------------------------------------------------------------------------------------
RUNS_DOC = """Whole training runs of some recipes: this checkout against the harness and recipes of a git revision.

Each of ``--rounds`` rounds runs ``distill --recipe R --seed S`` for every recipe, first with this checkout, then
with the revision's ``harness/`` and ``recipes/`` (``git archive``), each side in a fresh work directory that links
the prerequisites of an existing one (``--workdir``, default the suite's: data, tokenizer, the primary teacher and
its cache, the student inits and the search's chosen learning rates, as ``make reproduce`` leaves them), so every
run trains and nothing is reused. Reported from each run's ``run.json``: the training loop's wall time, the time
spent generating and the responses drawn (student and teacher). The runs of a recipe are alternated so that both
sides see the same machine state; whole runs of the same code differed by up to a third between runs here."""

_LINKED = ("data", "tokenizer", "teacher", "student_init", "teacher_cache.json", "teacher_cache.pt")


def _run_costs(path: Path) -> dict:
    """Training wall time, time generating and responses drawn, from a run's ``run.json``."""
    record = json.loads(path.read_text())
    stats = record.get("mode_stats") or {}
    drawn = sum(int((stats.get(k) or {}).get("samples", 0)) for k in ("sampled", "teacher_sampled"))
    costs = record["costs"]
    return {"train_s": float(costs["train_time_s"]), "gen_s": float(costs.get("generation_s", 0.0)), "drawn": drawn}


def _against_workdir(args, command: str, needs) -> tuple[Path, str, dict, Path]:
    """This checkout's root, the short hash of revision ``args.against``, the suite file ``args.config`` (a dict) and
    its work directory (``args.workdir``, default the suite's), which must hold every path ``needs(suite)`` lists
    (relative to it): a one-line exit naming the first missing ones otherwise."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    rev = _revision(root, args.against, command)
    suite = yaml.safe_load(Path(args.config).read_text())
    work = (root / (args.workdir or suite.get("workdir") or f"work/{suite['suite']}")).resolve()
    missing = [name for name in needs(suite) if not (work / name).exists()]
    if missing:
        raise SystemExit(f"bench {command}: {work} lacks {', '.join(missing[:4])}; build it first (make reproduce, "
                         f"or snakemake --cores all --configfile {args.config}) or name another with --workdir")
    return root, rev, suite, work


def _side(tmp: Path, name: str, tree: Path, work: Path, suite: dict, recipes: list[str]) -> Path:
    """A fresh work directory ``tmp/work-name`` linking ``work``'s prerequisites, and its suite file (returned):
    the suite with that work directory and ``tree``'s recipes."""
    import yaml

    side = tmp / f"work-{name}"
    side.mkdir()
    for item in _LINKED:
        (side / item).symlink_to(work / item)
    for r in recipes:  # the chosen rate only: the search's runs would be reused instead of trained
        chosen = work / "tuning" / r / "chosen.json"
        if chosen.exists():
            (side / "tuning" / r).mkdir(parents=True)
            (side / "tuning" / r / "chosen.json").write_text(chosen.read_text())
    config = tmp / f"work-{name}.yaml"
    config.write_text(yaml.safe_dump({**suite, "workdir": str(side), "recipes_dir": str(tree / "recipes")}))
    return config


def _span(values: list, fmt: str | None = None) -> str:
    """``min–max`` of ``values`` (one number when they print the same); seconds with 1 decimal, 3 below 0.1 s."""
    show = (lambda v: fmt.format(v)) if fmt else (lambda v: f"{v:.1f}" if v >= 0.1 or v == 0 else f"{v:.3f}")
    low, high = show(min(values)), show(max(values))
    return low if low == high else f"{low}–{high}"


def bench_runs(args) -> str:
    """See :data:`RUNS_DOC`."""
    import shutil
    import tempfile

    import yaml

    root, rev, suite, work = _against_workdir(args, "runs", lambda suite: list(_LINKED) + [
        f"tuning/{r}/chosen.json" for r in args.recipes if suite.get("tuning")])
    costs: dict[str, dict[str, list[dict]]] = {"this": {}, rev: {}}
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        tmp = Path(tmp)
        (tmp / "rev").mkdir()
        _extract(root, rev, tmp / "rev", "harness", "recipes")
        trees = {"this": root, rev: tmp / "rev"}
        configs = {label: _side(tmp, "this" if label == "this" else "rev", tree, work, suite, args.recipes)
                   for label, tree in trees.items()}
        for k in range(args.rounds):
            for r in args.recipes:
                for label, tree in trees.items():
                    run_dir = Path(yaml.safe_load(configs[label].read_text())["workdir"]) / "runs" / r
                    shutil.rmtree(run_dir, ignore_errors=True)
                    # -P: the side's package (PYTHONPATH) rather than the working directory's; the working directory
                    # is this checkout, against which the work directory's relative paths resolve
                    cmd = [sys.executable, "-P", "-m", "harness.cli", "--no-progress", "distill", "--config",
                           str(configs[label]), "--threads", str(args.threads), "--recipe", r, "--seed", str(args.seed)]
                    env = dict(os.environ, PYTHONPATH=str(tree), DISTILLBENCH_WORKER="0")
                    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
                    if done.returncode != 0:
                        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                        raise SystemExit(f"bench runs: {label}'s {r} (seed {args.seed}) failed: {last}")
                    costs[label].setdefault(r, []).append(_run_costs(run_dir / f"seed{args.seed}" / "run.json"))
                    print(f"round {k + 1}/{args.rounds}: {r} {label}: {costs[label][r][-1]['train_s']:.1f} s",
                          file=sys.stderr, flush=True)
    shown = work.relative_to(root) if work.is_relative_to(root) else work
    lines = [
        f"# Training runs: this checkout against {rev}",
        "",
        f"- command: `python -m harness.bench {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        f"- suite {suite['suite']} ({args.config}), training seed {args.seed}, {args.threads} torch thread(s), "
        f"{platform.machine()}, torch {torch.__version__}; prerequisites linked from {shown}",
        f"- {args.rounds} round(s), the two sides alternated per recipe; train s: the training loop's wall time "
        "(run.json costs.train_time_s), generating s: the part spent sampling, drawn: responses sampled (student and "
        "teacher); min–max over the rounds; ratio: median over rounds of this / that",
        "",
        f"| recipe | this: train s | {rev}: train s | this / {rev} | this: generating s | {rev}: generating s | "
        f"this: drawn | {rev}: drawn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in args.recipes:
        a, b = costs["this"][r], costs[rev][r]
        ratio = statistics.median(x["train_s"] / y["train_s"] for x, y in zip(a, b))
        lines.append(f"| {r} | {_span([x['train_s'] for x in a])} | {_span([x['train_s'] for x in b])} | "
                     f"{ratio:.2f} | {_span([x['gen_s'] for x in a])} | {_span([x['gen_s'] for x in b])} | "
                     f"{_span([x['drawn'] for x in a], '{:,}')} | {_span([x['drawn'] for x in b], '{:,}')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# evaluate jobs against another revision (``python -m harness.bench evaluate``)
# ----------------------------------------------------------------------------------------------------------
EVALUATE_DOC = """Evaluate jobs: this checkout against the harness of a git revision, on the same trained students.

Each of ``--rounds`` rounds runs, for every target, the pipeline's evaluate step (``evaluate --target T`` over all
the suite's seeds, in its own process without the warm worker) first with this checkout, then with the revision's
``harness/`` (``git archive``), each side in a fresh work directory that links the data, tokenizer, primary teacher
and final runs of an existing one (``--workdir``; this checkout's own: its ``teacher.json`` names the teacher by a
path relative to the checkout that made it). Reported: the job's wall time (process start to exit, imports
included), the seconds its records give to evaluating the students (``eval_total_s`` summed over the seeds) and
their parts (sampling for ROUGE-L, lm-eval, model metrics), and whether both sides wrote the same metrics."""

_EVAL_LINKED = ("data", "tokenizer", "teacher", "runs")


def _eval_costs(records: list[Path]) -> dict:
    """Summed evaluation seconds (and parts) of one job's records, and their metrics (for the equality check)."""
    out = {"total": 0.0, "generation": 0.0, "lm_eval": 0.0, "model_metrics": 0.0, "metrics": []}
    for path in sorted(records):
        record = json.loads(path.read_text())
        costs = record.get("costs") or {}
        out["total"] += float(costs.get("eval_total_s", 0.0))
        for part in ("generation", "lm_eval", "model_metrics"):
            out[part] += float(costs.get(f"eval_{part}_s", 0.0))
        out["metrics"].append(record.get("metrics"))
    return out


def bench_evaluate(args) -> str:
    """See :data:`EVALUATE_DOC`."""
    import shutil
    import tempfile

    import yaml

    root, rev, suite, work = _against_workdir(args, "evaluate", lambda suite: list(_EVAL_LINKED) + [
        f"runs/{t}/seed{s}/run.json" for t in args.targets for s in suite.get("seeds") or [1]])
    seeds = suite.get("seeds") or [1]
    jobs: dict[str, dict[str, list[dict]]] = {"this": {}, rev: {}}
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        tmp = Path(tmp)
        (tmp / "rev").mkdir()
        _extract(root, rev, tmp / "rev", "harness")
        trees, configs = {"this": root, rev: tmp / "rev"}, {}
        for label in trees:
            side = tmp / f"work-{'this' if label == 'this' else 'rev'}"
            side.mkdir()
            for item in _EVAL_LINKED:
                (side / item).symlink_to(work / item)
            configs[label] = tmp / f"{side.name}.yaml"
            configs[label].write_text(yaml.safe_dump({**suite, "workdir": str(side)}))
        for k in range(args.rounds):
            for t in args.targets:
                for label, tree in trees.items():
                    side = Path(yaml.safe_load(configs[label].read_text())["workdir"])
                    shutil.rmtree(side / "records" / t, ignore_errors=True)
                    cmd = [sys.executable, "-P", "-m", "harness.cli", "--no-progress", "evaluate", "--config",
                           str(configs[label]), "--threads", str(args.threads), "--teacher-seed",
                           str((suite.get("teacher_seeds") or [0])[0]), "--target", t]
                    cmd += [a for s in seeds for a in ("--seed", str(s))]
                    env = dict(os.environ, PYTHONPATH=str(tree), DISTILLBENCH_WORKER="0")
                    start = time.perf_counter()
                    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
                    wall = time.perf_counter() - start
                    if done.returncode != 0:
                        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
                        raise SystemExit(f"bench evaluate: {label}'s {t} failed: {last}")
                    cost = {**_eval_costs(list((side / "records" / t).glob("seed*/*.json"))), "wall": wall}
                    jobs[label].setdefault(t, []).append(cost)
                    print(f"round {k + 1}/{args.rounds}: {t} {label}: job {wall:.1f} s, evaluating "
                          f"{cost['total']:.2f} s", file=sys.stderr, flush=True)
    shown = work.relative_to(root) if work.is_relative_to(root) else work
    lines = [
        f"# Evaluate jobs: this checkout against {rev}",
        "",
        f"- command: `python -m harness.bench {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        f"- suite {suite['suite']} ({args.config}), {len(seeds)} students a job (seeds {', '.join(map(str, seeds))}), "
        f"{args.threads} torch thread(s), {platform.machine()}, torch {torch.__version__}; students and teacher "
        f"linked from {shown}",
        f"- {args.rounds} round(s), the two sides alternated per target; job s: the evaluate process's wall time "
        "(imports included, no warm worker); evaluating s: the records' eval_total_s summed over the job's students, "
        "then its parts (sampling for ROUGE-L, lm-eval, model metrics), medians over the rounds; min–max over the "
        "rounds where two numbers; ratio: median over rounds of this / that; same metrics: every record's metrics "
        "equal on both sides in every round",
        "",
        f"| target | this: job s | {rev}: job s | this / {rev} | this: evaluating s | {rev}: evaluating s | "
        f"this / {rev} | this: sampling, lm-eval, model metrics s | {rev}: the same | same metrics |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in args.targets:
        a, b = jobs["this"][t], jobs[rev][t]
        parts = [" / ".join(f"{statistics.median(x[p] for x in side):.2f}"
                            for p in ("generation", "lm_eval", "model_metrics")) for side in (a, b)]
        same = all(x["metrics"] == y["metrics"] for x in a for y in b)
        lines.append(
            f"| {t} | {_span([x['wall'] for x in a])} | {_span([x['wall'] for x in b])} | "
            f"{statistics.median(x['wall'] / y['wall'] for x, y in zip(a, b)):.2f} | "
            f"{_span([x['total'] for x in a], '{:.2f}')} | {_span([x['total'] for x in b], '{:.2f}')} | "
            f"{statistics.median(x['total'] / y['total'] for x, y in zip(a, b)):.2f} | {parts[0]} | {parts[1]} | "
            f"{'yes' if same else 'no'} |")
    return "\n".join(lines) + "\n"


def _emit(text: str, out: str | None) -> int:
    """Print a report and, with ``--out``, also write it there."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("objectives", help="forward+backward time and memory of every objective")
    p.add_argument("--suite", choices=["cpu", "gpu"], default=None,
                   help="cpu: PyTorch dense/chunked vs CE and TRL; gpu: Triton kernels vs eager, torch.compile, TRL, "
                   "Liger, and the fused LM head (default: gpu on CUDA, cpu otherwise)")
    p.add_argument("--vocab", type=int, nargs="+", default=None,
                   help="vocabulary sizes (default: cpu suite 32000 151936, gpu suite 151936)")
    p.add_argument("--positions", type=int, nargs="+", default=None,
                   help="positions N, one value or one per --vocab (default: cpu suite 512 256, gpu suite 8192)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="logits dtype (default: float32 for the cpu suite, bfloat16 for the gpu suite)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default: cpu 3, gpu 10)")
    p.add_argument("--case-budget", type=float, default=6.0,
                   help="seconds after which a case stops repeating (at least one timed call)")
    p.add_argument("--ids", nargs="+", default=None,
                   help="objective ids (default: all registered; per-position ones and ce for the gpu suite)")
    p.add_argument("--fused-shape", type=int, nargs=3, default=[8192, 4096, 128256], metavar=("N", "H", "V"),
                   help="gpu suite: positions, hidden size and vocabulary of the fused LM-head rows")
    p.add_argument("--programs", type=int, nargs="+", default=None,
                   help="gpu suite: also time the in-place kernels with these persistent grid sizes (e.g. 132 264)")
    p.add_argument("--fused-ids", nargs="+", default=["jsd"], help="gpu suite: objectives of the fused rows")
    p.add_argument("--no-trl", action="store_true", help="leave TRL out even if installed")
    p.add_argument("--no-liger", action="store_true", help="leave Liger out even if installed")
    p.add_argument("--no-compile", action="store_true", help="gpu suite: leave the torch.compile rows out")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default; the suite's jobs use threads_per_job)")
    p.add_argument("--out", default=None, help="write the Markdown table here (default results/bench/objectives-<device>.md)")
    p = sub.add_parser("startup", help="start-up of each pipeline step (process start to ready)")
    p.add_argument("--config", default="config/tiny.yaml", help="suite file the steps are started with")
    p.add_argument("--recipe", default=None, help="recipe of the distill/tune rows (default: fkl, else the first)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per step (median reported)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p = sub.add_parser("steps", help="a cached-teacher distillation step / the SFT step, per objective")
    p.add_argument("--config", default="config/tiny.yaml", help="suite: student/teacher architectures, vocabulary, cache")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the suite's batch size)")
    p.add_argument("--batches", choices=["suite", "synthetic"], default="suite",
                   help="suite: the suite's own training examples (its lengths and response share); synthetic: "
                   "random ids of exactly --length tokens, about half of them response (a heavier loss share)")
    p.add_argument("--length", type=int, default=48, help="synthetic: tokens per sequence")
    p.add_argument("--vocab", type=int, default=None, help="synthetic: vocabulary size (default: the suite's)")
    p.add_argument("--examples", type=int, default=256, help="training examples (cached once)")
    p.add_argument("--warmup", type=int, default=5, help="steps dropped before timing")
    p.add_argument("--steps", type=int, default=30, help="timed steps per objective (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--ids", nargs="+", default=None, help="objectives (default: ce and every teacher objective)")
    p.add_argument("--against", default=None, metavar="REV",
                   help="also run the harness of git revision REV, alternately with this checkout, and compare")
    p.add_argument("--rounds", type=int, default=3, help="with --against: runs of each, alternated")
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)  # rows for --against
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p = sub.add_parser("runs", help="whole training runs of some recipes, this checkout against a git revision")
    p.add_argument("--config", default="config/tiny.yaml", help="suite whose work directory has the prerequisites")
    p.add_argument("--workdir", default=None, help="that work directory (default: the suite's, e.g. work/tiny)")
    p.add_argument("--recipes", nargs="+", default=["minillm", "distillm2"], help="recipes to train")
    p.add_argument("--seed", type=int, default=2, help="training seed (default 2: not the search's seed)")
    p.add_argument("--against", required=True, metavar="REV", help="git revision whose harness and recipes run too")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side per recipe, alternated")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the suite's jobs use threads_per_job)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p = sub.add_parser("evaluate", help="evaluate jobs on the same students, this checkout against a git revision")
    p.add_argument("--config", default="config/tiny.yaml", help="suite whose work directory has the trained students")
    p.add_argument("--workdir", default=None, help="that work directory (default: the suite's, e.g. work/tiny)")
    p.add_argument("--targets", nargs="+", default=["fkl", "distillm2"], help="recipes whose final runs are evaluated")
    p.add_argument("--against", required=True, metavar="REV", help="git revision whose harness runs too")
    p.add_argument("--rounds", type=int, default=3, help="jobs of each side per target, alternated")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the suite's jobs use threads_per_job)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    if args.what == "evaluate":
        return _emit(bench_evaluate(args), args.out)
    if args.what == "runs":
        return _emit(bench_runs(args), args.out)
    if args.what == "steps" and args.against:
        return _emit(bench_steps_against(args, list(sys.argv[2:] if argv is None else argv[1:])), args.out)
    if args.what == "steps":
        text, rows = bench_steps(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows))
        return _emit(text, args.out)
    if args.what == "startup":
        return _emit(bench_startup(args), args.out)
    gpu = (args.suite or ("gpu" if args.device == "cuda" else "cpu")) == "gpu"
    args.vocab = args.vocab or ([151936] if gpu else [32000, 151936])
    args.positions = args.positions or ([8192] if gpu else None)
    args.repeats = args.repeats or (10 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    text = bench_kernels(args) if gpu else bench_objectives(args)
    print(text)
    out = Path(args.out or f"results/bench/objectives-{args.device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
