"""The LNSR ops: the fused diff norm, scaled noise and in-manifold noise kernels against their eager references
and against plain formulas written here (under Triton's interpreter when there is no GPU)."""

import pytest
import torch

import fusednoise
from devices import KERNEL_DEVICE
from fusednoise import ops_lnsr
from fusednoise.reference import lnsr as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# One rounding of the result in the gradient's dtype (relative).
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _layers(L, B, T, D, dtype, seed, device=KERNEL_DEVICE):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(L, B, T, D, generator=g).to(device=device, dtype=dtype)
    noisy = (clean.float() + 0.3 * torch.randn(L, B, T, D, generator=g).to(device)).to(dtype)
    return clean, noisy


def _mask(B, T, seed, device=KERNEL_DEVICE):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1, T // 2:] = False  # a padded tail, as a tokenizer makes
    return mask.to(device=device, dtype=torch.long)


def _formula(clean, noisy, weights, mask, reduction="sum"):
    """sum_r w_r * mean_b ||m * (clean_r - noisy_r)||^2 / c_b by plain autograd in float64, with c_b = 1 (sum),
    the example's real-token count (token_mean) or that times D (mean)."""
    c = clean.detach().double().requires_grad_()
    n = noisy.detach().double().requires_grad_()
    L, B, T, D = clean.shape
    keep = torch.ones(B, T, dtype=torch.float64, device=clean.device) if mask is None else (mask != 0).double()
    diff = (c - n) * keep[None, :, :, None]
    per_example = diff.pow(2).sum(dim=(2, 3))                     # (L, B)
    if reduction != "sum":
        per_example = per_example / (keep.sum(dim=1) * (D if reduction == "mean" else 1))
    per_layer = per_example.sum(dim=1) / B
    if weights is not None:
        per_layer = per_layer * torch.tensor(weights, dtype=torch.float64, device=clean.device)
    total = per_layer.sum()
    total.backward()
    return total.detach(), per_layer.detach(), c.grad, n.grad


def _fused(clean, noisy, weights, mask, backend, as_list=True, reduction="sum"):
    c = clean.detach().clone().requires_grad_()
    n = noisy.detach().clone().requires_grad_()
    with fusednoise.backend(backend):
        ci = list(c.unbind(0)) if as_list else c
        per_layer = ops_lnsr.layerwise_diff_norm(ci, n, weights=weights, mask=mask, reduction=reduction,
                                                 per_layer=True)
        total = ops_lnsr.layerwise_diff_norm(ci, n, weights=weights, mask=mask, reduction=reduction)
        total.backward()
    return total.detach(), per_layer.detach(), c.grad, n.grad


