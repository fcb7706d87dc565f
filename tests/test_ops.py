"""HyPe noise ops: the Triton kernel against the eager reference, the distributions, autograd and bad input."""
import math

import pytest
import scipy.stats
import torch

import fusednoise
from checkpointing import assert_checkpoint_replays_the_noise
from devices import HAS_CUDA, KERNEL_DEVICE
from fusednoise import rng
from fusednoise.kernels.noise import launch_noise
from fusednoise.reference import noise as reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTRIBUTIONS = ["normal", "uniform"]


def fresh(shape, dtype, device=KERNEL_DEVICE):
    return torch.randn(shape, device=device).to(dtype)


def run_both(op, *tensors, **kwargs):
    """The op on the triton and on the reference backend, same seed, same inputs (cloned)."""
    with fusednoise.backend("triton"):
        fused = op(*[t.clone() for t in tensors], **kwargs)
    with fusednoise.backend("reference"):
        eager = op(*[t.clone() for t in tensors], **kwargs)
    return fused, eager


def assert_close_to_reference(fused, eager, sigma, distribution="uniform", seed=0, offset=None):
    """float32: within a few ulp of the noise under the interpreter (log/cos/sin differ by ulps between
    libraries); on a GPU, normal noise within the fast Box-Muller's stated bound per element. Half precision:
    equal except where a value sits on a rounding boundary, and then one step apart."""
    assert fused.dtype == eager.dtype and fused.shape == eager.shape
    fused, eager = fused.cpu(), eager.cpu()
    if fused.dtype == torch.float32:
        tolerance = 4 * 1.2e-7 * (eager.abs() + 4 * sigma)
        if HAS_CUDA:  # the kernels use the MUFU approximations on a GPU
            bound = reference.standard_noise_error_bound(eager.numel(), distribution, seed,
                                                         offset=offset).view(eager.shape)  # float32: 32-bit
            tolerance = tolerance + sigma * bound.float()
        assert bool(((fused - eager).abs() <= tolerance).all()), float((fused - eager).abs().max())
        return
    differ = fused != eager
    assert differ.float().mean().item() < 1e-3
    steps = (fused.view(torch.int16).int() - eager.view(torch.int16).int()).abs()
    assert int(steps.max()) <= 1


