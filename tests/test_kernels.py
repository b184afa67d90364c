"""Triton loss kernels (harness/objectives/kernels), the fused LM-head path and the chunked PyTorch path.

The kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set below before any
kernel is defined; the harness imports its kernels lazily). Skipped when ``triton`` is not installed.

References, never our own kernel code:
- for fkl, rkl, jsd, tvd, skl, srkl and ce: the harness' PyTorch path (the per-position functions of
  harness.objectives.divergences under autograd) in float64;
- for akl (ABKD's head), bdkd, ab and todi: a float64 formula written in this file, gradient by autograd, from
  the released code: ghwang-s/abkd@df813185e69d21d1e99510272cd94e49be7250c0
  distillation_llm/distillm/losses.py (get_ratio + AKL, bdkd, ab_div) and
  jungseongryong/ToDi@45f1f8bf89dbda709d18c2f736c6683a4df6d498 code/criterions/various_divergence.py
  (compute_ToDi). Values are true divergences (0 at p = q), as everywhere in the harness.
Conventions: q = softmax(student / τ), p = softmax(teacher / τ).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
# log(0) for β ∈ {0, 1} and exp overflow in sigmoid are intended (-inf, inf); numpy warns in the interpreter
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

import harness.objectives as O  # noqa: E402
from harness.objectives import kernels as K  # noqa: E402
from harness.objectives import wrapper as W  # noqa: E402
from harness.objectives.fused import fused_linear_loss  # noqa: E402
from harness.objectives.kernels import triton_divergence as TD  # noqa: E402

EXISTING = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]
NEW = ["akl", "bdkd", "ab", "todi"]
ALL = EXISTING + NEW + ["ce"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # gradient tolerance × max |g|


# ----------------------------------------------------------------------------------------------------------
# independent float64 formulas (log_q, log_p: [n, V] float64 log-probabilities without -inf)
# ----------------------------------------------------------------------------------------------------------
def _kl(la, lb):
    return (la.exp() * (la - lb)).sum(-1)


def ref_akl(lq, lp, mu=0.5):
    """ABKD get_ratio: sort p descending; tail = inclusive cumulative p > μ, the top-1 always head."""
    with torch.no_grad():
        p, q = lp.exp(), lq.exp()
        ps, order = p.sort(-1, descending=True)
        gap = (ps - q.gather(-1, order)).abs()
        tail = ps.cumsum(-1) > mu
        tail[:, 0] = False
        if mu >= 1.0:  # every token (a cumulative sum may exceed 1 by round-off)
            tail[:] = False
        head, total = gap.masked_fill(tail, 0.0).sum(-1), gap.sum(-1)
        w = torch.where(total > 0, head / total.clamp_min(1e-300), torch.full_like(total, 0.5))
    return w * _kl(lp, lq) + (1 - w) * _kl(lq, lp)


def ref_bdkd(lq, lp, weight_high=3.0):
    """ABKD bdkd: weight w_big on KL(p‖q) where H(p) > H(q), on KL(q‖p) where H(q) > H(p); else 1."""
    with torch.no_grad():
        h_q, h_p = -(lq.exp() * lq).sum(-1), -(lp.exp() * lp).sum(-1)
        w_f = torch.where(h_p > h_q, weight_high, 1.0)
        w_r = torch.where(h_q > h_p, weight_high, 1.0)
    return w_f * _kl(lp, lq) + w_r * _kl(lq, lp)


def ref_ab(lq, lp, alpha=0.2, beta=0.7):
    """α-β divergence: −1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)]."""
    s = alpha + beta
    terms = (alpha * lp + beta * lq).exp() - alpha / s * (s * lp).exp() - beta / s * (s * lq).exp()
    return -terms.sum(-1) / (alpha * beta)


def ref_todi(lq, lp):
    """ToDi: w = sigmoid(log p − log q) (constant); Σ w p log(p/q) + (1 − w) q log(q/p)."""
    w = torch.sigmoid(lp - lq).detach()
    return (w * lp.exp() * (lp - lq) + (1 - w) * lq.exp() * (lq - lp)).sum(-1)


REFS = {"akl": ref_akl, "bdkd": ref_bdkd, "ab": ref_ab, "todi": ref_todi}
DEFAULTS = {"akl": {"mu": 0.5}, "bdkd": {"weight_high": 3.0}, "ab": {"alpha": 0.2, "beta": 0.7}, "todi": {}}


def _as_builtin(name):
    """The float64 formula dressed as the built-in divergences.<name> (what the registry will hold)."""
    ref = REFS[name]

    def fn(log_q, log_p, **params):
        return ref(log_q, log_p, **params)

    fn.__module__, fn.__name__ = "harness.objectives.divergences", name
    return fn


def _fn(name):
    return _as_builtin(name) if name in REFS else O.spec(name).fn


# ----------------------------------------------------------------------------------------------------------
# data and the two ways of computing
# ----------------------------------------------------------------------------------------------------------
def _case(vocab, dtype=torch.float32, n=6, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    s = 2.0 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    t = 2.0 * torch.randn(n, vocab, generator=g, dtype=torch.float64) + 0.3
    if pad and vocab >= 7:
        s[:, -3:] = t[:, -3:] = float("-inf")  # padded vocabulary
        s[0, 1] = t[0, 1] = float("-inf")  # a token banned on both sides, inside the vocabulary
    mask = torch.ones(n)
    mask[1] = 0
    real = vocab - 3 if pad and vocab >= 7 else vocab
    labels = torch.randint(0, real, (n,), generator=g)
    labels[0] = 0
    return s.to(dtype), t.to(dtype), mask, labels


def _kernel_value_grad(name, s, t, mask, labels, tau=1.0, params=None, **kw):
    x = s.clone().requires_grad_(True)
    if name == "ce":
        v = W.cross_entropy(x, labels, mask, reduction=kw.pop("reduction", "mean"), chunk_size=None,
                            normalizer=kw.pop("normalizer", None), kernel="triton", **kw)
    else:
        fn = _fn(name)
        params = {**(DEFAULTS[name] if name in DEFAULTS else O.spec(name).defaults), **(params or {})}
        v = W.reduce_per_position(fn, x, t, mask, params, temperature=tau, reduction=kw.pop("reduction", "mean"),
                                  chunk_size=None, normalizer=kw.pop("normalizer", None), kernel="triton", **kw)
    (g,) = torch.autograd.grad(v, x)
    return v, g


def _reference_value_grad(name, s, t, mask, labels, tau=1.0, params=None):
    """float64 value and gradient of the token mean, from the harness' PyTorch path or this file's formulas."""
    x = s.detach().double().requires_grad_(True)
    t64 = t.double()
    if name == "ce":
        v = W.cross_entropy(x, labels, mask, reduction="mean", chunk_size=None, normalizer=None, kernel="torch")
    elif name in EXISTING:
        spec = O.spec(name)
        v = W.reduce_per_position(spec.fn, x, t64, mask, {**spec.defaults, **(params or {})}, temperature=tau,
                                  reduction="mean", chunk_size=None, normalizer=None, kernel="torch")
    else:
        ref, total, rows = REFS[name], 0.0, [i for i in range(x.shape[0]) if mask[i] > 0]
        for i in rows:  # -inf columns dropped: the reference never sees them
            keep = torch.isfinite(x[i].detach()) & torch.isfinite(t64[i])
            lq = torch.log_softmax(x[i][keep] / tau, -1)[None]
            lp = torch.log_softmax(t64[i][keep] / tau, -1)[None]
            total = total + ref(lq, lp, **{**DEFAULTS[name], **(params or {})})[0]
        v = total / len(rows)
    (g,) = torch.autograd.grad(v, x)
    return v, g


def _assert_match(name, s, t, mask, labels, tau=1.0, params=None, value_tol=2e-6):
    v, g = _kernel_value_grad(name, s, t, mask, labels, tau, params)
    rv, rg = _reference_value_grad(name, s, t, mask, labels, tau, params)
    assert v.dtype == torch.float32 and v.dim() == 0
    assert v.item() == pytest.approx(rv.item(), rel=value_tol, abs=value_tol), name
    assert g.dtype == s.dtype and torch.isfinite(g).all()
    scale = rg.abs().max().item()
    torch.testing.assert_close(g.double(), rg, rtol=0, atol=TOL[s.dtype] * scale + 1e-12)
    return g


@pytest.fixture()
def small_blocks(monkeypatch):
    """Blocks of 16 columns (search blocks of 16): many loop steps even at a small vocabulary."""
    monkeypatch.setattr(TD, "BLOCK_CAP", 16)
    monkeypatch.setattr(TD, "SEARCH_BLOCK", 16)


# ----------------------------------------------------------------------------------------------------------
# values and gradients
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [7, 33, 257, 1000])
@pytest.mark.parametrize("name", ALL)
def test_kernel_matches_reference_float32(name, vocab, monkeypatch):
    """Masks, -inf padding (and a banned token inside the vocabulary), τ ≠ 1, several blocks per row."""
    monkeypatch.setattr(TD, "BLOCK_CAP", 64)
    s, t, mask, labels = _case(vocab)
    g = _assert_match(name, s, t, mask, labels, tau=1.0 if name == "ce" else 1.7)
    assert (g[1] == 0).all()  # masked row
    if vocab >= 7:
        assert (g[:, -3:] == 0).all() and g[0, 1] == 0  # padded columns: exactly 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ALL)
def test_kernel_low_precision_inputs(name, dtype, small_blocks):
    """bf16/fp16 logits: float32 math (value exact to float32), gradient written in the logits' dtype."""
    s, t, mask, labels = _case(33, dtype=dtype, seed=3)
    _assert_match(name, s, t, mask, labels, tau=1.0 if name == "ce" else 0.6, value_tol=5e-6)


