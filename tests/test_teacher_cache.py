"""The teacher cache: exact mode reproduces live-teacher training; sparse mode rebuilds a distribution."""

from __future__ import annotations

import math

import pytest
import torch

from harness import objectives
from harness.data import batching
from harness.distill import TrainConfig, train
from harness.models import build_tiny
from harness.steps import live_teacher, reference_batches
from harness.teacher_cache import TeacherCache, build_cache, cached_or_live


class _Suite:  # the two fields reference_batches reads
    def __init__(self, bs):
        self.training = TrainConfig(per_device_train_batch_size=bs)


@pytest.fixture(scope="module")
def setup(tiny_data, tiny_tokenizer):
    tok = tiny_tokenizer
    examples = [batching.encode(tok, it, 40, 48) for it in tiny_data["train"]]
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    teacher = build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}, len(tok), 0, 64, special).eval()
    return tok, examples, teacher, special


def _student(tok, special):
    return build_tiny({"arch": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}, len(tok), 1, 64, special)


def test_exact_cache_gives_the_same_losses_as_the_live_teacher(setup, one_thread):
    tok, examples, teacher, special = setup
    cache = build_cache(teacher, examples, tok.pad_token_id, mode="exact", dtype="float32", batch_size=16,
                        progress=False)
    assert cache.n_positions == sum(len(e["input_ids"]) - e["prompt_len"] for e in examples)  # response + eos
    cfg = TrainConfig(max_steps=6, per_device_train_batch_size=8, log_every=1, learning_rate=1e-2)
    batches = reference_batches(_Suite(8), examples, tok.pad_token_id, seed=3)
    curves = []
    for teacher_fn in (live_teacher(teacher), cached_or_live(cache, None)):
        result = train(_student(tok, special), batches, cfg, seed=3, objective=objectives.get("srkl"),
                       teacher_logits=teacher_fn, progress=False)
        curves.append([loss for _, loss in result.curve])
    assert curves[0] == pytest.approx(curves[1], rel=1e-5, abs=1e-6)


def test_cache_rows_are_the_teachers_log_probs_at_counted_positions(setup):
    tok, examples, teacher, _ = setup
    cache = build_cache(teacher, examples[:10], tok.pad_token_id, mode="exact", dtype="float32", progress=False)
    batch = batching.collate(examples[:10], tok.pad_token_id)
    batch["example_ids"] = torch.arange(10)
    with torch.no_grad():
        live = torch.log_softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    mask = batch["loss_mask"] > 0
    assert torch.allclose(cache.teacher_logits(batch)[mask], live[mask], atol=1e-6)


def test_sparse_cache_keeps_top_k_and_the_remaining_mass(setup, tmp_path):
    tok, examples, teacher, _ = setup
    k = 8
    cache = build_cache(teacher, examples[:10], tok.pad_token_id, mode="sparse", top_k=k, dtype="float32",
                        progress=False)
    assert cache.bytes_per_position() == k * 4 + k * 4 + 4
    cache.save(tmp_path / "c.pt")
    cache = TeacherCache.load(tmp_path / "c.pt")
    rows = cache.rows(torch.arange(10))
    assert torch.allclose(rows.exp().sum(-1), torch.ones(rows.shape[0]), atol=1e-5)  # a distribution again
    exact = build_cache(teacher, examples[:10], tok.pad_token_id, mode="exact", dtype="float32", progress=False)
    full = exact.rows(torch.arange(10))
    top, idx = full.topk(k, -1)
    assert torch.allclose(rows.gather(1, idx), top, atol=1e-6)  # the head is exact
    tail = (1 - top.exp().sum(-1)) / (len(tok) - k)
    outside = torch.ones_like(rows, dtype=torch.bool).scatter(1, idx, False)
    assert torch.allclose(rows.exp()[outside].view(rows.shape[0], -1), tail[:, None].expand(-1, len(tok) - k),
                          rtol=1e-4)  # the tail is flat, with the right mass
    # every divergence is defined on the rebuilt distribution, and fkl to the exact teacher is small
    student = torch.randn_like(full)
    for name in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl"):
        assert math.isfinite(float(objectives.get(name)(student, rows)))


def test_a_batch_of_student_samples_needs_the_live_teacher(setup):
    tok, examples, teacher, _ = setup
    cache = build_cache(teacher, examples[:4], tok.pad_token_id, progress=False)
    batch = batching.collate(examples[:4], tok.pad_token_id)
    batch["source"] = "generated"
    with pytest.raises(RuntimeError, match="live teacher"):
        cached_or_live(cache, None)(batch)
    out = cached_or_live(cache, live_teacher(teacher))(batch)
    assert out.shape[:2] == batch["input_ids"].shape


def test_a_sparse_cache_refuses_objectives_that_need_the_whole_tail(tmp_path):
    import yaml

    from harness.schema import ConfigError
    from harness.suite import load_suite
    from harness.validate import validate_plan
    from tests.conftest import REPO

    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    cfg.update(recipes=["sft", "fkl", "akl"], recipes_dir=str(REPO / "recipes"), workdir=str(tmp_path / "w"),
               teacher_cache={"mode": "sparse", "top_k": 8})
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="'akl'.*not defined on a sparse"):
        validate_plan(load_suite(path), check_data=False)
    cfg["recipes"] = ["sft", "fkl"]
    path.write_text(yaml.safe_dump(cfg))
    validate_plan(load_suite(path), check_data=False)  # fkl is fine on a sparse cache


