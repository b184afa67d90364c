"""Teacher-cache accuracy against storage: exact, sparse (top-k + flat tail) and sampled (RS-KD) caches.

    python -m harness.bench_cache --out results/bench/teacher-cache.md

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
        "- Final scores of distillation runs on each cache are not measured here (that needs suite runs).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench_cache", description=__doc__.split("\n")[0])
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
    command = "python -m harness.bench_cache " + " ".join(shlex.quote(x) for x in (argv if argv is not None
                                                                                    else sys.argv[1:]))
    text = markdown(res, command.strip())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
