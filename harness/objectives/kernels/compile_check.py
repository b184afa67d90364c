"""Compile every Triton kernel variant for an NVIDIA architecture, on a machine without a GPU.

    python -m harness.objectives.kernels.compile_check            # bf16 logits with gradient, sm_90 (H100)
    python -m harness.objectives.kernels.compile_check --all      # also fp32/fp16 logits and no-gradient variants

Triton's NVIDIA backend and its bundled ``ptxas`` run without a device, so this catches what the CPU
interpreter cannot: type errors in loop-carried values, unsupported ops, register spills (``--verbose``
prints ptxas' register and spill counts). It does not run anything. Must run without ``TRITON_INTERPRET``.
Exit status: 0 all compiled, 1 some variant failed, 2 the backend is unavailable here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def variants(everything: bool = False):
    """(label, kernel, signature, constexprs, num_warps) for each kernel id, dtype and gradient flag."""
    from . import triton_divergence as TD

    dtypes = ("bf16", "fp16", "fp32") if everything else ("bf16",)
    grads = (True, False) if everything else (True,)
    common = {"n_rows": "i32", "stride_s": "i64", "stride_t": "i64", "stride_g": "i64", "V": "i32", "inv_tau": "fp32"}
    for dt in dtypes:
        for grad in grads:
            for name, kind in TD.KIND.items():
                sig = {"S": f"*{dt}", "T": f"*{dt}", "Y": "*i64" if name == "ce" else "*fp32", "G": f"*{dt}",
                       "W": "*fp32", "L": "*fp32", **common, "c1": "fp32", "c2": "fp32",
                       "KIND": "constexpr", "BLOCK": "constexpr", "WRITE_GRAD": "constexpr"}
                yield (f"{name} {dt} grad={grad}", TD._divergence_kernel, sig,
                       {"KIND": kind, "BLOCK": TD.BLOCK_CAP, "WRITE_GRAD": grad}, 16)
            sig = {"S": f"*{dt}", "T": f"*{dt}", "G": f"*{dt}", "W": "*fp32", "L": "*fp32", **common, "mu": "fp32",
                   "BLOCK": "constexpr", "SBLOCK": "constexpr", "K": "constexpr", "NPASS": "constexpr",
                   "WRITE_GRAD": "constexpr"}
            yield (f"akl {dt} grad={grad}", TD._akl_kernel, sig,
                   {"BLOCK": TD.BLOCK_CAP, "SBLOCK": TD.SEARCH_BLOCK, "K": TD.SEARCH_K, "NPASS": TD.SEARCH_PASSES,
                    "WRITE_GRAD": grad}, 16)


def _ptxas_report(ptx: str) -> str:
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for exe in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bindir, exe)
        if not os.path.exists(path):
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
            fh.write(ptx)
        try:
            out = subprocess.run([path, f"-arch=sm_{ARCH}a", "-v", fh.name, "-o", os.devnull],
                                 capture_output=True, text=True)
        finally:
            os.unlink(fh.name)
        if out.returncode == 0:
            return " | ".join(line.split("info    : ")[-1].strip() for line in out.stderr.splitlines()
                              if "registers" in line or "spill" in line)
    return "ptxas report unavailable"


ARCH = 90


def main(argv: list[str] | None = None) -> int:
    global ARCH
    parser = argparse.ArgumentParser(prog="python -m harness.objectives.kernels.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    parser.add_argument("--all", action="store_true", help="every dtype and the no-gradient variants")
    parser.add_argument("--verbose", action="store_true", help="print ptxas' register and spill counts")
    args = parser.parse_args(argv)
    ARCH = args.arch
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as exc:  # noqa: BLE001
        print(f"compile_check: triton unavailable ({exc})", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, kernel, sig, constexprs, warps in variants(args.all):
        try:
            compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=target,
                                      options={"num_warps": warps})
        except Exception as exc:  # noqa: BLE001
            message = str(exc)
            if "ptxas" in message and ("not found" in message or "No such file" in message):
                print(f"compile_check: the NVIDIA backend cannot compile here ({message[:200]})", file=sys.stderr)
                return 2
            failed += 1
            print(f"FAILED {label}: {type(exc).__name__}: {message[:4000]}")
            continue
        extra = f"  {_ptxas_report(compiled.asm['ptx'])}" if args.verbose else ""
        print(f"ok {label} (sm_{args.arch}, {len(compiled.asm['cubin'])} bytes of cubin){extra}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