# --------------------------------------------------------------------------------------------- diff norm
@pytest.mark.parametrize("reduction", ops_lnsr.REDUCTIONS)
@pytest.mark.parametrize("L", [1, 12])
@pytest.mark.parametrize("use_weights", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_diff_norm_kernel_matches_reference_and_formula(dtype, use_mask, use_weights, L, reduction):
    B, T, D = 3, 5, 24
    clean, noisy = _layers(L, B, T, D, dtype, seed=L * 7 + use_mask)
    mask = _mask(B, T, seed=L) if use_mask else None
    weights = [0.2 + 0.8 * r / max(L - 1, 1) for r in range(L)] if use_weights else None

    total, per_layer, gc, gn = _fused(clean, noisy, weights, mask, "triton", reduction=reduction)
    r_total, r_per_layer, r_gc, r_gn = _fused(clean, noisy, weights, mask, "reference", reduction=reduction)
    f_total, f_per_layer, f_gc, f_gn = _formula(clean, noisy, weights, mask, reduction)

    assert total.dtype == per_layer.dtype == torch.float32  # float32 accumulation whatever the input dtype
    assert per_layer.shape == (L,)
    assert f_total > 0
    for value, expected in ((total, f_total), (r_total, f_total), (per_layer, f_per_layer),
                            (r_per_layer, f_per_layer)):
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(total, per_layer.sum(), rtol=1e-6, atol=0)
    rtol = GRAD_RTOL[dtype]
    for grad, ref_grad, formula_grad in ((gc, r_gc, f_gc), (gn, r_gn, f_gn)):
        assert grad.dtype == dtype and grad.shape == clean.shape
        torch.testing.assert_close(grad.double(), formula_grad, rtol=rtol, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(gn, -gc, rtol=0, atol=0)
    if mask is not None:  # padded tokens contribute nothing and get an exact zero gradient
        padded = (mask == 0)[None, :, :, None].expand_as(gc)
        assert gc[padded].abs().max() == 0 and gn[padded].abs().max() == 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_diff_norm_is_deterministic(backend):
    clean, noisy = _layers(12, 2, 6, 40, torch.bfloat16, seed=3)
    mask = _mask(2, 6, seed=3)
    first = _fused(clean, noisy, None, mask, backend)
    second = _fused(clean, noisy, None, mask, backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ops_lnsr.REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_diff_norm_across_several_programs_per_layer(monkeypatch, dtype, reduction):
    # On a GPU every layer is split over many programs whose partial sums the host adds in a fixed order; under
    # the interpreter the plan is one program per layer unless forced. 14 rows of 3 per program: 4 programs per
    # layer (4 rows each, the last one 2), the row blocks smaller than a program's range.
    from fusednoise.kernels import diff_norm

    monkeypatch.setattr(diff_norm, "ROWS_PER_PROGRAM_OVERRIDE", 3)
    L, B, T, D = 5, 2, 7, 40
    block_r, _, rows_per_prog, chunks = diff_norm.plan(B * T, D, L, torch.device(KERNEL_DEVICE))
    assert (block_r, rows_per_prog, chunks) == (4, 4, 4)
    clean, noisy = _layers(L, B, T, D, dtype, seed=21)
    mask = _mask(B, T, seed=21)
    weights = [1.0, 0.8, 0.6, 0.4, 0.2]
    first = _fused(clean, noisy, weights, mask, "triton", reduction=reduction)
    second = _fused(clean, noisy, weights, mask, "triton", reduction=reduction)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # deterministic: fixed slots, summed in a fixed order
    total, per_layer, gc, gn = first
    f_total, f_per_layer, f_gc, f_gn = _formula(clean, noisy, weights, mask, reduction)
    torch.testing.assert_close(per_layer.double(), f_per_layer, rtol=1e-5, atol=0)
    torch.testing.assert_close(total.double(), f_total, rtol=1e-5, atol=0)
    torch.testing.assert_close(gc.double(), f_gc, rtol=GRAD_RTOL[dtype], atol=1e-6)
    torch.testing.assert_close(gn, -gc, rtol=0, atol=0)


def _time_major(t):
    """(B, T, D) values stored as (T, B, D), XLNet's layout."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def test_diff_norm_row_layouts_and_vector_width():
    # The kernel addresses row i at i * stride: batch-major rows for contiguous layouts and padded rows,
    # token-major for (T, B, D) storage read as (B, T, D), contiguous copies otherwise; 16-byte accesses only
    # when every row starts on a 16-byte boundary.
    from fusednoise.kernels import diff_norm

    B, T, D = 2, 5, 16
    x = torch.randn(B, T, D)
    time_major = _time_major(x)
    assert diff_norm.row_layout([time_major], [_time_major(x)])[2:] == (D, D, True)
    cv, _, s_c, s_n, token_major = diff_norm.row_layout([time_major], [x])  # mixed: the token-major side copied
    assert (s_c, s_n, token_major) == (D, D, False) and cv[0].is_contiguous()
    wide = torch.randn(B, T, 3 * D)[:, :, :D]  # rows with gaps: read in place
    assert diff_norm.row_layout([wide], [x])[0][0] is wide and diff_norm.row_layout([wide], [x])[2] == 3 * D
    skipping = torch.randn(B, 2 * T, D)[:, :T]  # no single row stride: copied
    assert diff_norm.row_layout([skipping], [x])[0][0].is_contiguous()
    assert diff_norm.vector_width([x], (D,)) == 4
    assert diff_norm.vector_width([x.bfloat16()], (D,)) == 8
    assert diff_norm.vector_width([x], (D + 2,)) == 1
    shifted = torch.randn(B * T * D + 1)[1:].view(B, T, D)
    assert diff_norm.vector_width([x, shifted], (D,)) == 1
    # Column blocks: the widest power of two that wastes the fewest masked lanes.
    assert [diff_norm.block_d_for(d, 1024) for d in (384, 768, 1024, 4096, 24, 1000)] == [128, 256, 1024, 1024, 8,
                                                                                          1024]


def test_diff_norm_token_major_and_unaligned_inputs_match_the_formula():
    L, B, T, D = 3, 2, 5, 16
    clean, noisy = _layers(L, B, T, D, torch.float32, seed=13)
    mask = _mask(B, T, seed=13)
    f_total, _, f_gc, f_gn = _formula(clean, noisy, None, mask, "token_mean")
    c = [_time_major(v).requires_grad_() for v in clean.unbind(0)]     # token-major, aligned
    storage = torch.zeros(L * B * T * D + 1, device=clean.device)
    storage[1:] = noisy.reshape(-1)
    n = storage[1:].view(L, B, T, D).detach().requires_grad_()         # 4 bytes off a 16-byte boundary
    with fusednoise.backend("triton"):
        total = ops_lnsr.layerwise_diff_norm(c, n, mask=mask, reduction="token_mean")
        total.backward()
    torch.testing.assert_close(total.double(), f_total, rtol=1e-5, atol=0)
    for r in range(L):
        assert c[r].grad.stride() == c[r].stride()  # token-major gradients, written in place
        torch.testing.assert_close(c[r].grad.double(), f_gc[r], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(n.grad.double(), f_gn, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_paired_diff_norm_equals_the_two_halves(backend):
    L, B, T, D = 3, 2, 4, 12
    clean, noisy = _layers(L, B, T, D, torch.float32, seed=5)
    mask = _mask(B, T, seed=5)
    both = torch.cat([clean, noisy], dim=1).requires_grad_()
    with fusednoise.backend(backend):
        paired = ops_lnsr.layerwise_diff_norm_paired(list(both.unbind(0)), weights=[1.0, 0.5, 0.25], mask=mask,
                                                     reduction="token_mean")
        paired.backward()
    total, _, f_gc, f_gn = _formula(clean, noisy, [1.0, 0.5, 0.25], mask, "token_mean")
    torch.testing.assert_close(paired.double(), total, rtol=1e-6, atol=0)
    torch.testing.assert_close(both.grad.double(), torch.cat([f_gc, f_gn], dim=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_diff_norm_reductions_of_an_example_without_real_tokens(backend):
    # An all-padding example adds 0 (no division by a zero token count) and gets a zero gradient; the others'
    # terms are divided by their own token counts, and the batch mean still counts B examples.
    clean, noisy = _layers(2, 3, 4, 8, torch.float32, seed=9)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], device=clean.device)
    for reduction in ops_lnsr.REDUCTIONS:
        total, per_layer, gc, gn = _fused(clean, noisy, None, mask, backend, reduction=reduction)
        f_total, f_per_layer, f_gc, _ = _formula(clean[:, [0, 2]], noisy[:, [0, 2]], None, mask[[0, 2]], reduction)
        torch.testing.assert_close(total.double(), f_total * 2 / 3, rtol=1e-5, atol=0)
        assert torch.isfinite(gc).all() and gc[:, 1].abs().max() == 0
        torch.testing.assert_close(gc[:, [0, 2]].double(), f_gc * 2 / 3, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ops_lnsr.REDUCTIONS)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_diff_norm_never_reads_padded_positions(backend, reduction):
    """inf and NaN in padded positions (mask 0) of the clean and noisy states change nothing: the penalty, the
    per-layer terms and the gradients equal those with zeros there (and the formula's), and the padded
    positions' gradients are exactly 0. Multiplying a padded row by 0 instead of skipping it gives NaN."""
    L, B, T, D = 2, 3, 5, 8
    clean, noisy = _layers(L, B, T, D, torch.float32, seed=13)
    mask = _mask(B, T, seed=13)
    padded = (mask == 0)[None, :, :, None].expand(L, B, T, D)
    assert padded.any()
    zeros = (clean.masked_fill(padded, 0.0), noisy.masked_fill(padded, 0.0))
    poisoned = (clean.masked_fill(padded, float("inf")), noisy.masked_fill(padded, float("nan")))
    poisoned[0][0, -1, -1, 0] = -float("inf")  # both signs of inf
    got = _fused(*poisoned, [1.0, 0.5], mask, backend, reduction=reduction)
    clean_run = _fused(*zeros, [1.0, 0.5], mask, backend, reduction=reduction)
    for value in got:
        assert torch.isfinite(value).all()
    for a, b in zip(got, clean_run):
        assert torch.equal(a, b)
    assert not got[2][padded].any() and not got[3][padded].any()
    f_total, f_per_layer, f_gc, _ = _formula(*zeros, [1.0, 0.5], mask, reduction)
    torch.testing.assert_close(got[0].double(), f_total, rtol=1e-5, atol=0)
    torch.testing.assert_close(got[2].double(), f_gc, rtol=1e-5, atol=1e-7)


def test_diff_norm_scalar_weight_and_bool_mask():
    clean, noisy = _layers(3, 2, 4, 8, torch.float32, seed=2)
    mask = _mask(2, 4, seed=2)
    with fusednoise.backend("triton"):
        scalar = ops_lnsr.layerwise_diff_norm(clean, noisy, weights=0.4, mask=mask.bool())
        listed = ops_lnsr.layerwise_diff_norm(clean, noisy, weights=[0.4] * 3, mask=mask)
        tensor = ops_lnsr.layerwise_diff_norm(clean, noisy, weights=torch.full((3,), 0.4), mask=mask.float())
    assert torch.equal(scalar, listed) and torch.equal(scalar, tensor)


def test_diff_norm_traces_under_torch_compile():
    clean, noisy = _layers(2, 2, 3, 8, torch.float32, seed=8)
    mask = _mask(2, 3, seed=8)

    def loss(c, n):
        return ops_lnsr.layerwise_diff_norm(list(c.unbind(0)), n, mask=mask) * 2.0

    c1, c2 = clean.clone().requires_grad_(), clean.clone().requires_grad_()
    eager = loss(c1, noisy)
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(c2, noisy)
    compiled.backward()
    assert torch.equal(compiled, eager) and torch.equal(c1.grad, c2.grad)


@pytest.mark.parametrize("call, match", [
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c[:3], n), "clean has 3 layers but noisy has 4"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n[:, :, :3]), r"noisy has layers of shape \(2, 3, 8\)"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(list(c.unbind(0)), [n[0], n[1], n[2], n[3][:, :, :4]]),
     r"noisy\[3\] has layers of shape"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n.double()), "noisy must be float32, float16 or bfloat16"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n.half()), "noisy has dtype torch.float16"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n, weights=[1.0, 1.0]), r"weights must have one entry per "
     r"layer \(4\), got 2"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n, weights=torch.ones(5)), r"weights must have one entry"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n, weights=[1.0, -1.0, 1.0, 1.0]), r"weights\[1\] must be"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n, weights="all"), "weights must be None, a number"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n, mask=torch.ones(2, 4)), r"mask must have shape \(B, T\) = "
     r"\(2, 5\), got \(2, 4\)"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n, mask=[[1] * 5] * 2), "mask must be a torch.Tensor"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c[0], n), r"clean must be a stacked \(L, B, T, D\) tensor"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm([], n), "clean must hold at least one layer"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n, per_layer=1), "per_layer must be a bool"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm(c, n, reduction="max"), "reduction must be one of"),
    (lambda c, n: ops_lnsr.layerwise_diff_norm_paired(c[:, :1], mask=None), "even batch"),
])
def test_diff_norm_bad_inputs_raise_clear_errors(call, match):
    clean, noisy = _layers(4, 2, 5, 8, torch.float32, seed=1, device="cpu")
    with pytest.raises((ValueError, TypeError), match=match):
        call(clean, noisy)