# ---------------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_add_noise_kernel_matches_reference(dtype, distribution, rounding):
    x = fresh((3, 7, 331), dtype)  # numel not a multiple of 4 or of the block
    sigma = 0.05
    seed = rng.draw_seed()
    fused, eager = run_both(fusednoise.add_noise, x, sigma=sigma, distribution=distribution, seed=seed,
                            rounding=rounding)
    assert_close_to_reference(fused, eager, sigma, distribution, seed)
    assert not torch.equal(fused.cpu(), x.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_add_residual_noise_kernel_matches_reference(dtype, distribution):
    x, residual = fresh((5, 413), dtype), fresh((5, 413), dtype)
    seed = rng.draw_seed()
    fused, eager = run_both(fusednoise.add_residual_noise, x, residual, sigma=0.02, distribution=distribution,
                            seed=seed)
    assert_close_to_reference(fused, eager, 0.02, distribution, seed)


def test_uniform_kernel_is_bitwise_reference_in_float32():
    # No transcendental functions on the uniform path: the kernel must equal the reference bit for bit.
    x = fresh((4, 1000), torch.float32)
    fused, eager = run_both(fusednoise.add_noise, x, sigma=0.3, distribution="uniform", seed=rng.draw_seed())
    assert torch.equal(fused.cpu(), eager.cpu())


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_equals_out_of_place(backend, dtype):
    x = fresh((6, 250), dtype)
    with fusednoise.backend(backend):
        out = fusednoise.add_noise(x, 0.1, seed=42)
        y = x.clone()
        returned = fusednoise.add_noise_(y, 0.1, seed=42)
    assert returned is y
    assert torch.equal(y, out)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_residual_form_is_noise_on_the_float32_sum(backend):
    x, residual = fresh((3, 300), torch.float32), fresh((3, 300), torch.float32)
    with fusednoise.backend(backend):
        fused = fusednoise.add_residual_noise(x, residual, 0.1, seed=7)
        two_step = fusednoise.add_noise(x + residual, 0.1, seed=7)
    assert torch.equal(fused, two_step)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_non_contiguous_input_uses_logical_order(backend):
    base = fresh((64, 48), torch.float32)
    view = base.t()  # non-contiguous
    with fusednoise.backend(backend):
        expected = fusednoise.add_noise(view.contiguous(), 0.1, seed=11)
        out_of_place = fusednoise.add_noise(view, 0.1, seed=11)
        fusednoise.add_noise_(view, 0.1, seed=11)
    assert torch.equal(out_of_place, expected)
    assert torch.equal(view, expected)  # written back through the view
    assert torch.equal(base.t(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counters_past_2_to_the_32_blocks(dtype):
    # A tensor of over 2**31 elements cannot be interpreted in CI; the kernel's first_index shifts the counter
    # to where such a tensor's tail lives, and it must still match the reference bit for bit (float32: 4
    # elements per block, half precision: 8).
    first_index = 2**35 + 8 * 1000
    x = torch.zeros(4096 + 8, dtype=dtype, device=KERNEL_DEVICE)
    out = torch.empty_like(x)
    seed = rng.draw_seed()
    launch_noise(x, None, out, 1.0, "uniform", seed, False, first_index=first_index)
    expected = reference.noisy_sum(x.cpu(), None, 1.0, "uniform", seed, first_index=first_index)
    assert torch.equal(out.cpu(), expected)
    shifted_less = reference.noisy_sum(x.cpu(), None, 1.0, "uniform", seed, first_index=first_index - 2**34)
    assert not torch.equal(expected, shifted_less)  # the high counter word is really used


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU with 10 GB free (a tensor of over 2**31 elements)")
def test_tensor_over_2_to_the_31_elements_on_gpu():
    numel = 2**31 + 4100
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * numel * 2:
        pytest.skip("needs 13 GB of free GPU memory for a tensor of over 2**31 elements")
    x = torch.zeros(numel, dtype=torch.bfloat16, device="cuda")
    seed = 1234
    fusednoise.add_noise_(x, 1.0, distribution="uniform", seed=seed)
    tail = x[-8196:].cpu()  # from a philox block's first element (16-bit draws: 8 per block)
    expected = reference.noisy_sum(torch.zeros(8196, dtype=torch.bfloat16), None, 1.0, "uniform", seed,
                                   first_index=numel - 8196)
    assert torch.equal(tail, expected)


def test_empty_tensor():
    for backend in ("triton", "reference"):
        with fusednoise.backend(backend):
            x = torch.empty(0, 5, device=KERNEL_DEVICE)
            assert fusednoise.add_noise_(x, 0.1).shape == (0, 5)


# ---------------------------------------------------------------------------------- distributions
@pytest.mark.parametrize("backend, numel", [("reference", 2**20), ("triton", 2**20)])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_distribution_moments_and_ks(backend, numel, distribution):
    sigma = 0.5
    with fusednoise.backend(backend):
        eps = fusednoise.add_noise(torch.zeros(numel, device=KERNEL_DEVICE), sigma, distribution).cpu().double()
    if distribution == "normal":
        expected_std, reference_cdf = sigma, scipy.stats.norm(scale=sigma).cdf
    else:
        expected_std, reference_cdf = sigma / math.sqrt(3), scipy.stats.uniform(loc=-sigma, scale=2 * sigma).cdf
        assert float(eps.abs().max()) <= sigma
    standard_error = expected_std / math.sqrt(numel)
    assert abs(float(eps.mean())) < 5 * standard_error
    assert abs(float(eps.std()) / expected_std - 1) < 5 * math.sqrt(0.5 / numel) * 2
    assert scipy.stats.kstest(eps.numpy(), reference_cdf).pvalue > 1e-4


def _correlation(a, b):
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_streams_are_independent(distribution):
    n = 2**18
    bound = 5 / math.sqrt(n)
    zeros = torch.zeros(n)
    first = fusednoise.add_noise(zeros, 1.0, distribution)   # two layers or two steps: two fresh seeds
    second = fusednoise.add_noise(zeros, 1.0, distribution)
    assert abs(_correlation(first, second)) < bound
    # Neighbours inside one tensor share a philox call: the four words and both Box-Muller outputs.
    words = first.view(-1, 4)
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs(_correlation(words[:, a], words[:, b])) < 5 / math.sqrt(n / 4)
    assert abs(_correlation(first[:-1], first[1:])) < bound


def test_determinism_same_seed_same_bits_new_seed_new_noise():
    x = torch.randn(1000)
    assert torch.equal(fusednoise.add_noise(x, 0.1, seed=3), fusednoise.add_noise(x, 0.1, seed=3))
    assert not torch.equal(fusednoise.add_noise(x, 0.1, seed=3), fusednoise.add_noise(x, 0.1, seed=4))
    torch.manual_seed(0)
    drawn = [fusednoise.add_noise(x, 0.1) for _ in range(2)]
    torch.manual_seed(0)
    again = [fusednoise.add_noise(x, 0.1) for _ in range(2)]
    assert torch.equal(drawn[0], again[0]) and torch.equal(drawn[1], again[1])
    assert not torch.equal(drawn[0], drawn[1])


# ---------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype, value", [
    (torch.bfloat16, 1 + 2**-10),   # one eighth of a step above 1
    (torch.bfloat16, -3.3),         # negative, an irrational fraction of a step
    (torch.bfloat16, 1e-40),        # a float32 subnormal
    (torch.float16, 1 + 2**-10 * 0.3),
    (torch.float16, -1000.7),
    (torch.float16, 3e-7),          # a float16 subnormal: the fixed step 2**-24
])
def test_stochastic_rounding_is_unbiased(backend, dtype, value):
    # Unbiased: the mean of n roundings of one float32 value equals the value within 5 standard errors,
    # step * sqrt(p (1 - p) / n) (the probability of the fp16-subnormal rule is exact to 2**-14 of a step, far
    # below that). Only the two neighbours occur, and round-to-nearest misses the value by more than the bound.
    n = 2**16
    x = torch.full((n,), value, dtype=torch.float32, device=KERNEL_DEVICE)
    target = float(x[0])
    if backend == "triton":
        rounded = torch.empty(n, dtype=dtype, device=KERNEL_DEVICE)
        launch_noise(x, None, rounded, 0.0, "uniform", rng.draw_seed(), True)  # float32 in, rounded on the store
    else:
        rounded = reference.stochastic_round(x.cpu(), dtype, reference.rounding_bits(n, rng.draw_seed()))
    rounded = rounded.cpu().double()
    low, high = _neighbours(target, dtype)
    assert bool(((rounded == low) | (rounded == high)).all())
    p = (target - low) / (high - low)
    standard_error = (high - low) * math.sqrt(p * (1 - p) / n)
    assert abs(rounded.mean().item() - target) < 5 * standard_error
    assert abs(float(x[0].cpu().to(dtype)) - target) > 5 * standard_error


def _neighbours(value: float, dtype):
    """The largest value of dtype <= value and the smallest >= value (value not representable)."""
    bits = torch.tensor(value).to(dtype).view(torch.int16)
    candidates = sorted(float((bits + k).view(dtype)) for k in (-1, 0, 1))
    return max(c for c in candidates if c <= value), min(c for c in candidates if c >= value)


def test_stochastic_rounding_keeps_tiny_hype_noise_in_bf16():
    # SPEC: sigma = 1e-5 on O(1) bf16 activations mostly rounds away with round-to-nearest. Regress the change
    # actually stored on the float32 noise: stochastic rounding keeps it in expectation (slope 1),
    # round-to-nearest loses most of it.
    n = 2**18
    x = torch.randn(n).to(torch.bfloat16)
    # The float32 noise the bf16 call draws (16-bit draws: a float32 input would draw other noise).
    eps = reference.standard_noise(n, "normal", 1, bits=16).double() * 1e-5
    nearest = fusednoise.add_noise(x, 1e-5, seed=1)
    stochastic = fusednoise.add_noise(x, 1e-5, seed=1, rounding="stochastic")

    def slope(out):
        change = out.double() - x.double()
        return float((change * eps).sum() / (eps * eps).sum())

    assert (nearest != x).float().mean().item() < 0.01
    assert abs(slope(stochastic) - 1) < 0.25
    assert slope(nearest) < 0.5


def test_stochastic_round_edge_values():
    values = torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), -float("inf"), float("nan"), 65504.0, 7e4])
    for dtype in (torch.float16, torch.bfloat16):
        out = reference.stochastic_round(values, dtype, torch.full_like(values, 2**15, dtype=torch.int64)).float()
        assert out[4] == float("inf") and out[5] == -float("inf") and math.isnan(out[6])
        assert out[0] == 0 and out[1] == 0
        neighbours = torch.tensor([1e-30]).to(dtype).float()  # nearest bf16; 0 in float16
        smallest_step = float(torch.finfo(dtype).smallest_normal) * float(torch.finfo(dtype).eps)
        assert abs(float(out[2]) - float(neighbours)) <= max(smallest_step, 1e-30 * float(torch.finfo(dtype).eps))
        assert float(out[3]) == -float(out[2])