@pytest.mark.parametrize(
    "name, params",
    [("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.9}), ("jsd", {"beta": 0.01}), ("jsd", {"beta": 0.99}),
     ("skl", {"alpha": 0.0}), ("skl", {"alpha": 0.5}), ("srkl", {"alpha": 0.0}), ("srkl", {"alpha": 0.5}),
     ("akl", {"mu": 0.05}), ("akl", {"mu": 0.3}), ("akl", {"mu": 0.9}), ("akl", {"mu": 1.0}),
     ("bdkd", {"weight_high": 2.0}), ("ab", {"alpha": 0.5, "beta": 0.5}), ("ab", {"alpha": 1.0, "beta": 0.3})],
)
def test_kernel_parameters(name, params, small_blocks):
    s, t, mask, labels = _case(40, seed=5)
    _assert_match(name, s, t, mask, labels, tau=1.3, params=params)


def test_akl_head_on_a_peaked_teacher(small_blocks):
    """Top-1 mass > μ: the head is the top-1 token alone (ABKD keeps it even though its cumsum exceeds μ);
    and a teacher whose top tokens sit just either side of μ."""
    s, t, mask, labels = _case(50, seed=7, pad=False)
    t[:, 3] += 8.0  # p_top ≈ 0.99
    _assert_match("akl", s, t, mask, labels, params={"mu": 0.5})
    probs = torch.tensor([0.3, 0.15, 0.1, 0.05] + [0.4 / 46] * 46, dtype=torch.float64)
    t2 = probs.log().expand(6, 50).clone() + 0.01 * torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    for mu in (0.29, 0.31, 0.44, 0.46, 0.56):
        _assert_match("akl", s, t2, mask, labels, params={"mu": mu})


def test_persistent_programs_loop_over_rows(monkeypatch):
    """PROGRAMS = k launches k programs that each take every k-th row: same values and gradients."""
    s, t, mask, labels = _case(33, seed=37, n=7)
    for name in ["jsd", "akl", "ce"]:
        ref_v, ref_g = _kernel_value_grad(name, s, t, mask, labels, tau=1.0 if name == "ce" else 1.3)
        monkeypatch.setattr(TD, "PROGRAMS", 3)
        v, g = _kernel_value_grad(name, s, t, mask, labels, tau=1.0 if name == "ce" else 1.3)
        monkeypatch.setattr(TD, "PROGRAMS", None)
        assert v.item() == ref_v.item() and torch.equal(g, ref_g), name


def test_zero_at_equal_distributions_and_nonnegative(small_blocks):
    s, _, mask, labels = _case(33, seed=9)
    for name in EXISTING + NEW:
        v, g = _kernel_value_grad(name, s, s.clone(), mask, labels)
        assert abs(v.item()) < 2e-6, name
        assert g.abs().max().item() < 1e-6, name
        v2, _ = _kernel_value_grad(name, s, s.flip(-1), mask, labels)
        assert v2.item() > 1e-3, name


def test_masked_rows_are_skipped_even_when_garbage():
    s, t, mask, labels = _case(33, seed=11)
    s[1] = float("nan")
    t[1] = float("inf")
    for name in ["fkl", "jsd", "akl", "ab"]:
        v, g = _kernel_value_grad(name, s, t, mask, labels)
        rv, _ = _reference_value_grad(name, torch.cat([s[:1], s[2:]]), torch.cat([t[:1], t[2:]]),
                                      torch.ones(5), labels)
        assert v.item() == pytest.approx(rv.item(), rel=2e-6, abs=2e-6), name
        assert (g[1] == 0).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("reduction, kw", [("sum", {}), ("per_sequence_mean", {}), ("mean", {"normalizer": 7.0}),
                                           ("none", {})])
def test_reductions_equal_torch_path(reduction, kw):
    s, t, mask, labels = _case(33, seed=13, n=8)
    s, t, mask = s.reshape(2, 4, 33), t.reshape(2, 4, 33), mask.reshape(2, 4)
    mask[1, 2] = 0
    for name in ["fkl", "tvd", "ce"]:
        outs = []
        for kernel in ("triton", "torch"):
            x = s.clone().requires_grad_(True)
            if name == "ce":
                v = W.cross_entropy(x, labels.reshape(2, 4), mask, reduction=reduction, chunk_size=None,
                                    kernel=kernel, **({"normalizer": None} | kw))
            else:
                v = W.reduce_per_position(O.spec(name).fn, x, t, mask, {}, temperature=1.0, reduction=reduction,
                                          chunk_size=None, kernel=kernel, **({"normalizer": None} | kw))
            weights = torch.arange(1.0, 9.0).reshape(2, 4) if reduction == "none" else torch.tensor(1.0)
            (g,) = torch.autograd.grad((v * weights).sum(), x)
            outs.append((v.detach(), g))
        (vk, gk), (vt, gt) = outs
        assert vk.shape == vt.shape and vk.dtype == torch.float32
        torch.testing.assert_close(vk, vt, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(gk, gt, rtol=0, atol=2e-6 * gt.abs().max().item())


# ----------------------------------------------------------------------------------------------------------
# autograd glue: scaling, in place, no grad, double backward, selection
# ----------------------------------------------------------------------------------------------------------
def test_scale_after_loss_and_upstream_graph():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, generator=g)
    w = torch.randn(5, 33, generator=g, requires_grad=True)
    t = torch.randn(6, 33, generator=g)
    mask = torch.ones(6)
    grads = {}
    for kernel in ("torch", "triton"):
        v = W.reduce_per_position(O.spec("jsd").fn, h @ w, t, mask, {"beta": 0.5}, temperature=2.0,
                                  reduction="mean", chunk_size=None, normalizer=None, kernel=kernel)
        (grads[kernel],) = torch.autograd.grad(2.5 * v, w)
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-7)


