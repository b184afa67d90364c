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


def test_a_mixed_batch_takes_its_reference_rows_from_the_cache_and_the_rest_live(setup):
    """MiniLLM-style micro-batches: sampled rows (live teacher) + reference rows named by ``cached_rows``."""
    tok, examples, teacher, _ = setup
    cache = build_cache(teacher, examples[:6], tok.pad_token_id, mode="exact", dtype="float32", progress=False)
    sampled = [{"input_ids": e["input_ids"][: e["prompt_len"]] + [5, 6, 7], "prompt_len": e["prompt_len"]}
               for e in examples[10:13]]  # rows the cache has never seen
    rows = sampled + [examples[4], examples[1], examples[5]]
    batch = batching.collate(rows, tok.pad_token_id)
    batch["source"] = "generated"
    batch["cached_rows"], batch["cached_example_ids"] = torch.tensor([3, 4, 5]), torch.tensor([4, 1, 5])
    calls = []

    def live(b):
        calls.append(b["input_ids"].shape[0])
        return live_teacher(teacher)(b)

    out = cached_or_live(cache, live)(batch)
    assert calls == [3]  # only the sampled rows went through the teacher
    with torch.no_grad():
        full = torch.log_softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    mask = batch["loss_mask"] > 0
    assert torch.allclose(torch.log_softmax(out[:3], -1)[mask[:3]], full[:3][mask[:3]], atol=1e-5)
    assert torch.allclose(out[3:][mask[3:]], full[3:][mask[3:]], atol=1e-5)  # log-probs from the cache
    assert torch.equal(out[3:][~mask[3:]], torch.zeros_like(out[3:][~mask[3:]]))
    # a row that is not its example's reference encoding is refused, not silently mis-served
    batch["cached_example_ids"] = torch.tensor([4, 1, 2])
    with pytest.raises(ValueError, match="rebuild it"):
        cached_or_live(cache, live)(batch)


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


# The sampled cache (RS-KD) -----------------------------------------------------------------------------------
def test_draws_follow_the_inverse_cdf_and_never_pick_a_zero_probability_token():
    from harness.teacher_cache import draw_samples

    logp = torch.tensor([[0.5, 0.25, 0.0, 0.25]]).log()  # token 2 has probability 0 (-inf)
    u = torch.tensor([[0.1, 0.6, 0.74, 0.76, 0.99]], dtype=torch.float64)
    assert draw_samples(logp, u).tolist() == [[0, 1, 1, 3, 3]]
    # temperature 0.5 squares and renormalises: r = (4, 1, 0, 1) / 6
    u = torch.tensor([[0.6, 0.7, 0.8, 0.84]], dtype=torch.float64)
    assert draw_samples(logp, u, temperature=0.5).tolist() == [[0, 1, 1, 3]]


class _Scaled(torch.nn.Module):
    """A teacher whose logits are multiplied by ``scale`` (a peaked teacher from a random one)."""

    def __init__(self, model, scale):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits = out.logits * self.scale
        return out

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_the_sampled_target_gives_an_unbiased_fkl_gradient(setup, tau):
    """Mean over S seeds of the fkl gradient (reduction 'sum': g_i = (q_i − p̂_i)/τ per position) → exact.

    Each seed's error e_s = (p_τ − p̂_s)/τ has mean 0 if and only if the estimator is unbiased, and
    E‖e_s‖² = Σ_i (1 − Σ_v p_τ,iv²) / (k τ²) (multinomial variance). For the mean over S independent seeds,
    E‖ē‖² = that / S, plus ‖bias‖² if there is one. The sum runs over ~1,000 positions × 300 tokens, so
    ‖ē‖² concentrates (relative spread ≈ 1/sqrt(#positions)): we require it within ±20 % of the unbiased
    prediction; a sampler biased by drawing at a wrong temperature would exceed it (asserted). The teacher's
    logits are scaled ×8 to make it peaked like a trained one (the random one is almost uniform).
    """
    from harness.teacher_cache import build_cache

    tok, examples, teacher, special = setup
    teacher = _Scaled(teacher, 8.0)
    n, k, S = 40, 64, 64
    exact = build_cache(teacher, examples[:n], tok.pad_token_id, mode="exact", dtype="float32", progress=False)
    p_rows = exact.rows(torch.arange(n))
    torch.manual_seed(0)
    student = torch.randn_like(p_rows)
    fkl = objectives.get("fkl")

    def grad(teacher_rows):
        s = student.clone().requires_grad_(True)
        fkl(s, teacher_rows, reduction="sum", temperature=tau).backward()
        return s.grad.double()

    g_exact = grad(p_rows)
    grads = []
    for seed in range(S):
        cache = build_cache(teacher, examples[:n], tok.pad_token_id, mode="sampled", samples=k, temperature=tau,
                            seed=seed, progress=False)
        grads.append(grad(cache.rows(torch.arange(n))))
    p_tau = torch.softmax(p_rows.double() / tau, -1)
    predicted = float((1 - (p_tau**2).sum(-1)).sum()) / (k * tau**2)
    single = [float(((g - g_exact) ** 2).sum()) for g in grads]
    assert sum(single) / S == pytest.approx(predicted, rel=0.2)  # each seed: variance as predicted
    err = float(((torch.stack(grads).mean(0) - g_exact) ** 2).sum())
    assert err == pytest.approx(predicted / S, rel=0.2)  # the mean: no bias left above the noise
    # the check has the power to see a small bias: drawing at τ' = 1.1 instead of τ = 1 (or at 1, forgetting
    # τ = 2), so that E p̂ = p_τ', would add ‖p_τ − p_τ'‖² / τ² to err, more than the 20 % tolerance
    p_wrong = torch.softmax(p_rows.double() / (1.1 if tau == 1.0 else 1.0), -1)
    assert float(((p_tau - p_wrong) ** 2).sum()) / tau**2 > 0.5 * predicted / S