# ---------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gradients_pass_unchanged(backend):
    with fusednoise.backend(backend):
        x = torch.randn(4, 33, device=KERNEL_DEVICE, requires_grad=True)
        residual = torch.randn(4, 33, device=KERNEL_DEVICE, requires_grad=True)
        upstream = torch.randn(4, 33, device=KERNEL_DEVICE)
        fusednoise.add_noise(x, 0.5).backward(upstream)
        assert torch.equal(x.grad, upstream)
        x.grad = None
        fusednoise.add_residual_noise(x, residual, 0.5).backward(upstream)
        assert torch.equal(x.grad, upstream) and torch.equal(residual.grad, upstream)
        x.grad = None
        hidden = x * 1.0
        fusednoise.add_noise_(hidden, 0.5).backward(upstream)
        assert torch.equal(x.grad, upstream)


def test_inplace_on_leaf_is_autograds_error_and_leaves_input_untouched():
    leaf = torch.randn(10, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fusednoise.add_noise_(leaf, 0.1)
    with pytest.raises(RuntimeError, match="view of a leaf Variable"):
        fusednoise.add_noise_(leaf[:5], 0.1)
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():
        fusednoise.add_noise_(leaf, 0.1)  # allowed without grad, as for any in-place op
    assert not torch.equal(leaf.detach(), before)


def test_inplace_on_tensor_saved_for_backward_raises_autograds_error():
    x = torch.randn(10, requires_grad=True)
    activated = x.sigmoid()  # sigmoid saves its output for backward
    fusednoise.add_noise_(activated, 0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        activated.sum().backward()


def test_activation_checkpointing_replays_the_same_noise():
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)

    def block(inputs):
        hidden = layer(inputs)
        return fusednoise.add_noise_(hidden, 0.5) ** 2  # the gradient depends on the noise

    assert_checkpoint_replays_the_noise(block, x, layer)


def test_torch_compile_fullgraph_traces_the_ops():
    def step(x, residual):
        hidden = fusednoise.add_noise_(x * 2.0, 0.1, seed=5)
        hidden = fusednoise.add_residual_noise(hidden, residual, 0.1, seed=6)
        return fusednoise.add_noise(hidden, 0.1, distribution="uniform", seed=7).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8, requires_grad=True)
    residual = torch.randn(4, 8)
    eager_loss = step(x, residual)
    eager_loss.backward()
    eager_grad, x.grad = x.grad.clone(), None
    compiled_loss = compiled(x, residual)
    compiled_loss.backward()
    assert torch.equal(compiled_loss, eager_loss)
    assert torch.equal(x.grad, eager_grad)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_add_residual_noise_gradients_of_x_and_residual(compiled):
    """d(x + residual + eps)/dx = d/dresidual = 1: both get the upstream gradient, eagerly (an autograd Function)
    and traced (the op's registered backward, which torch.compile uses)."""
    def loss(x, residual, weight):
        return (fusednoise.add_residual_noise(x * 1.0, residual * 1.0, 0.1, seed=3) * weight).sum()

    fn = torch.compile(loss, fullgraph=True, backend="aot_eager") if compiled else loss
    x = torch.randn(4, 8, requires_grad=True)
    residual = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(4, 8)
    fn(x, residual, weight).backward()
    assert torch.equal(x.grad, weight) and torch.equal(residual.grad, weight)
    x.grad = residual.grad = None
    fn(x.detach(), residual, weight).backward()  # the residual alone needs a gradient
    assert torch.equal(residual.grad, weight)