def test_inplace_gradient_overwrites_the_logits():
    s, t, mask, labels = _case(33, seed=17)
    _, g_ref = _kernel_value_grad("rkl", s, t, mask, labels)
    for kernel, chunk in (("triton", None), ("torch", None), ("torch", 2)):
        x = s.clone().requires_grad_(True)
        y = x * 1.0  # a non-leaf whose producer does not save it
        version = y._version
        v = W.reduce_per_position(O.spec("rkl").fn, y, t, mask, {}, temperature=1.0, reduction="mean",
                                  chunk_size=chunk, normalizer=None, kernel=kernel, inplace=True)
        assert y._version > version  # autograd knows the logits were overwritten
        torch.testing.assert_close(y.detach(), g_ref, rtol=0, atol=1e-6)  # they now hold the gradient
        v.backward()
        torch.testing.assert_close(x.grad, g_ref, rtol=0, atol=1e-6)


def test_inplace_refused_when_an_earlier_op_saved_the_logits():
    s, t, mask, _ = _case(33, seed=19)
    x = s.clone().requires_grad_(True)
    y = x * 1.0
    other = (y * y).sum()  # mul saves y for its backward
    v = W.reduce_per_position(O.spec("fkl").fn, y, t, mask, {}, temperature=1.0, reduction="mean",
                              chunk_size=None, normalizer=None, kernel="triton", inplace=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (v + other).backward()


def test_double_backward_is_refused_and_no_grad_works():
    s, t, mask, labels = _case(33, seed=23)
    x = s.clone().requires_grad_(True)
    v = W.reduce_per_position(O.spec("fkl").fn, x, t, mask, {}, temperature=1.0, reduction="mean",
                              chunk_size=None, normalizer=None, kernel="triton")
    v.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already back-propagated"):
        v.backward()
    with torch.no_grad():
        v2 = W.reduce_per_position(O.spec("fkl").fn, x, t, mask, {}, temperature=1.0, reduction="mean",
                                   chunk_size=None, normalizer=None, kernel="triton")
    assert not v2.requires_grad and v2.item() == pytest.approx(v.item(), rel=1e-7)


def test_selection(monkeypatch):
    s, t, mask, _ = _case(8, seed=29)
    fkl = O.spec("fkl").fn
    calls = []
    real = K._module
    monkeypatch.setattr(K, "_module", lambda: calls.append(1) or real())

    def run(kernel, fn=fkl, x=s, params=None):
        return W.reduce_per_position(fn, x, t.to(x.dtype), mask, params or {}, temperature=1.0, reduction="mean",
                                     chunk_size=None, normalizer=None, kernel=kernel)

    base = run("torch").item()
    assert run("auto").item() == base and not calls  # CPU tensors: auto is PyTorch
    assert run("triton").item() == pytest.approx(base, rel=1e-6) and calls  # forced (interpreter)
    calls.clear()

    def user_kl(log_q, log_p):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    assert run("triton", fn=user_kl).item() == pytest.approx(base, rel=1e-6) and not calls  # user: torch
    run("triton", x=s.double())  # float64: torch
    run("triton", fn=_as_builtin("ab"), params={"alpha": -0.5, "beta": 0.7})  # no kernel for α ≤ 0
    assert not calls
    assert K.select("auto", fkl, torch.zeros(1, 2, device="meta"), {}) is None  # not CUDA
    with pytest.raises(ValueError, match="kernel must be one of"):
        run("cuda")
    with pytest.raises(ValueError, match="beta"):
        run("triton", fn=O.spec("jsd").fn, params={"beta": 1.5})  # the PyTorch function's own check
    with pytest.raises(ValueError, match="knows parameter"):
        run("triton", fn=_as_builtin("bdkd"), params={"weight": 3.0})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        run("triton")
    assert run("auto").item() == base


def test_every_kernel_id_has_constants_and_passes():
    assert set(K.KERNEL_IDS) == set(TD.KIND) | {"akl"} == set(TD.PASSES)
    assert K.kernel_id(O.spec("fkl").fn) == "fkl" and K.kernel_id(W._nll) == "ce"
    assert K.kernel_id(ref_ab) is None


# ----------------------------------------------------------------------------------------------------------
# the chunked PyTorch path: element budget, in place
# ----------------------------------------------------------------------------------------------------------
def test_rows_per_chunk_budget():
    assert W.rows_per_chunk(64, 151_936, 256) == W.CHUNK_ELEMENTS // 151_936 == 3
    assert W.rows_per_chunk(4, 7, 100) == 4 and W.rows_per_chunk(None, 7, 100) == 100
    assert W.rows_per_chunk(64, 10**7, 5) == 1


@pytest.mark.parametrize("name", ["fkl", "akl", "ce"])
def test_chunked_inplace_equals_dense(name, monkeypatch):
    monkeypatch.setattr(W, "CHUNK_ELEMENTS", 66)  # 2 rows of 33 per chunk whatever chunk_size says
    s, t, mask, labels = _case(33, seed=31, n=7)
    mask[4] = 0
    fn, params = (W._nll, {}) if name == "ce" else (O.spec(name).fn, O.spec(name).defaults)
    tt = labels[:, None] if name == "ce" else t
    xd = s.clone().requires_grad_(True)
    dense = W.reduce_per_position(fn, xd, tt, mask, params, temperature=1.0, reduction="sum", chunk_size=None,
                                  normalizer=None, kernel="torch")
    (gd,) = torch.autograd.grad(dense, xd)
    for chunk, inplace in ((64, False), (None, True), (3, True)):
        x = s.clone().requires_grad_(True)
        y = x * 1.0
        v = W.reduce_per_position(fn, y, tt, mask, params, temperature=1.0, reduction="sum", chunk_size=chunk,
                                  normalizer=None, kernel="torch", inplace=inplace)
        (g,) = torch.autograd.grad(3.0 * v, x)
        assert v.item() == pytest.approx(dense.item(), rel=1e-6)
        torch.testing.assert_close(g, 3.0 * gd, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# fused LM head + loss
# ----------------------------------------------------------------------------------------------------------
def _heads(dtype=torch.float32, vocab=37, vocab_t=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(2, 5, 16, generator=g).to(dtype)
    ws = (0.4 * torch.randn(vocab, 16, generator=g)).to(dtype)
    ht = torch.randn(2, 5, 12, generator=g).to(dtype)
    wt = (0.4 * torch.randn(vocab_t, 12, generator=g)).to(dtype)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    labels = torch.randint(0, min(vocab, vocab_t), (2, 5), generator=g)
    labels[0, 0] = -100
    return hs, ws, ht, wt, mask, labels


def _unfused(name, hs, ws, ht, wt, mask, labels, tau, params=None):
    from harness.models import align_vocab

    zs, zt = align_vocab(hs @ ws.t(), ht @ wt.t())
    if name == "ce":
        return W.cross_entropy(hs @ ws.t(), labels, mask, reduction="mean", chunk_size=None, normalizer=None,
                               kernel="torch")
    fn = _fn(name)
    params = {**(DEFAULTS[name] if name in DEFAULTS else O.spec(name).defaults), **(params or {})}
    return W.reduce_per_position(fn, zs, zt, mask, params, temperature=tau, reduction="mean", chunk_size=None,
                                 normalizer=None, kernel="torch")


@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd", "srkl", "akl", "bdkd", "todi", "ce"])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_fused_equals_unfused(name, kernel):
    vocab_t = 40 if name in ("jsd", "todi") else 37  # a teacher with 3 more (padded) rows for some
    hs, ws, ht, wt, mask, labels = _heads(vocab_t=vocab_t)
    tau = 1.0 if name == "ce" else 1.5
    a, b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    ref = _unfused(name, a, b, ht, wt, mask, labels, tau)
    ga, gb = torch.autograd.grad(ref, (a, b))
    objective = _as_builtin(name) if name in REFS else name
    params = DEFAULTS.get(name) if name in REFS else None
    for chunk in (1, 3, None):
        a2, b2 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        v = fused_linear_loss(objective, a2, b2, ht, wt, mask, labels=labels, params=params, temperature=tau,
                              chunk_size=chunk, kernel=kernel)
        assert v.dtype == torch.float32 and v.dim() == 0
        assert v.item() == pytest.approx(ref.item(), rel=2e-6, abs=2e-6), (name, chunk)
        g2a, g2b = torch.autograd.grad(0.5 * v, (a2, b2))
        torch.testing.assert_close(g2a, 0.5 * ga, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g2b, 0.5 * gb, rtol=1e-4, atol=1e-6)


def test_fused_bf16_and_reductions():
    hs, ws, ht, wt, mask, labels = _heads(torch.bfloat16, seed=3)
    for kernel in ("torch", "triton"):
        a, b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        ref = O.get("fkl")(a @ b.t(), ht @ wt.t(), mask, reduction="sum")
        ga, gb = torch.autograd.grad(ref, (a, b))
        a2, b2 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        v = fused_linear_loss("fkl", a2, b2, ht, wt, mask, reduction="sum", chunk_size=2, kernel=kernel)
        g2a, g2b = torch.autograd.grad(v, (a2, b2))
        assert v.item() == pytest.approx(ref.item(), rel=1e-5)
        assert g2a.dtype == torch.bfloat16 and g2b.dtype == torch.bfloat16
        torch.testing.assert_close(g2a.float(), ga.float(), rtol=2e-2, atol=2e-2 * ga.abs().max().item())
        torch.testing.assert_close(g2b.float(), gb.float(), rtol=2e-2, atol=2e-2 * gb.abs().max().item())


def test_fused_edge_cases():
    hs, ws, ht, wt, mask, labels = _heads()
    a, b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    zero = fused_linear_loss("jsd", a, b, ht, wt, torch.zeros_like(mask), kernel="triton")
    ga, gb = torch.autograd.grad(zero, (a, b))
    assert zero.item() == 0 and (ga == 0).all() and (gb == 0).all()
    frozen = fused_linear_loss("jsd", hs.clone().requires_grad_(True), ws, ht, wt, mask, kernel="triton")
    assert frozen.requires_grad  # gradient to the hidden states only
    with pytest.raises(ValueError, match="batch-wise"):
        fused_linear_loss("sinkhorn", hs, ws, ht, wt, mask)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_loss("fkl", hs, ws, ht, wt, mask, reduction="none")
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_loss("fkl", hs, ws.t(), ht, wt, mask)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_loss("ce", hs, ws, mask=mask)
    with pytest.raises(O.ObjectiveError):
        fused_linear_loss("fkl", hs, ws, ht, wt, mask, params={"alpha": 0.1})


# ----------------------------------------------------------------------------------------------------------
# the GPU benchmark's code path, on CPU with tiny shapes
# ----------------------------------------------------------------------------------------------------------
def test_bench_kernel_suite_smoke(tmp_path):
    from harness import bench

    out = tmp_path / "kernels.md"
    bench.main(["objectives", "--suite", "gpu", "--device", "cpu", "--vocab", "40", "--positions", "6",
                "--ids", "fkl", "jsd", "ce", "--fused-shape", "6", "8", "40", "--repeats", "1", "--no-compile",
                "--programs", "2",
                "--dtype", "float32", "--out", str(out)])
    text = out.read_text()
    for row in ("| fkl | triton |", "| fkl | triton, in place |", "| fkl | torch eager |", "| jsd | TRL",
                "| jsd | triton, in place, 2 programs |",
                "| ce | triton |", "fused"):
        assert row in text, row
    assert "× floor" in text and "liger" in text.lower()
    for line in text.splitlines():  # every implementation agrees with eager PyTorch (value column, Δ column)
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 12 and cells[0] in ("fkl", "jsd", "ce"):
            assert float(cells[-1]) < 1e-5, line


def test_kernels_compile_for_h100_without_a_gpu():
    """Triton's NVIDIA backend (and ptxas) compile every kernel for sm_90 here: what the interpreter cannot
    check (types of loop-carried values, lowering). In a subprocess: the interpreter is on in this one."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-m", "harness.objectives.kernels.compile_check", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode == 2:
        pytest.skip(f"Triton's NVIDIA backend cannot compile here: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("ok ") == len(K.KERNEL_IDS)
