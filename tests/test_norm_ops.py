"""Fused residual-add + norm ops (``add_rms_norm``, ``add_layer_norm``): kernel against reference, both against
the formulas written here (the eager layers' rounding, the noise of the HyPe ops), gradients, the offset path."""
import pytest
import torch
import torch.nn.functional as F

import fusednoise
from devices import KERNEL_DEVICE
from fusednoise import ops_norms, rng
from fusednoise.kernels import norms as norm_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def fresh(shape, dtype, scale=1.0):
    return (torch.randn(shape, device=KERNEL_DEVICE) * scale).to(dtype)


def rms_both(x, residual, weight, **kwargs):
    """Forward outputs and the gradients of a fixed random projection, on both backends."""
    probe = torch.randn(x.shape, device=x.device)
    results = {}
    for backend in ("triton", "reference"):
        with fusednoise.backend(backend):
            leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, residual, weight)]
            y, s = ops_norms.add_rms_norm(*leaves, **kwargs)
            ((y.float() * probe).sum() + (s.float() * probe.flip(-1)).sum()).backward()
            results[backend] = [y, s] + [t.grad for t in leaves if t is not None]
    return results["triton"], results["reference"]


def ln_both(x, residual, weight, bias, **kwargs):
    probe = torch.randn(x.shape, device=x.device)
    results = {}
    for backend in ("triton", "reference"):
        with fusednoise.backend(backend):
            leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
            y = ops_norms.add_layer_norm(*leaves, **kwargs)
            (y.float() * probe).sum().backward()
            results[backend] = [y] + [t.grad for t in leaves]
    return results["triton"], results["reference"]


def assert_all_close(fused, eager, dtype):
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), **TOLERANCE[dtype])