def test_torch_compile_draws_a_fresh_seed_each_call():
    compiled = torch.compile(lambda x: fusednoise.add_noise(x, 1.0), fullgraph=True, backend="aot_eager")
    x = torch.zeros(64)
    assert not torch.equal(compiled(x), compiled(x))


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sigma=-1.0), ValueError, "sigma"),
    (dict(sigma=float("nan")), ValueError, "sigma"),
    (dict(sigma=float("inf")), ValueError, "sigma"),
    (dict(sigma="big"), TypeError, "sigma"),
    (dict(sigma=0.1, distribution="gumbel"), ValueError, "distribution"),
    (dict(sigma=0.1, rounding="up"), ValueError, "rounding"),
    (dict(sigma=0.1, seed=-3), ValueError, "seed"),
])
def test_bad_arguments_raise_and_leave_input_untouched(kwargs, error, match):
    x = torch.randn(16)
    before = x.clone()
    with pytest.raises(error, match=match):
        fusednoise.add_noise_(x, **kwargs)
    with pytest.raises(error, match=match):
        fusednoise.add_noise(x, **kwargs)
    assert torch.equal(x, before)


@pytest.mark.parametrize("bad", [torch.arange(10), torch.randn(10, dtype=torch.float64),
                                 torch.zeros(10, dtype=torch.bool)])