# --------------------------------------------------------------------------------------------- scaled noise
def _noise_unit(x, seed):
    D = x.shape[-1]
    return ref.row_normals(x.numel() // D, D, seed, x.device).reshape(x.shape)


@pytest.mark.parametrize("D", [24, 10, 4100], ids=["D24", "D10-unaligned", "D4100-two-sweeps"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scaled_noise_kernel_matches_reference(dtype, D):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(3, 2, D, generator=g).to(device=KERNEL_DEVICE, dtype=dtype)
    x[1, 0] = 0  # a zero row
    grad = torch.randn(3, 2, D, generator=g).to(device=KERNEL_DEVICE, dtype=dtype)
    outs = {}
    for backend in ("triton", "reference"):
        xi = x.clone().requires_grad_()
        with fusednoise.backend(backend):
            out = ops_lnsr.scaled_noise(xi, 0.05, seed=1234 + D)
            (dx,) = torch.autograd.grad(out, xi, grad)
        outs[backend] = (out.detach(), dx)
    rtol = {torch.float32: 1e-5}.get(dtype, GRAD_RTOL[dtype])
    # On a GPU the normals come from the MUFU Box-Muller: up to reference.noise.fast_normal_error_bound (6e-4 for
    # the rare u1 near 1) apart, times scale * |x| / |e| (about 0.05 here).
    atol = 1e-6 + (0.05 * 6.2e-4 * 1.3 if torch.cuda.is_available() else 0.0)
    for a, b in zip(outs["triton"], outs["reference"]):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    assert not torch.equal(outs["triton"][0], x)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_scaled_noise_norm_ratio_holds_per_token(backend):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 48, generator=g) * torch.rand(4, 6, 1, generator=g) * 10).to(KERNEL_DEVICE)
    x[0, 0] = 0
    x[2, 5] = 0
    with fusednoise.backend(backend):
        out = ops_lnsr.scaled_noise(x, 0.05, seed=99)
    assert torch.isfinite(out).all()
    eps = out.double() - x.double()
    zero_rows = x.abs().sum(-1) == 0
    assert torch.equal(out[zero_rows], x[zero_rows])  # zero rows: zero noise, no NaN
    ratio = eps.norm(dim=-1)[~zero_rows] / x.double().norm(dim=-1)[~zero_rows]
    assert (ratio - 0.05).abs().max() / 0.05 < 1e-5  # ||eps|| / ||x|| = 0.05 to a relative 1e-5


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_scaled_noise_gradient_matches_autograd_formula(backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 16, generator=g).to(KERNEL_DEVICE)
    x[0, 1] = 0
    grad = torch.randn(3, 5, 16, generator=g).to(KERNEL_DEVICE)
    seed = 777
    xi = x.clone().requires_grad_()
    with fusednoise.backend(backend):
        (dx,) = torch.autograd.grad(ops_lnsr.scaled_noise(xi, 0.05, seed=seed), xi, grad)
    # The formula with the same unit noise e, differentiated by autograd in float64.
    e = _noise_unit(x, seed).double()
    xd = x.double().requires_grad_()
    out = xd + 0.05 * torch.linalg.vector_norm(xd, dim=-1, keepdim=True) * e / e.norm(dim=-1, keepdim=True)
    (expected,) = torch.autograd.grad(out, xd, grad.double())
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(dx, grad)  # the norm term is really there


def test_scaled_noise_scale_zero_is_identity_and_seed_reproduces():
    x = torch.randn(2, 3, 8, device=KERNEL_DEVICE)
    with fusednoise.backend("triton"):
        assert torch.equal(ops_lnsr.scaled_noise(x, 0.0), x)
        torch.manual_seed(5)
        a = ops_lnsr.scaled_noise(x)
        torch.manual_seed(5)
        b = ops_lnsr.scaled_noise(x)
        c = ops_lnsr.scaled_noise(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scaled_noise_directions_are_gaussian():
    # e / ||e|| * sqrt(D) is close to N(0, 1) for large D: check the unit normals the rows are made from.
    from scipy import stats

    e = ref.row_normals(250, 4000, seed=3).reshape(-1).numpy()
    assert abs(e.mean()) < 5e-3 and abs(e.std() - 1) < 5e-3
    assert stats.kstest(e[:200_000], "norm").pvalue > 1e-3


@pytest.mark.parametrize("call, match", [
    (lambda x: ops_lnsr.scaled_noise(x, -0.1), "scale must be a finite number >= 0"),
    (lambda x: ops_lnsr.scaled_noise(x, float("nan")), "scale must be a finite number"),
    (lambda x: ops_lnsr.scaled_noise(x.long(), 0.1), "x must be float32"),
    (lambda x: ops_lnsr.scaled_noise(x, 0.1, seed=-1), "seed must be in"),
    (lambda x: ops_lnsr.scaled_noise(x[0, 0, 0], 0.1), "at least one dimension"),
])
def test_scaled_noise_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(2, 3, 4))


# --------------------------------------------------------------------------------------------- in-manifold noise
def _vocab(V=60, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, D, generator=g)


def test_neighbor_table_equals_bruteforce_topk():
    weight = _vocab(V=203, D=12, seed=1)
    # Chunks smaller than V exercise the running top-k merge across row and column blocks.
    chunked = ops_lnsr.nearest_neighbors(weight, k=7, row_chunk=32, col_chunk=50)
    one_chunk = ops_lnsr.nearest_neighbors(weight, k=7)
    brute = ref.nearest_neighbors_bruteforce(weight, 7)
    assert chunked.dtype == torch.int64 and chunked.shape == (203, 7)
    assert torch.equal(chunked, brute) and torch.equal(one_chunk, brute)
    assert not (chunked == torch.arange(203)[:, None]).any()  # a token is never its own neighbour


def test_neighbor_table_is_cached_and_refreshable():
    ops_lnsr.clear_neighbor_cache()
    weight = torch.nn.Parameter(_vocab(V=40, D=8, seed=2))
    first = ops_lnsr.neighbor_table(weight, k=5)
    assert ops_lnsr.neighbor_table(weight, k=5) is first
    assert ops_lnsr.neighbor_table(weight, k=3).shape == (40, 3)
    with torch.no_grad():
        weight.copy_(_vocab(V=40, D=8, seed=3))
    assert ops_lnsr.neighbor_table(weight, k=5) is first  # stale until refreshed
    refreshed = ops_lnsr.neighbor_table(weight, k=5, refresh=True)
    assert torch.equal(refreshed, ref.nearest_neighbors_bruteforce(weight, 5))
    assert not torch.equal(refreshed, first)
    ops_lnsr.clear_neighbor_cache()
    assert ops_lnsr.neighbor_table(weight, k=5) is not refreshed


def test_neighbor_table_is_shared_by_tensors_with_the_same_values():
    ops_lnsr.clear_neighbor_cache()
    pretrained = _vocab(V=40, D=8, seed=5)
    first = ops_lnsr.neighbor_table(torch.nn.Parameter(pretrained.clone()), k=5)
    reloaded = torch.nn.Parameter(pretrained.clone())  # the same model loaded again (another seed)
    assert ops_lnsr.neighbor_table(reloaded, k=5) is first
    other = torch.nn.Parameter(_vocab(V=40, D=8, seed=6))
    assert torch.equal(ops_lnsr.neighbor_table(other, k=5), ref.nearest_neighbors_bruteforce(other, 5))
    assert not torch.equal(ops_lnsr.neighbor_table(other, k=5), first)
    as_half = torch.nn.Parameter(pretrained.clone().half())  # other bytes: a table of its own
    assert ops_lnsr.neighbor_table(as_half, k=5) is not first
    fresh = ops_lnsr.neighbor_table(reloaded, k=5, refresh=True)
    assert fresh is not first and torch.equal(fresh, first)
    ops_lnsr.clear_neighbor_cache()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_in_manifold_kernel_matches_reference(dtype):
    weight = _vocab(V=60, D=20, seed=4).to(device=KERNEL_DEVICE, dtype=dtype)
    neighbors = ops_lnsr.nearest_neighbors(weight, k=10)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 60, (2, 7), generator=g).to(KERNEL_DEVICE)
    x = torch.randn(2, 7, 20, generator=g).to(device=KERNEL_DEVICE, dtype=dtype)
    outs = {}
    for backend in ("triton", "reference"):
        with fusednoise.backend(backend):
            outs[backend] = ops_lnsr.in_manifold_noise(x, ids, weight, mix_ratio=0.15, seed=21,
                                                       neighbors=neighbors)
    assert outs["triton"].dtype == dtype
    rtol = {torch.float32: 1e-5}.get(dtype, GRAD_RTOL[dtype])
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=rtol, atol=1e-5)
    assert not torch.equal(outs["triton"], x)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_in_manifold_noise_lies_in_the_span_of_neighbour_differences(backend):
    V, D, k = 80, 24, 10
    weight = _vocab(V, D, seed=5).to(KERNEL_DEVICE)
    neighbors = ops_lnsr.nearest_neighbors(weight, k=k)
    ids = torch.arange(0, 40, 3, device=KERNEL_DEVICE).reshape(2, 7)
    zeros = torch.zeros(2, 7, D, device=KERNEL_DEVICE)
    with fusednoise.backend(backend):
        eps = ops_lnsr.in_manifold_noise(zeros, ids, weight, k=k, mix_ratio=0.1, seed=8).reshape(-1, D)
    flat = ids.reshape(-1)
    diffs = (weight[neighbors[flat]] - weight[flat][:, None, :]).double()      # (N, k, D)
    for n in range(flat.numel()):
        basis = diffs[n].T                                                     # (D, k)
        coef = torch.linalg.lstsq(basis, eps[n].double()[:, None]).solution
        residual = (basis @ coef).squeeze(1) - eps[n].double()
        assert eps[n].norm() > 0
        assert residual.norm() / eps[n].double().norm() < 1e-5


