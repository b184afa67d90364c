"""Teacher-cache accuracy against storage: exact, sparse (top-k + flat tail) and sampled (RS-KD) caches.

    python -m harness.bench_cache --out results/bench/teacher-cache.md
    python -m harness.bench_cache scores --config config/tiny.yaml --workdir work/tiny \
        --out results/bench/teacher-cache-scores.md

Everything is built in-process, without the pipeline: tiny-suite data (:func:`harness.data.tiny.generate_tiny`,
short prompts), a tokenizer trained on it, a teacher with the tiny suite's architecture trained for a few
SFT steps (so that it is peaked like a real one) and a student with the tiny suite's student architecture
after a few SFT steps. On ``--batches`` reference batches, for the forward-KL objective (τ = 1, token mean)
it compares each cache's loss and its gradient with respect to the student's **parameters** to those
computed from the teacher's exact float32 log-probabilities:

- bytes per counted token of the stored tensors (:meth:`TeacherCache.bytes_per_position`);
- loss error |L_cache − L_exact| / L_exact;
- gradient cosine and relative L2 error ‖g_cache − g_exact‖ / ‖g_exact‖, averaged over batches;
- for ``sampled``: the same for one seed (averaged over ``--seeds`` seeds), and for the mean gradient over
  the seeds. If the estimator is unbiased, the mean's relative error falls like 1/sqrt(#seeds) (the single-
  seed error divided by sqrt(S)); a bias would leave a floor. The table prints that prediction next to it.

``scores``: the final scores of distillation runs trained on each cache (issue #17), through the pipeline's own
steps. It takes a finished suite work directory (data, tokenizer, primary teacher, initial students and the
search's ``tuning/fkl/chosen.json``) and, for each cache setting, makes a private work directory whose inputs are
links to it (the teacher's ``teacher.json`` is rewritten so that its ``source`` names the original teacher), a
suite with ``teacher_cache`` set to the setting, ``recipes: [fkl]``, no ``tuning`` and the searched learning rate,
then runs :func:`harness.steps.build_teacher_cache`, :func:`harness.steps.distill` per training seed and
:func:`harness.steps.evaluate`. The table gives the evaluation records' metrics, mean ± 95 % t-interval over
training seeds, and the primary metric's difference to the exact cache paired by seed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from .data import batching
from .data.tiny import generate_tiny
from .data.tokenizer import item_texts, train_tokenizer
from .distill import TrainConfig, train
from .models import build_tiny
from .objectives import get as get_objective
from .teacher_cache import build_cache

TEACHER = {"arch": "gpt2", "n_layer": 3, "n_embd": 128, "n_head": 4}  # config/tiny.yaml
STUDENT = {"arch": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2}


def _sft(model, examples, pad_id, steps, lr, seed):
    rng = torch.Generator().manual_seed(seed)

    def next_batch(i):
        idx = torch.randint(len(examples), (32,), generator=rng).tolist()
        return batching.collate([examples[j] for j in idx], pad_id)

    cfg = TrainConfig(max_steps=steps, per_device_train_batch_size=32, learning_rate=lr, log_every=steps)
    train(model, next_batch, cfg, seed=seed, objective=get_objective("ce"), progress=False)
    return model.eval()


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]).double()


def _ce_form(loss, teacher_rows, mask):
    """Cross-entropy −Σ p log q (token mean) from the fkl value: KL + H(target), H from the served rows."""
    lp = torch.log_softmax(teacher_rows.float(), -1)
    h = -(lp.exp() * lp.clamp_min(torch.finfo(lp.dtype).min)).sum(-1)
    m = mask > 0
    return float(loss) + float(h[m].mean())


def _compare(g, ref):
    cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
    return cos, float((g - ref).norm() / ref.norm())


def run(n_train=512, batches=8, batch_size=32, teacher_steps=300, student_steps=60, seeds=32,
        ks=(8, 32, 128), vocab_size=600, threads=1) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data = generate_tiny(0, n_train=n_train, n_valid=20, n_test=20, prompt_style="short")
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(item_texts(data["train"]), vocab_size, Path(tmp))
    examples = [batching.encode(tok, it, 40, 48) for it in data["train"]]
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    pad = tok.pad_token_id
    teacher = _sft(build_tiny(TEACHER, len(tok), 0, 64, special), examples, pad, teacher_steps, 4e-3, 0)
    student = _sft(build_tiny(STUDENT, len(tok), 1, 64, special), examples, pad, student_steps, 3e-3, 1)
    bench = examples[: batches * batch_size]
    n = len(bench)
    fkl = get_objective("fkl")

    caches = {"exact float32": build_cache(teacher, bench, pad, mode="exact", dtype="float32", progress=False),
              "exact float16": build_cache(teacher, bench, pad, mode="exact", dtype="float16", progress=False)}
    for k in ks:
        caches[f"sparse top-{k}"] = build_cache(teacher, bench, pad, mode="sparse", top_k=k, dtype="float16",
                                                progress=False)
    sampled = {k: [build_cache(teacher, bench, pad, mode="sampled", samples=k, seed=s, progress=False)
                   for s in range(seeds)] for k in ks}
    ref = caches["exact float32"]
    entropy = float(-(ref.logp.exp() * ref.logp).sum(-1).mean())
    top1 = float(ref.logp.max(-1).values.exp().mean())

    params = [p for p in student.parameters() if p.requires_grad]
    rows = {name: {"bytes": c.bytes_per_position(), "loss": [], "ce": [], "cos": [], "rel": []} for name, c in caches.items()}
    srows = {k: {"bytes": sampled[k][0].bytes_per_position(), "loss": [], "ce": [], "cos": [], "rel": [],
                 "mean_cos": [], "mean_rel": [], "mean_ce": []} for k in ks}
    for b in range(batches):
        ids = torch.arange(b * batch_size, min((b + 1) * batch_size, n))
        batch = batching.collate([bench[i] for i in ids.tolist()], pad)
        batch["example_ids"] = ids
        mask = batch["loss_mask"]
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_rows = ref.teacher_logits(batch)
        ref_loss = fkl(logits, ref_rows, mask)
        g_ref = _flat_grad(ref_loss, params)
        ref_ce = _ce_form(ref_loss.detach(), ref_rows, mask)
        ref_loss = float(ref_loss)
        for name, c in caches.items():
            t_rows = c.teacher_logits(batch)
            loss = fkl(logits, t_rows, mask)
            cos, rel = _compare(_flat_grad(loss, params), g_ref)
            r = rows[name]
            r["loss"].append(abs(float(loss) - ref_loss) / ref_loss)
            r["ce"].append(abs(_ce_form(loss.detach(), t_rows, mask) - ref_ce) / ref_ce)
            r["cos"].append(cos)
            r["rel"].append(rel)
        for k in ks:
            gs, losses, ces = [], [], []
            for c in sampled[k]:
                t_rows = c.teacher_logits(batch)
                loss = fkl(logits, t_rows, mask)
                gs.append(_flat_grad(loss, params))
                losses.append(float(loss))
                ces.append(_ce_form(loss.detach(), t_rows, mask))
            r = srows[k]
            single = [_compare(g, g_ref) for g in gs]
            r["loss"].append(sum(abs(x - ref_loss) for x in losses) / len(losses) / ref_loss)
            r["ce"].append(sum(abs(x - ref_ce) for x in ces) / len(ces) / ref_ce)
            r["mean_ce"].append(abs(sum(ces) / len(ces) - ref_ce) / ref_ce)
            r["cos"].append(sum(c for c, _ in single) / len(single))
            r["rel"].append(sum(e for _, e in single) / len(single))
            cos, rel = _compare(torch.stack(gs).mean(0), g_ref)
            r["mean_cos"].append(cos)
            r["mean_rel"].append(rel)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "rows": {k: {m: (mean(v) if isinstance(v, list) else v) for m, v in r.items()} for k, r in rows.items()},
        "sampled": {k: {m: (mean(v) if isinstance(v, list) else v) for m, v in r.items()} for k, r in srows.items()},
        "vocab": len(tok), "positions": ref.n_positions, "examples": n, "entropy": entropy, "top1": top1,
        "seeds": seeds, "batches": batches, "batch_size": batch_size, "seconds": time.perf_counter() - t0,
        "teacher_steps": teacher_steps, "student_steps": student_steps,
    }


def markdown(res: dict, command: str) -> str:
    s = res["seeds"]
    lines = [
        "# Teacher cache: storage against loss and gradient error (forward KL)",
        "",
        f"Generated by `{command}` ({_dt.date.today().isoformat()}, {platform.machine()}, torch {torch.__version__},"
        f" {res['seconds']:.0f} s). Module docstring: `harness/bench_cache.py`.",
        "",
        f"Setup: tiny-suite data (short prompts, {res['examples']} training examples, {res['positions']} counted "
        f"positions), tokenizer of {res['vocab']} tokens, teacher with the tiny suite's architecture after "
        f"{res['teacher_steps']} SFT steps (mean entropy {res['entropy']:.2f} nats, mean top-1 probability "
        f"{res['top1']:.2f}), student with the tiny suite's student architecture after {res['student_steps']} SFT "
        f"steps. Forward KL at τ = 1, token mean, over {res['batches']} batches of {res['batch_size']} sequences. "
        "The reference is the teacher's exact float32 log-probabilities; gradients are with respect to all "
        "student parameters. Errors are means over batches.",
        "",
        "| cache | bytes / token | KL value rel. error | CE-form rel. error | grad cosine | grad rel. L2 error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['bytes']:.0f} | {r['loss']:.2e} | {r['ce']:.2e} | {r['cos']:.5f} | {r['rel']:.2e} |")
    for k, r in res["sampled"].items():
        lines.append(f"| sampled k={k} (one seed, mean over {s}) | {r['bytes']:.0f} | {r['loss']:.2e} | "
                     f"{r['ce']:.2e} | {r['cos']:.5f} | {r['rel']:.2e} |")
    lines += [
        "",
        f"Unbiasedness of the sampled cache: the gradient averaged over {s} seeds. Unbiased ⇒ its error is the "
        f"one-seed error / sqrt({s}) (the prediction); a bias would leave a floor above it.",
        "",
        f"| cache | one seed: rel. L2 | mean of {s}: rel. L2 | prediction (unbiased) | mean of {s}: cosine | mean of {s}: CE-form rel. error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, r in res["sampled"].items():
        lines.append(f"| sampled k={k} | {r['rel']:.3e} | {r['mean_rel']:.3e} | {r['rel'] / math.sqrt(s):.3e} | "
                     f"{r['mean_cos']:.5f} | {r['mean_ce']:.2e} |")
    lines += [
        "",
        "KL value: the logged fkl loss, KL(p̂‖q). CE-form: −Σ p̂ log q = KL + H(p̂), the part whose gradient is "
        "the student's; for the sampled cache it is unbiased (its mean over seeds converges), the KL value is not.",
        "",
        "Notes",
        "- The loss *value* of a sampled cache is biased even though its gradient is not: fkl on the empirical "
        "distribution p̂ is CE(p̂, q) − H(p̂); the cross-entropy part is unbiased, H(p̂) underestimates H(p). "
        "Compare runs on their gradients / final scores, not on the logged KD loss.",
        "- The sparse cache is biased (its error does not fall with more data or seeds); its gradient error "
        "depends on how much mass the teacher puts outside the top-k.",
        "- Final scores of distillation runs trained on each cache: `python -m harness.bench_cache scores` "
        "(results/bench/teacher-cache-scores.md).",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- scores (#17)
#: the cache settings of ``scores``: ``exact:<dtype>``, ``sparse:<k>`` (top-k + flat tail), ``sampled:<k>`` (RS-KD)
SCORE_SETTINGS = ("exact:float16", "sparse:8", "sparse:32", "sampled:8", "sampled:32")
#: the recipe every cache is scored with: the one objective that every mode serves (see ``supported``)
SCORE_RECIPE = "fkl"


class MissingInputs(Exception):
    """The work directory is not a finished suite run (one line naming what is missing)."""


def parse_setting(text: str) -> tuple[str, str, dict]:
    """``exact:float16`` | ``sparse:<k>`` | ``sampled:<k>`` → (row label, directory name, ``teacher_cache`` section).

    >>> parse_setting("sparse:8")
    ('sparse top-8', 'sparse-top8', {'mode': 'sparse', 'top_k': 8, 'dtype': 'float16'})
    """
    from .cache_schema import DTYPE_NAMES

    mode, _, arg = text.strip().partition(":")
    if mode == "exact" and (arg or "float16") in DTYPE_NAMES:
        dtype = arg or "float16"
        return f"exact {dtype}", f"exact-{dtype}", {"mode": "exact", "dtype": dtype}
    if mode in ("sparse", "sampled") and arg.isdigit() and int(arg) >= 1:
        k = int(arg)
        if mode == "sparse":
            return f"sparse top-{k}", f"sparse-top{k}", {"mode": "sparse", "top_k": k, "dtype": "float16"}
        return f"sampled k={k}", f"sampled-k{k}", {"mode": "sampled", "samples": k, "seed": 0}
    raise ValueError(f"--caches: {text!r} is not a cache setting; accepted: exact:<float16|bfloat16|float32>, "
                     "sparse:<k>, sampled:<k> (k >= 1), comma-separated")


def required_inputs(suite, seeds) -> list[Path]:
    """What ``scores`` reads from a finished work directory of ``suite`` (its primary teacher's view)."""
    from .steps import eval_set_spec

    need = [suite.data_path("train"), suite.tokenizer_dir, suite.teacher_dir / "teacher.json"]
    if suite.cross_tokenizer:
        need.append(suite.student_tokenizer_dir)
    for spec in suite.evaluation["sets"]:
        path = eval_set_spec(suite, spec).get("path")
        if path and "split" in spec:  # the suite's own split: made by the data step
            need.append(Path(path))
    need += [suite.student_init_dir(s) / "config.json" for s in seeds]
    if suite.tuning:
        need.append(suite.chosen_path(SCORE_RECIPE))
    return need


def _absolute(value):
    """A path-valued ``teacher.json`` entry that exists, made absolute; anything else (a hub id) as it is."""
    return str(Path(value).resolve()) if isinstance(value, str) and value and Path(value).exists() else value


def private_workdir(source, root: Path) -> None:
    """``root``: a work directory whose data, tokenizer(s) and initial students are links to ``source.workdir``'s,
    with the primary teacher's ``teacher.json`` (its ``source`` made absolute: a teacher trained there is that
    directory) and nothing else."""
    from .io import read_json, write_json_atomic

    root.mkdir(parents=True)
    w = source.workdir
    for name in ("data", "tokenizer", "student_tokenizer", "student_init"):
        if (w / name).exists():
            (root / name).symlink_to((w / name).resolve(), target_is_directory=True)
    meta = read_json(source.teacher_dir / "teacher.json")
    meta["source"] = (str(source.teacher_dir.resolve()) if meta.get("trained_here")
                      else _absolute(meta.get("source")))
    if "tokenizer" in meta:
        meta["tokenizer"] = _absolute(meta["tokenizer"])
    (root / "teacher").mkdir()
    write_json_atomic(root / "teacher" / "teacher.json", meta)


def private_suite(source, root: Path, cache: dict, learning_rate: float, seeds):
    """The suite of one cache setting: ``source``'s, with ``workdir`` = ``root``, ``recipes: [fkl]`` (also the
    baseline), ``seeds``, the primary teacher only, ``teacher_cache`` = ``cache``, no ``tuning`` and
    ``training.learning_rate`` = the searched ``learning_rate``. Written to ``root/suite.yaml`` and loaded (and so
    validated) by :func:`harness.suite.load_suite`."""
    import yaml

    from .suite import load_suite

    raw = {k: v for k, v in source.raw.items() if k not in ("tuning", "origin")}
    raw.update(workdir=str(root), results=str(root / "results"), recipes_dir=str(source.recipes_dir.resolve()),
               recipes=[SCORE_RECIPE], baseline=SCORE_RECIPE, seeds=list(seeds),
               teacher_seeds=[source.teacher_seeds[0]], teacher_cache=dict(cache),
               training={**(raw.get("training") or {}), "learning_rate": float(learning_rate)})
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_suite(path)


def _final_loss(run: dict):
    curve = run.get("curve") or []
    return float(curve[-1][1]) if curve else None


def _cell(iv, digits: int, signed: bool = False) -> str:
    if iv.n == 0:
        return "—"
    m = f"{iv.mean:+.{digits}f}" if signed else f"{iv.mean:.{digits}f}"
    return m if iv.n < 2 else f"{m} ± {iv.half_width:.{digits}f}"


def summarise(settings: list[dict], metric: str, eval_set: str) -> list[dict]:
    """One table row per setting: means with 95 % t-intervals over seeds, and ``metric``'s difference to the first
    ``exact`` setting paired by seed (``n/a`` without one). Failed runs (no metrics) are left out and counted."""
    from .report.stats import mean_ci, paired_diff

    def per_seed(s, key):
        out = {}
        for seed, rec in s["records"][eval_set].items():
            v = rec.get("metrics", {}).get(key)
            if v is not None:
                out[seed] = float(v)
        return out

    ref = next((s for s in settings if s["cache"]["mode"] == "exact"), None)
    rows = []
    for s in settings:
        primary = per_seed(s, metric)
        runs = s["runs"].values()
        rows.append({
            "label": s["label"], "bytes": s["bytes_per_token"], "ok": len(primary), "n": len(s["runs"]),
            metric: mean_ci(primary.values()),
            "delta": paired_diff(primary, per_seed(ref, metric)) if ref is not None else None,
            **{k: mean_ci(per_seed(s, k).values()) for k in ("exact_match", "kl_to_teacher", "jsd_to_teacher")},
            "final_loss": mean_ci(_final_loss(r) for r in runs if r.get("status") == "ok"),
            "build_s": s["build_s"],
            "train_s": mean_ci(r.get("wall_s") for r in runs),
            "eval_s": mean_ci(rec.get("costs", {}).get("eval_total_s") for rec in s["records"][eval_set].values()),
            "total_s": s["seconds"],
        })
    return rows


def run_scores(config, workdir, settings=SCORE_SETTINGS, seeds=None, scratch=None, threads=None,
               say=lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    """Build each cache, train fkl on it for every training seed and evaluate, through :mod:`harness.steps`.

    ``config``: the suite file that made ``workdir``; ``seeds``: training seeds (default: the suite's);
    ``scratch``: where the private work directories go (default: a temporary directory, removed afterwards).
    Returns the per-seed run.json and record contents of every setting (JSON-serialisable)."""
    import contextlib
    import dataclasses
    import shutil

    from . import steps
    from .io import read_json
    from .suite import load_suite
    from .validate import validate_plan

    source = load_suite(config).for_teacher(None)
    source = dataclasses.replace(source, workdir=Path(workdir))
    seeds = list(seeds or source.seeds)
    parsed = [parse_setting(t) for t in settings]
    missing = [str(p) for p in required_inputs(source, seeds) if not p.exists()]
    if missing:
        raise MissingInputs(f"{workdir} is not a finished work directory of {config}: missing {', '.join(missing)} "
                            f"(run `snakemake --cores all --configfile {config}` first)")
    if source.tuning:
        lr, lr_from = read_json(source.chosen_path(SCORE_RECIPE))["learning_rate"], str(source.chosen_path(SCORE_RECIPE))
    else:
        lr, lr_from = source.training.learning_rate, f"{config} training.learning_rate (the suite has no search)"
    torch.set_num_threads(threads or source.threads_per_job)
    device = steps.resolve_device(source.device)
    t_all = time.perf_counter()
    out = []
    holder = (tempfile.TemporaryDirectory(prefix="bench-cache-scores-") if scratch is None
              else contextlib.nullcontext(str(scratch)))
    with holder as base:
        for label, slug, cache in parsed:
            root = Path(base) / slug
            if root.exists():
                if not (root / "suite.yaml").exists():
                    raise MissingInputs(f"{root} exists and is not a directory this benchmark made; give another --scratch")
                shutil.rmtree(root)
            t0 = time.perf_counter()
            private_workdir(source, root)
            suite = private_suite(source, root, cache, lr, seeds)
            validate_plan(suite, check_data=False)  # refuses a cache that cannot serve the recipe (supported())
            recipe = suite.recipes()[SCORE_RECIPE]
            steps.build_teacher_cache(suite, progress=False)
            meta = read_json(suite.cache_path.with_suffix(".json"))
            say(f"[{label}] cache built in {meta['build_s']:.1f} s: {meta['bytes_per_position']:.0f} bytes/token, "
                f"{meta['positions']} positions")
            runs = {}
            for seed in seeds:
                run = read_json(steps.distill(suite, recipe, seed, progress=False) / "run.json")
                runs[seed] = run
                loss = _final_loss(run)
                say(f"[{label}] {SCORE_RECIPE} seed {seed}: {run.get('status')}"
                    + (f", final loss {loss:.4f}" if loss is not None else f" ({run.get('error')})")
                    + f", {run.get('wall_s') or 0:.1f} s")
            te = time.perf_counter()
            steps.evaluate(suite, SCORE_RECIPE, seeds, progress=False)
            names = [s["name"] for s in suite.evaluation["sets"]]
            records = {n: {seed: read_json(steps.record_path(suite, SCORE_RECIPE, seed, n)) for seed in seeds}
                       for n in names}
            metric = suite.evaluation["primary_metric"]
            for n in names:
                vals = [r["metrics"].get(metric) for r in records[n].values() if r.get("metrics")]
                say(f"[{label}] evaluated {len(seeds)} seed(s) in {time.perf_counter() - te:.1f} s: {metric} [{n}] "
                    + " ".join(f"{v:.2f}" for v in vals if v is not None))
            out.append({"label": label, "cache": suite.teacher_cache, "bytes_per_token": meta["bytes_per_position"],
                        "build_s": meta["build_s"], "runs": runs, "records": records,
                        "seconds": time.perf_counter() - t0})
    s0 = source
    return {
        "settings": out, "config": str(config), "workdir": str(workdir), "suite": s0.name, "seeds": seeds,
        "learning_rate": lr, "learning_rate_from": lr_from, "device": device, "machine": steps.machine(device),
        "git": _commit(), "torch": torch.__version__, "seconds": time.perf_counter() - t_all,
        "eval_sets": [s["name"] for s in s0.evaluation["sets"]], "primary_metric": s0.evaluation["primary_metric"],
        "eval_seeds": s0.evaluation["seeds"], "max_items": s0.evaluation["max_items"],
        "max_steps": s0.training.max_steps,
        "batch": s0.training.per_device_train_batch_size * s0.training.gradient_accumulation_steps,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _commit() -> str:
    import subprocess

    from .steps import git_revision

    rev = git_revision() or "unknown"
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "harness", "recipes", "config"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return rev
    return rev + (" (with uncommitted changes under harness/, recipes/ or config/)" if dirty else "")


#: which objectives each cache mode serves, and why (the README's "Teacher cache" section; harness.teacher_cache)
MODE_NOTES = (
    "- `exact`: the full row, V × 2 bytes per position in float16 (losses equal the live teacher's within the "
    "float16 rounding); serves every objective.",
    "- `sparse`: top-k log-probabilities, their ids and the remaining mass spread uniformly (k × 6 + 4 bytes). "
    "Biased: the tail's shape is lost. Serves objectives that are sums of per-token terms, not `akl`, `bdkd`, "
    "`sinkhorn`, `uld` (whole-row objectives).",
    "- `sampled` (Random-Sampling KD, Anshumann et al., ACL 2025): k token ids drawn from the teacher per position "
    "(4k bytes); the target is their empirical distribution, an unbiased estimate of the forward-KL/CE gradient. "
    "Serves `fkl` at the cache's temperature and `ce` only — every other objective is non-linear in p.",
)


def scores_markdown(res: dict, command: str) -> str:
    metric = res["primary_metric"]
    settings = res["settings"]
    ref = next((s["label"] for s in settings if s["cache"]["mode"] == "exact"), None)
    lines = [
        f"# Teacher cache: final scores of {SCORE_RECIPE} runs trained on each cache",
        "",
        f"Generated by `{command}` ({res['date']}; {res['machine']}, device {res['device']}, torch {res['torch']}; "
        f"commit {res['git']}; {res['seconds']:.0f} s). Module docstring: `harness/bench_cache.py`.",
        "",
        f"Setup: suite `{res['suite']}` (`{res['config']}`), inputs from `{res['workdir']}` (data, tokenizer, "
        f"primary teacher, initial students). Recipe `{SCORE_RECIPE}` (recipes/{SCORE_RECIPE}.yaml) at learning rate "
        f"{res['learning_rate']:g} (from {res['learning_rate_from']}), {res['max_steps']} steps × {res['batch']} "
        f"sequences, training seeds {res['seeds']}; each cache is built by `harness.steps.build_teacher_cache`, "
        "each run trained by `harness.steps.distill` and scored by `harness.steps.evaluate`, exactly as in the "
        f"pipeline (evaluation seeds {res['eval_seeds']}"
        + (f", first {res['max_items']} items" if res["max_items"] else "") + "). "
        "Values are means over training seeds ± the 95 % Student-t half-width; "
        + (f"Δ is the per-seed difference to the `{ref}` cache (same initial student, data order and evaluation "
           "seeds), with its t-interval." if ref else "no exact cache was run, so there is no Δ."),
    ]
    from .report.metric_info import metric_label

    label = metric_label(metric)
    for name in res["eval_sets"]:
        rows = summarise(settings, metric, name)
        lines += [
            "",
            f"| cache | bytes / token | {label} [{name}] | Δ {label} vs {ref or 'exact'} | "
            f"{metric_label('exact_match')} | {metric_label('kl_to_teacher')} | {metric_label('jsd_to_teacher')} | "
            "final train loss | runs ok | cache build s | train s / run | eval s / run | total s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            delta = "n/a" if r["delta"] is None else _cell(r["delta"], 2, signed=True)
            lines.append(
                f"| {r['label']} | {r['bytes']:.0f} | {_cell(r[metric], 2)} | {delta} | "
                f"{_cell(r['exact_match'], 2)} | {_cell(r['kl_to_teacher'], 4)} | {_cell(r['jsd_to_teacher'], 4)} | "
                f"{_cell(r['final_loss'], 4)} | {r['ok']}/{r['n']} | {r['build_s']:.1f} | {_cell(r['train_s'], 1)} | "
                f"{_cell(r['eval_s'], 1)} | {r['total_s']:.0f} |")
    lines += [
        "",
        "Columns: bytes / token from the cache's `teacher_cache.json`; metrics from the evaluation records "
        "(`records/fkl/seed*/<set>.json`; KL and JSD to the teacher are per response token on the evaluation set, "
        "against the live teacher); final train loss is the last logged loss of `run.json`'s curve; times are "
        "wall-clock seconds.",
        "",
        "Which objectives each cache mode can serve, and why (`harness.teacher_cache.supported`; README, \"Teacher "
        "cache\"):",
        *MODE_NOTES,
        "",
        "Notes",
        "- The final train loss is the logged fkl loss against each cache's own target, so it is not comparable "
        "across caches: for a sampled cache it is KL(p̂‖q) on the empirical distribution of the draws, in "
        "expectation above the exact KL(p‖q) by H(p) − E[H(p̂)] (the draws' entropy is lower; the gradient is "
        "unbiased all the same); for a sparse cache it is against the rebuilt flat-tail row. Compare the caches "
        "on their scores.",
        "- A sampled cache is drawn once (teacher_cache.seed 0) and shared by every training seed, as in the "
        "pipeline; the intervals therefore do not include the variation between draws.",
        "- Only fkl is scored: it is the one teacher objective every mode serves.",
        "- With the suite's own cache setting (the tiny suite caches exact float16) a row's runs are the pipeline's "
        "final fkl runs: same inputs, same records (tests/test_bench_cache_scores.py checks it).",
        "",
    ]
    return "\n".join(lines)


def _quiet() -> None:
    """Progress lines only: no Hugging Face bars, no lm-eval warnings about the in-memory model."""
    import logging
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def scores_main(argv) -> int:
    import json

    ap = argparse.ArgumentParser(prog="python -m harness.bench_cache scores",
                                 description="final scores of fkl runs trained on each teacher cache (issue #17)")
    ap.add_argument("--config", required=True, help="the suite file that made --workdir (e.g. config/tiny.yaml)")
    ap.add_argument("--workdir", required=True, help="its finished work directory (e.g. work/tiny)")
    ap.add_argument("--out", default="results/bench/teacher-cache-scores.md")
    ap.add_argument("--caches", default=",".join(SCORE_SETTINGS),
                    help="comma-separated settings: exact:<dtype>, sparse:<k>, sampled:<k>")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the suite's)")
    ap.add_argument("--scratch", default=None,
                    help="directory for the private work directories (default: a temporary one, removed)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the suite's threads_per_job)")
    a = ap.parse_args(argv)
    _quiet()
    try:
        seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else None
    except ValueError:
        print(f"error: --seeds {a.seeds!r}: give comma-separated integers", file=sys.stderr)
        return 2
    settings = [t for t in a.caches.split(",") if t.strip()]
    try:
        for t in settings:
            parse_setting(t)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .cli import user_errors

    try:
        res = run_scores(a.config, a.workdir, settings, seeds=seeds, scratch=a.scratch, threads=a.threads)
    except (MissingInputs, *user_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python -m harness.bench_cache scores " + " ".join(shlex.quote(x) for x in argv)
    text = scores_markdown(res, command.strip())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    print(text)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scores"]:
        return scores_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m harness.bench_cache", description=__doc__.split("\n")[0],
                                 epilog="final scores of runs trained on each cache: python -m harness.bench_cache "
                                        "scores --help")
    ap.add_argument("--out", default="results/bench/teacher-cache.md")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--ks", default="8,32,128", help="comma-separated k (top-k and samples)")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    res = run(batches=a.batches, seeds=a.seeds, ks=tuple(int(x) for x in a.ks.split(",")),
              teacher_steps=a.teacher_steps, student_steps=a.student_steps, threads=a.threads)
    command = "python -m harness.bench_cache " + " ".join(shlex.quote(x) for x in argv)
    text = markdown(res, command.strip())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