def test_bad_dtypes_rejected(bad):
    before = bad.clone()
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        fusednoise.add_noise_(bad, 0.1)
    assert torch.equal(bad, before)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fusednoise.add_noise([1.0, 2.0], 0.1)


@pytest.mark.parametrize("residual, match", [
    (torch.randn(4, 6), "shape"),
    (torch.randn(4, 5, dtype=torch.float16), "dtype"),
    (torch.randn(4, 5, device="meta"), "device"),
    (torch.arange(20).view(4, 5), "float32"),
])
def test_bad_residual(residual, match):
    x = torch.randn(4, 5)
    before = x.clone()
    with pytest.raises((ValueError, TypeError), match=match):
        fusednoise.add_residual_noise(x, residual, 0.1)
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------------- registration and host path
def test_registered_schemas():
    # The ops torch.compile / export see; a later device-side seed offset becomes a trailing optional argument.
    schemas = {name: str(getattr(torch.ops.fusednoise, name).default._schema)
               for name in ("add_noise", "add_noise_", "add_residual_noise")}
    assert schemas["add_noise"] == ("fusednoise::add_noise(Tensor x, float sigma, str distribution, int? seed, "
                                    "bool stochastic) -> Tensor")
    assert schemas["add_noise_"] == ("fusednoise::add_noise_(Tensor(a!) x, float sigma, str distribution, "
                                     "int? seed, bool stochastic) -> ()")
    assert schemas["add_residual_noise"].startswith("fusednoise::add_residual_noise(Tensor x, Tensor residual,")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_direct_call_equals_the_registered_op(backend):
    # Plain eager calls skip the dispatcher: they must compute exactly what the op computes.
    x, residual = fresh((3, 257), torch.float32), fresh((3, 257), torch.float32)
    with fusednoise.backend(backend):
        assert torch.equal(fusednoise.add_noise(x, 0.1, seed=5), torch.ops.fusednoise.add_noise(x, 0.1, "normal", 5,
                                                                                                 False))
        assert torch.equal(fusednoise.add_residual_noise(x, residual, 0.1, "uniform", seed=6),
                           torch.ops.fusednoise.add_residual_noise(x, residual, 0.1, "uniform", 6, False))
        y, z = x.clone(), x.clone()
        fusednoise.add_noise_(y, 0.1, seed=7)
        torch.ops.fusednoise.add_noise_(z, 0.1, "normal", 7, False)
        assert torch.equal(y, z)