def test_in_manifold_reference_is_unnormalised_gram_schmidt():
    """sum_j z_j d~_j with d~_j = q_j r_jj (QR in float64): orthogonalised in order, not normalised."""
    V, D, k = 50, 16, 6
    weight = _vocab(V, D, seed=6)
    neighbors = ref.nearest_neighbors_bruteforce(weight, k)
    ids = torch.tensor([[3, 17, 42]])
    seed, mix = 13, 0.2
    eps = ref.in_manifold_noise(torch.zeros(1, 3, D), ids, weight, neighbors, mix, seed)[0].double()
    z = mix * ref.row_normals(3, k, seed).double()
    for n, token in enumerate(ids[0]):
        d = (weight[neighbors[token]] - weight[token]).double()               # (k, D)
        q, r = torch.linalg.qr(d.T)
        orthogonal = q * torch.diagonal(r)[None, :]                           # columns d~_j
        gram = orthogonal.T @ orthogonal
        assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-10
        torch.testing.assert_close(eps[n], orthogonal @ z[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_in_manifold_duplicate_and_dependent_neighbours_give_finite_noise(backend):
    weight = _vocab(V=12, D=8, seed=7)
    weight[1] = weight[0]                         # a duplicate: difference 0
    weight[2] = 2 * weight[3] - weight[0]         # d_2 = 2 d_3: linearly dependent
    weight = weight.to(KERNEL_DEVICE)
    neighbors = torch.tensor([[1, 3, 2, 4]] + [[(i + j) % 12 for j in range(1, 5)] for i in range(1, 12)],
                             device=KERNEL_DEVICE)
    ids = torch.zeros(1, 1, dtype=torch.long, device=KERNEL_DEVICE)
    with fusednoise.backend(backend):
        eps = ops_lnsr.in_manifold_noise(torch.zeros(1, 1, 8, device=KERNEL_DEVICE), ids, weight, seed=3,
                                         neighbors=neighbors)[0, 0]
    assert torch.isfinite(eps).all() and eps.norm() > 0
    expected = ref.in_manifold_noise(torch.zeros(1, 1, 8), ids.cpu(), weight.cpu(), neighbors.cpu(), 0.1, 3)
    torch.testing.assert_close(eps.cpu(), expected[0, 0], rtol=1e-5, atol=1e-6)
    # Only d_3 (index 1 in the table) and d_4 survive: the noise lies in their span.
    basis = torch.stack([weight[3] - weight[0], weight[4] - weight[0]]).double().T.cpu()
    coef = torch.linalg.lstsq(basis, eps.double().cpu()[:, None]).solution
    assert ((basis @ coef).squeeze(1) - eps.double().cpu()).norm() < 1e-5 * eps.norm()


def test_in_manifold_gradient_is_identity_for_x():
    weight = torch.nn.Parameter(_vocab(V=30, D=8, seed=9))
    x = torch.randn(2, 3, 8, requires_grad=True)
    ids = torch.randint(0, 30, (2, 3))
    out = ops_lnsr.in_manifold_noise(x, ids, weight, k=4, seed=1)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.equal(x.grad, grad)
    assert weight.grad is None


@pytest.mark.parametrize("call, match", [
    (lambda x, ids, w: ops_lnsr.in_manifold_noise(x, ids[:, :2], w), r"token_ids must have shape"),
    (lambda x, ids, w: ops_lnsr.in_manifold_noise(x, ids.float(), w), "token_ids must be an int32 or int64"),
    (lambda x, ids, w: ops_lnsr.in_manifold_noise(x[..., :4], ids, w), "x's last dimension must match"),
    (lambda x, ids, w: ops_lnsr.in_manifold_noise(x, ids, w, k=30), r"k must be in \[1, 29\]"),
    (lambda x, ids, w: ops_lnsr.in_manifold_noise(x, ids, w, mix_ratio=-1), "mix_ratio must be"),
    (lambda x, ids, w: ops_lnsr.in_manifold_noise(x, ids + 100, w), r"token_ids must lie in \[0, 30\)"),
    (lambda x, ids, w: ops_lnsr.in_manifold_noise(x, ids, w[0]), r"embedding_weight must be a \(V, D\) matrix"),
    (lambda x, ids, w: ops_lnsr.in_manifold_noise(x, ids, w, neighbors=torch.zeros(5, 2, dtype=torch.long)),
     r"neighbors must be an integer \(V, k\) table"),
])
def test_in_manifold_bad_inputs(call, match):
    weight = _vocab(V=30, D=8, seed=9)
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(2, 3, 8), torch.randint(0, 30, (2, 3)), weight)


def test_in_manifold_kernel_gives_out_of_vocabulary_ids_no_noise():
    # On the GPU the ids are not range-checked (that would synchronise): the kernel reads nothing for them.
    from fusednoise.kernels.lnsr_noise import launch_in_manifold

    weight = _vocab(V=30, D=8, seed=10).to(KERNEL_DEVICE)
    neighbors = ops_lnsr.nearest_neighbors(weight, k=4)
    x = torch.randn(4, 8, device=KERNEL_DEVICE)
    ids = torch.tensor([3, 30, -1, 7], device=KERNEL_DEVICE)
    out = torch.empty_like(x)
    launch_in_manifold(x, ids, weight, neighbors, out, 0.1, 5)
    assert torch.equal(out[1:3], x[1:3])
    assert not torch.equal(out[0], x[0]) and not torch.equal(out[3], x[3])