# ---------------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", ["normal", "uniform"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_add_rms_norm_kernel_matches_reference(dtype, distribution, rounding):
    x, residual, weight = fresh((3, 5, 64), dtype), fresh((3, 5, 64), dtype), fresh(64, dtype)
    fused, eager = rms_both(x, residual, weight, eps=1e-6, sigma=0.05, distribution=distribution,
                            seed=rng.draw_seed(), rounding=rounding)
    # The residual stream carries the noise: equal bit for bit (float32: up to the Box-Muller's ulps).
    if dtype == torch.float32:
        torch.testing.assert_close(fused[1], eager[1], rtol=0, atol=1e-6)
    else:
        assert torch.equal(fused[1], eager[1])
    assert_all_close(fused, eager, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", ["normal", "uniform"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_add_layer_norm_kernel_matches_reference(dtype, distribution, rounding):
    x, residual = fresh((3, 5, 64), dtype), fresh((3, 5, 64), dtype)
    weight, bias = fresh(64, dtype), fresh(64, dtype)
    fused, eager = ln_both(x, residual, weight, bias, eps=1e-12, sigma=0.05, distribution=distribution,
                           seed=rng.draw_seed(), rounding=rounding)
    assert_all_close(fused, eager, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_noise_or_residual(dtype):
    # s is x itself (no copy) and y the plain RMSNorm; the LayerNorm without bias.
    x, weight = fresh((7, 48), dtype), fresh(48, dtype)
    fused, eager = rms_both(x, None, weight, eps=1e-5)
    assert_all_close(fused, eager, dtype)
    y, s = ops_norms.add_rms_norm(x, None, weight)
    assert s is x
    fused, eager = ln_both(x, fresh((7, 48), dtype), weight, fresh(48, dtype), eps=1e-5)
    assert_all_close(fused, eager, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_not_a_multiple_of_the_noise_group_take_the_two_pass_path(dtype):
    # 44 features: not a multiple of 8 (bf16's group); float32's group of 4 divides it.
    x, residual, weight = fresh((6, 44), dtype), fresh((6, 44), dtype), fresh(44, dtype)
    seed = rng.draw_seed()
    fused, eager = rms_both(x, residual, weight, sigma=0.1, seed=seed, rounding="stochastic")
    assert_all_close(fused, eager, dtype)
    fused, eager = ln_both(x, residual, weight, fresh(44, dtype), sigma=0.1, seed=seed, rounding="stochastic")
    assert_all_close(fused, eager, dtype)


@pytest.mark.parametrize("width", [128, 48])
def test_backward_loops_over_several_row_tiles_per_program(monkeypatch, width):
    # Few programs: each walks several tiles of rows, the path large inputs take on a GPU; at 48 features each
    # row is 3 chunks, each with its own dW and dB sums carried from tile to tile.
    monkeypatch.setattr(norm_kernels, "MAX_BACKWARD_PROGRAMS", 2)
    x, residual, weight, bias = fresh((70, width), torch.float32), fresh((70, width), torch.float32), \
        fresh(width, torch.float32), fresh(width, torch.float32)
    assert norm_kernels.backward_plan(70, width, 4)[3] > norm_kernels.backward_plan(70, width, 4)[1]
    assert_all_close(*rms_both(x, residual, weight, sigma=0.0), torch.float32)
    assert_all_close(*ln_both(x, residual, weight, bias), torch.float32)


@pytest.mark.parametrize("dtype,width,chunks,sigma,rounding", [
    (torch.float32, 48, 3, 0.05, "nearest"), (torch.float16, 48, 3, 0.0, "nearest"),
    (torch.bfloat16, 48, 3, 0.05, "stochastic"), (torch.float32, 80, 5, 0.0, "nearest"),
    (torch.float16, 80, 5, 0.05, "stochastic"), (torch.bfloat16, 80, 5, 0.05, "nearest")])
def test_rows_that_are_not_a_power_of_two_are_held_as_chunks(dtype, width, chunks, sigma, rounding):
    # BERT's 768 = 3 x 256 and LLaMA-13B's 5120 = 5 x 1024 in small: 48 and 80 features are 3 and 5 chunks of a
    # power of two (2 or 4 groups) for every dtype, with no padded lane. 34 rows: three programs, the last partial.
    vec = norm_kernels.vec_for(dtype)
    block_q, n_chunks = norm_kernels.row_chunks(width, vec)
    assert (n_chunks, n_chunks * block_q * vec) == (chunks, width) and block_q > 1
    x, residual = fresh((2, 17, width), dtype), fresh((2, 17, width), dtype)
    weight, bias = fresh(width, dtype), fresh(width, dtype)
    seed = rng.draw_seed()
    fused, eager = rms_both(x, residual, weight, eps=1e-6, sigma=sigma, seed=seed, rounding=rounding)
    if dtype != torch.float32:
        assert torch.equal(fused[1], eager[1])  # the residual stream: each chunk's elements draw their own words
    assert_all_close(fused, eager, dtype)
    fused, eager = ln_both(x, residual, weight, bias, eps=1e-12, sigma=sigma, seed=seed, rounding=rounding)
    assert_all_close(fused, eager, dtype)


def test_chunked_rows_draw_the_noise_of_the_flat_index():
    # The noise of element (row, col) is add_residual_noise's for the same flat index, in every chunk of the row.
    x, residual, weight = fresh((5, 80), torch.bfloat16), fresh((5, 80), torch.bfloat16), fresh(80, torch.bfloat16)
    _, s = ops_norms.add_rms_norm(x, residual, weight, sigma=0.5, seed=21, rounding="stochastic")
    assert torch.equal(s, fusednoise.add_residual_noise(x, residual, 0.5, seed=21, rounding="stochastic"))
    bias = fresh(80, torch.bfloat16)
    y = ops_norms.add_layer_norm(x, residual, weight, bias, sigma=0.5, seed=22)
    with fusednoise.backend("reference"):
        clean = ops_norms.add_layer_norm(x, residual, weight, bias)
    # y - clean is the noise plus the rounding of the sum: within bf16's rounding of |y|, not 0.5 * N(0, 1) off
    expected = fusednoise.add_noise(clean, 0.5, seed=22)
    torch.testing.assert_close(y.float(), expected.float(), rtol=1.6e-2, atol=1.6e-2)


def test_row_chunks_tile_rows_without_padding_where_a_power_of_two_divides_them():
    assert norm_kernels.row_chunks(768, 8) == (32, 3)      # BERT-base, half precision: 3 x 256
    assert norm_kernels.row_chunks(768, 4) == (64, 3)      # float32: 3 x 256
    assert norm_kernels.row_chunks(5120, 8) == (128, 5)    # LLaMA-13B: 5 x 1024
    assert norm_kernels.row_chunks(4096, 8) == (512, 1)    # a power of two: one tile
    assert norm_kernels.row_chunks(44, 8) == (8, 1)        # not a multiple of the group: one padded tile
    assert norm_kernels.row_chunks(11008, 8) == (2048, 1)  # 43 chunks of 256 would be too many: padded
    for width in (768, 1024, 2560, 4096, 5120, 8192):
        block_q, chunks = norm_kernels.row_chunks(width, 8)
        assert chunks * block_q * 8 == width and chunks <= norm_kernels.MAX_CHUNKS


# ---------------------------------------------------------------------------------- against the formulas
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_llama_rms_norm_of_the_noisy_residual_stream(backend, dtype):
    x, residual, weight = fresh((4, 64), dtype), fresh((4, 64), dtype), fresh(64, dtype)
    with fusednoise.backend(backend):
        y, s = ops_norms.add_rms_norm(x, residual, weight, eps=1e-6, sigma=0.1, distribution="uniform", seed=11,
                                      rounding="stochastic")
        expected_s = fusednoise.add_residual_noise(x, residual, 0.1, "uniform", seed=11, rounding="stochastic")
    assert torch.equal(s, expected_s)  # the same philox words per element as the HyPe op
    hidden = s.float()
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y, weight * normed.to(dtype), **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unit_offset_is_gemmas_rms_norm_in_float32(backend):
    """GemmaRMSNorm: ``(s * rsqrt(mean(s**2) + eps) * (1 + w)).type_as(s)``, everything in float32; gradients too."""
    x, residual, weight = fresh((4, 64), torch.float32), fresh((4, 64), torch.float32), fresh(64, torch.float32)
    probe = torch.randn(4, 64, device=x.device)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight)]
        with fusednoise.backend(backend):
            if fused:
                y, s = ops_norms.add_rms_norm(*leaves, eps=1e-6, sigma=0.1, seed=3, unit_offset=True)
            else:
                s = fusednoise.add_residual_noise(leaves[0], leaves[1], 0.1, seed=3)
                y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + leaves[2])
            ((y * probe).sum() + (s * probe.flip(-1)).sum()).backward()
        results.append([y.detach(), s.detach()] + [leaf.grad for leaf in leaves])
    for fused, formula in zip(*results):
        torch.testing.assert_close(fused, formula, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unit_offset_refuses_half_precision_saying_why(dtype):
    x = torch.randn(2, 8).to(dtype)
    with pytest.raises(TypeError, match=f"needs float32 x, got {dtype}: the fused op rounds the normalised value"):
        ops_norms.add_rms_norm(x, None, torch.zeros(8), unit_offset=True)
    with pytest.raises(TypeError, match="unit_offset must be a bool"):
        ops_norms.add_rms_norm(x.float(), None, torch.zeros(8), unit_offset="yes")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_is_add_noise_of_the_eager_layer_norm(backend, dtype):
    x, residual = fresh((4, 64), dtype), fresh((4, 64), dtype)
    weight, bias = fresh(64, dtype), fresh(64, dtype)
    with fusednoise.backend(backend):
        y = ops_norms.add_layer_norm(x, residual, weight, bias, eps=1e-12, sigma=0.1, seed=12)
        clean = F.layer_norm(x + residual, (64,), weight, bias, 1e-12)
        expected = fusednoise.add_noise(clean, 0.1, seed=12)
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])
    assert not torch.equal(y, clean)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gradients_are_the_eager_formulas_gradients(backend):
    x, residual, weight, bias = (fresh((6, 32), torch.float32) for _ in range(2)), None, None, None
    x, residual = list(x)
    weight, bias = fresh(32, torch.float32), fresh(32, torch.float32)
    probe_y, probe_s = torch.randn(6, 32), torch.randn(6, 32)

    def rms_eager(a, r, w):
        s = fusednoise.add_residual_noise(a, r, 0.3, seed=1)  # the norm sees the noisy stream
        return w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)), s

    def ln_eager(a, r, w, b):
        return F.layer_norm(a + r, (32,), w, b, 1e-12)

    for fused_fn, eager_fn, tensors in (
            (lambda a, r, w: ops_norms.add_rms_norm(a, r, w, 1e-6, sigma=0.3, seed=1), rms_eager,
             (x, residual, weight)),
            (lambda a, r, w, b: (ops_norms.add_layer_norm(a, r, w, b, 1e-12, sigma=0.3, seed=1),), ln_eager,
             (x, residual, weight, bias))):
        grads = []
        for fn in (fused_fn, eager_fn):
            leaves = [t.clone().requires_grad_() for t in tensors]
            with fusednoise.backend(backend):  # the backward too: it picks its backend when it runs
                outputs = fn(*leaves)
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                loss = (outputs[0] * probe_y).sum() + (outputs[1] * probe_s).sum() if len(outputs) > 1 else \
                    (outputs[0] * probe_y).sum()
                loss.backward()
            grads.append([leaf.grad for leaf in leaves])
        for fused_grad, eager_grad in zip(*grads):  # the noise is additive: its gradient is the identity
            torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-5, atol=1e-5)