# The float16 cache (the suites' default) against the live teacher ------------------------------------------
FP16_IDS = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "bdkd", "ab", "todi", "sinkhorn"]


def _sensitivity(name, student_rows, stored_logp, tau):
    """∇ of the loss (mean over positions; Sinkhorn: its batch value) w.r.t. the *stored* teacher log-probs x,
    in float64, with the temperature and the renormalisation log_softmax(x / τ) included.

    Weights that the objectives hold constant are made differentiable here, because the cache moves them
    too: akl's w = Σ_head|p−q| / Σ|p−q| (head set fixed, it does not change under this rounding: checked by
    the value bound), todi's value is Jeffreys' KL(p‖q) + KL(q‖p); bdkd's gates are piecewise constant (the
    test checks that none flips).
    """
    from harness.objectives import divergences as D

    x = stored_logp.double().requires_grad_(True)
    lq = torch.log_softmax(student_rows.double() / tau, -1)
    lp = torch.log_softmax(x / tau, -1)
    spec = objectives.spec(name)
    if name == "todi":
        value = ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1).mean()
    elif name == "akl":
        p, q = lp.exp(), lq.exp()
        srt, order = p.detach().sort(-1, descending=True)
        tail = srt.cumsum(-1) > 0.5
        tail[:, 0] = False
        head = torch.zeros_like(tail).scatter(-1, order, ~tail)
        gap = (p - q).abs()
        w = (gap * head).sum(-1) / gap.sum(-1)
        value = (w * D.fkl(lq, lp) + (1 - w) * D.rkl(lq, lp)).mean()
    else:
        params = {**spec.defaults, **({"debias": False} if name == "sinkhorn" else {})}
        value = spec.fn(lq, lp, **params)
        value = value if value.dim() == 0 else value.mean()
    (grad,) = torch.autograd.grad(value, x)
    return grad


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_float16_cache_losses_match_the_live_teacher(setup, tau):
    """Losses from a float16 exact cache equal the live teacher's within 6 standard deviations of the rounding.

    float16 rounds each stored log-probability x_v to the nearest of its values (11 significant bits): the
    error δ_v is at most half an ulp (asserted for every entry) and, over a row of mostly non-representable
    values, behaves as independent and uniform on ±ulp_v/2 (variance ulp_v²/12). To first order the loss
    moves by ⟨∇_x loss, δ⟩ (temperature and renormalisation included in ∇, see :func:`_sensitivity`), so
    |Δloss| ≤ 6·sqrt(Σ_v ∇_v² ulp_v² / 12) except with probability < 1e-8, plus O(‖δ‖²) terms (≲ 1e-9 here) and
    the float32 round-off of the two loss computations themselves (≤ 1e-6 relative). The worst case, ‖∇‖₁·‖δ‖∞,
    is 1e-3 to 4e-3 on this batch and would accept a cache 1000 times worse than the one measured (1e-7 .. 2e-6).
    """
    tok, examples, teacher, special = setup
    n = 24
    cache = build_cache(teacher, examples[:n], tok.pad_token_id, mode="exact", dtype="float16", progress=False)
    assert cache.logp.dtype == torch.float16
    batch = batching.collate(examples[:n], tok.pad_token_id)
    batch["example_ids"] = torch.arange(n)
    mask = batch["loss_mask"] > 0
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = _student(tok, special)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    cached = cache.teacher_logits(batch)
    live_logp = torch.log_softmax(live.float(), -1)[mask].double()
    delta = cached[mask].double() - live_logp
    ulp = 2.0 ** (torch.floor(torch.log2(live_logp.abs())) - 10)  # float16: 10 stored mantissa bits
    assert (delta.abs() <= ulp / 2 * (1 + 1e-6)).all() and (delta != 0).any()  # round to nearest
    for name in FP16_IDS:
        obj = objectives.get(name, **({"debias": False} if name == "sinkhorn" else {}))
        from_live = obj(student, live, mask, temperature=tau).item()
        from_cache = obj(student, cached, mask, temperature=tau).item()
        grad = _sensitivity(name, student[mask], live_logp, tau)
        sigma = float(((grad * ulp) ** 2).sum().sqrt()) / 12**0.5
        if name == "bdkd":  # no entropy gate flips between the two teachers on this data
            def gates(rows):
                lp, lq = torch.log_softmax(rows / tau, -1), torch.log_softmax(student[mask].double() / tau, -1)
                return (-(lp.exp() * lp).sum(-1)) > (-(lq.exp() * lq).sum(-1))
            assert torch.equal(gates(live_logp), gates(cached[mask].double()))
        assert abs(from_cache - from_live) <= 6 * sigma + 1e-6 * abs(from_live) + 1e-9, (name, from_live, from_cache,
                                                                                          sigma)