def test_the_sampled_cache_is_deterministic_and_independent_of_batching(setup, tmp_path):
    from harness.teacher_cache import build_cache

    tok, examples, teacher, _ = setup
    kw = dict(mode="sampled", samples=16, seed=7, progress=False)
    a = build_cache(teacher, examples[:12], tok.pad_token_id, batch_size=12, **kw)
    b = build_cache(teacher, examples[:12], tok.pad_token_id, batch_size=5, **kw)
    assert torch.equal(a.samples, b.samples)
    a.save(tmp_path / "s.pt")
    c = TeacherCache.load(tmp_path / "s.pt")
    assert torch.equal(c.rows(torch.arange(12)), a.rows(torch.arange(12)))
    # example 3's draws do not depend on which examples come before it
    alone = build_cache(teacher, examples[3:4], tok.pad_token_id, **kw)
    assert not torch.equal(alone.samples, a.samples[a.offsets[3] : a.offsets[3] + a.counts[3]])  # index 0 ≠ 3
    other = build_cache(teacher, examples[:12], tok.pad_token_id, mode="sampled", samples=16, seed=8, progress=False)
    assert not torch.equal(other.samples, a.samples)
    assert a.samples.dtype == torch.int32 and a.samples.shape == (a.n_positions, 16)


def test_sampled_cache_storage_and_target(setup):
    from harness.teacher_cache import build_cache

    tok, examples, teacher, _ = setup
    k = 12
    cache = build_cache(teacher, examples[:10], tok.pad_token_id, mode="sampled", samples=k, temperature=2.0,
                        progress=False)
    assert cache.bytes_per_position() == 4 * k  # k int32 ids, nothing else
    rows = cache.rows(torch.arange(10))
    target = torch.log_softmax(rows / 2.0, -1).exp()  # what an objective at τ = 2 sees
    counts = torch.stack([torch.bincount(r.long(), minlength=len(tok)) for r in cache.samples]).float()
    assert torch.allclose(target, counts / k, atol=1e-6)
    assert torch.isfinite(objectives.get("fkl")(torch.randn_like(rows), rows, temperature=2.0))


@pytest.mark.parametrize("mode,objective,tau,ok,why", [
    ("exact", "sinkhorn", 2.0, True, ""),
    ("sparse", "skl", 1.0, True, "biased"),
    ("sparse", "akl", 1.0, False, "not defined on a sparse"),
    ("sampled", "fkl", 1.0, True, "unbiased"),
    ("sampled", "ce", 1.0, True, ""),
    ("sampled", "fkl", 2.0, False, "teacher_cache.temperature"),
    ("sampled", "rkl", 1.0, False, "not linear"),
    ("sampled", "skl", 1.0, False, "not linear"),
    ("sampled", "tvd", 1.0, False, "not linear"),
    ("sampled", "sinkhorn", 1.0, False, "not linear"),
])
def test_each_mode_refuses_the_objectives_it_cannot_serve(mode, objective, tau, ok, why):
    from harness.teacher_cache import supported

    got, reason = supported(mode, objective, tau, {"temperature": 1.0})
    assert got is ok and why in reason


def test_rows_gathers_each_examples_positions_in_the_order_asked():
    """rows(ids): example e's positions offsets[e] .. offsets[e] + counts[e] - 1, examples in the order given
    (repeats and examples without positions included), against a per-example Python loop."""
    counts = torch.tensor([3, 0, 2, 5, 1])
    offsets = torch.cumsum(counts, 0) - counts
    cache = TeacherCache("exact", 4, offsets, counts, logp=torch.arange(44.0).reshape(11, 4).half())
    for ids in ([0, 1, 2, 3, 4], [4, 2, 0], [1], [], [3, 3]):
        got = (cache.rows(torch.tensor(ids, dtype=torch.long))[:, 0] / 4).long().tolist()
        assert got == [r for e in ids for r in range(int(offsets[e]), int(offsets[e] + counts[e]))]