def test_dispatch_modes_and_fake_tensors_see_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 8)
    with Recorder() as recorder:
        fusednoise.add_noise(x, 0.1, seed=1)
        fusednoise.add_noise_(x.clone(), 0.1, seed=1)
    assert "fusednoise.add_noise.default" in recorder.ops and "fusednoise.add_noise_.default" in recorder.ops
    with FakeTensorMode():
        fake = torch.empty(5, 6, dtype=torch.bfloat16)
        out = fusednoise.add_residual_noise(fake, fake, 0.1)
        assert out.shape == (5, 6) and out.dtype == torch.bfloat16


def test_cached_checks_still_refuse_what_they_refused():
    x = torch.randn(8)
    fusednoise.add_noise(x, 1, seed=1)  # an int sigma, now cached
    with pytest.raises(TypeError, match="sigma"):
        fusednoise.add_noise(x, True)  # True == 1 and hashes alike: the cache must keep them apart
    with pytest.raises(ValueError, match="sigma"):
        fusednoise.add_noise(x, float("nan"))
    with pytest.raises(ValueError, match="distribution"):  # unhashable: the cache steps aside
        fusednoise.add_noise(x, 0.1, distribution=["normal"])
    fusednoise.add_residual_noise(x, torch.randn(8), 0.1)
    for bad, match in ((torch.randn(9), "shape"), (torch.randn(8, dtype=torch.float16), "dtype"),
                       (torch.randn(8, device="meta"), "device")):
        with pytest.raises(ValueError, match=match):
            fusednoise.add_residual_noise(x, bad, 0.1)


def test_residual_only_requiring_grad_gets_its_gradient():
    x = torch.randn(3, 5)
    residual = torch.randn(3, 5, requires_grad=True)
    upstream = torch.randn(3, 5)
    fusednoise.add_residual_noise(x, residual, 0.3).backward(upstream)
    assert torch.equal(residual.grad, upstream)


def test_host_path_makes_no_graph_nodes_without_grad():
    x = torch.randn(4, 4, requires_grad=True)
    with torch.no_grad():
        assert fusednoise.add_noise(x, 0.1).grad_fn is None
    assert fusednoise.add_noise(x.detach(), 0.1).grad_fn is None
    assert fusednoise.add_noise(x, 0.1).grad_fn is not None


def _float32_from_bits(*patterns: int) -> torch.Tensor:
    return torch.tensor([p - 2**32 if p >= 2**31 else p for p in patterns], dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_round_kernel_matches_reference_on_edge_values(dtype):
    # Bitwise, kernel vs reference.stochastic_round, on the values where the rounding has a special path: float16's
    # fixed step below 2**-14 and the boundary, float32 subnormals, values beyond float16's range (saturated),
    # inf and quiet NaNs (the GPU's canonical 0x7FFFFFFF, whose dither would carry into the sign bit), each
    # repeated under many draws.
    # Also finite values within 2**13 steps of the float32 maximum, which the reference dithers to a NaN pattern.
    # sigma = 0: the kernel adds a zero noise (so no -0.0 here: -0.0 + 0.0 is +0.0).
    edges = torch.cat([
        torch.tensor([0.0, 3e-7, -3e-7, 2.0**-14, -(2.0**-14), 2.0**-24, 1e-30, -1e-30, 1e-40, 1.0, -3.3, 65504.0,
                      65519.0, 65520.0, 7e4, -7e4, 3.0e38, float("inf"), -float("inf"), float("nan")]),
        _float32_from_bits(0x387FFFFF, 0xB87FFFFF, 0x7F7FFFFF, 0xFF7FFFF0, 0x7FFFFFFF, 0xFFC0FFFF)])
    x = edges.repeat(64).to(KERNEL_DEVICE)
    n = x.numel()
    seed = rng.draw_seed()
    out = torch.empty(n, dtype=dtype, device=KERNEL_DEVICE)
    launch_noise(x, None, out, 0.0, "uniform", seed, True)
    expected = reference.stochastic_round(x.cpu(), dtype, reference.rounding_bits(n, seed))
    out = out.cpu()
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))
