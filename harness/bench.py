"""Micro-benchmarks of the harness (``python -m harness.bench objectives ...``).

``objectives``: forward+backward time and peak extra memory of every objective on random
``[positions, V]`` logits, as ratios to plain ``torch.nn.functional.cross_entropy`` and to TRL's
``GKDTrainer.generalized_jsd_loss`` (β = 0.5) measured in the same run, dense and chunked.

Memory
------
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the call.
- CPU: the process's resident-set high-water mark (``VmHWM`` of ``/proc/self/status``, reset before each
  call by writing ``5`` to ``/proc/self/clear_refs``) minus the resident set before the call. tracemalloc
  does not see torch's allocations. So that freed buffers really leave the resident set (and a later call
  cannot hide its buffers in memory malloc kept from an earlier one), glibc's mmap threshold is fixed at
  1 MiB (``mallopt(M_MMAP_THRESHOLD)``): every tensor ≥ 1 MiB is its own mapping, returned on free. glibc
  does the same by default for buffers ≥ 32 MiB, i.e. for every full-size logits buffer here.
- The "extra" includes the student's gradient, one logits-sized tensor the caller must hold anyway;
  ``beyond grad`` subtracts it.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import os
import platform
import shlex
import statistics
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
    chunk: int | None
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


def _measure(fn, student, device, repeats: int, budget_s: float) -> tuple[list[float], int, float]:
    """Run ``fn()`` (returns the loss) + backward up to ``repeats`` times; stop early past ``budget_s``."""
    times, peak, value = [], 0, float("nan")
    start = time.perf_counter()
    for _ in range(repeats):
        student.grad = None
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            value = float(loss.detach())
            del loss
            student.grad = None
        peak = max(peak, mem.extra)
        if time.perf_counter() - start > budget_s:
            break
    return times, peak, value


def bench_objectives(args) -> str:
    import harness.objectives as O

    device = torch.device(args.device)
    if device.type == "cpu":
        _fix_mmap_threshold()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
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
            times, extra, value = _measure(fn, student, device, repeats, args.case_budget)
            rows.append(Row(vocab, name, chunk, times, extra, value, note))
            print(f"V={vocab} N={n} {name:32s} chunk={chunk!s:5s} {statistics.median(times)*1e3:10.1f} ms "
                  f"extra {extra / 2**20:9.1f} MiB  value {value:.6f}  (n={len(times)})", file=sys.stderr)
        del student, teacher

    load = f"{load_before} before, {_load()} after"
    return _render(rows, args, device, dtype, dict(zip(args.vocab, positions)), trl_version,
                   PeakMemory(device).method, load)


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
        "'beyond grad' = extra − one logits tensor",
        f"- chunked rows: chunk_size={args.chunk_size}",
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
                f"{(r.extra - logits_bytes) / logits_bytes:.2f}", f"{r.value:.5f}",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("objectives", help="forward+backward time and memory of every objective")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--positions", type=int, nargs="+", default=None,
                   help="positions N, one value or one per --vocab (default: CPU 512 256, CUDA 8192)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="logits dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case-budget", type=float, default=6.0,
                   help="seconds after which a case stops repeating (at least one timed call)")
    p.add_argument("--ids", nargs="+", default=None, help="objective ids (default: all registered)")
    p.add_argument("--no-trl", action="store_true", help="leave TRL out even if installed")
    p.add_argument("--out", default=None, help="write the Markdown table here (default results/bench/objectives-<device>.md)")
    args = parser.parse_args(argv)

    text = bench_objectives(args)
    print(text)
    out = Path(args.out or f"results/bench/objectives-{args.device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
