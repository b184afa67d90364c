"""The suite's ``teacher_cache:`` section (:data:`CACHE_SCHEMA`), in a module without torch so that loading a
suite imports no torch; :mod:`harness.teacher_cache` (which builds and reads caches) re-exports it."""

from __future__ import annotations

from .schema import Field

#: storage dtypes of the cached log-probabilities (harness.teacher_cache.DTYPES maps them to torch dtypes)
DTYPE_NAMES = ("float16", "bfloat16", "float32")
MODES = ("exact", "sparse", "sampled")

#: the suite's ``teacher_cache:`` section
CACHE_SCHEMA = {
    "mode": Field((str,), "exact", choices=MODES,
                  help="exact: full rows; sparse: top-k + a flat tail (biased); sampled: k teacher samples "
                       "(unbiased for fkl only)"),
    "top_k": Field((int,), 64, ge=1, help="sparse: tokens kept per position"),
    "samples": Field((int,), 64, ge=1, le=65535,
                     help="sampled: tokens drawn (with replacement) from the teacher per position; the gradient "
                          "noise per position is (1 - sum p^2) / samples"),
    "temperature": Field((float,), 1.0, gt=0, le=100,
                         help="sampled: the teacher temperature the samples are drawn at; unbiased only for "
                              "loss terms with this same temperature (validation refuses others)"),
    "seed": Field((int,), 0, ge=0, help="sampled: seed of the draws (each position has its own stream)"),
    "dtype": Field((str,), "float16", choices=DTYPE_NAMES, help="storage dtype of the log-probabilities"),
    "batch_size": Field((int,), 64, ge=1, help="sequences per teacher forward while building the cache"),
}