def test_offset_path_draws_the_hype_ops_noise_at_the_same_offset():
    x, residual, weight = fresh((4, 64), torch.bfloat16), fresh((4, 64), torch.bfloat16), fresh(64, torch.bfloat16)
    results = {}
    for backend in ("triton", "reference"):
        with fusednoise.backend(backend), rng.graph_safe():
            rng.set_offset(7, KERNEL_DEVICE)
            _, s = ops_norms.add_rms_norm(x, residual, weight, sigma=0.1, seed=3)
            rng.set_offset(7, KERNEL_DEVICE)
            expected = fusednoise.add_residual_noise(x, residual, 0.1, seed=3)
            rng.set_offset(0, KERNEL_DEVICE)
            host = fusednoise.add_residual_noise(x, residual, 0.1, seed=3)
        assert torch.equal(s, expected)
        assert not torch.equal(s, host)
        results[backend] = s
    assert torch.equal(results["triton"], results["reference"])


def test_torch_compile_fullgraph_equals_eager():
    def step(x, residual, weight, bias):
        y, s = ops_norms.add_rms_norm(x, residual, weight, sigma=0.1, seed=4)
        z = ops_norms.add_layer_norm(y, s, weight, bias, sigma=0.1, seed=5)
        return z.square().sum()

    tensors = [torch.randn(4, 16, requires_grad=True) for _ in range(2)] + \
        [torch.randn(16, requires_grad=True) for _ in range(2)]
    eager = step(*tensors)
    eager_grads = torch.autograd.grad(eager, tensors)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*tensors)
    compiled_grads = torch.autograd.grad(compiled, tensors)
    assert torch.equal(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.equal(a, b)


def test_bad_arguments_are_named():
    x, weight = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="residual"):
        ops_norms.add_rms_norm(x, torch.randn(2, 4), weight)
    with pytest.raises(ValueError, match="weight"):
        ops_norms.add_rms_norm(x, None, torch.randn(4))
    with pytest.raises(ValueError, match="distribution"):
        ops_norms.add_layer_norm(x, x, weight, None, distribution="laplace", sigma=0.1)
    with pytest.raises(ValueError, match="sigma"):
        ops_norms.add_layer_norm(x, x, weight, None, sigma=-1.0)
    with pytest.raises(TypeError, match="bias"):
        ops_norms.add_layer_norm(x, x, weight, torch.randn(8, dtype=torch.float64))
