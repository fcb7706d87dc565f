"""The NEFTune op: the Triton kernel against the eager reference, the per-example scale, the padding rule, the
distribution, autograd, torch.compile and bad input."""
import math

import pytest
import scipy.stats
import torch

import fusednoise
from checkpointing import assert_checkpoint_replays_the_noise
from devices import KERNEL_DEVICE
from fusednoise import rng
from fusednoise.reference import neftune as reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def padded_mask(batch, tokens, lengths, dtype=torch.int64, device=KERNEL_DEVICE):
    """Right padding: example b keeps its first lengths[b] tokens."""
    positions = torch.arange(tokens, device=device)[None, :]
    return (positions < torch.tensor(lengths, device=device)[:, None]).to(dtype)


def run_both(x, alpha, mask, seed):
    with fusednoise.backend("triton"):
        fused = fusednoise.add_neftune_noise(x, alpha, mask, seed=seed)
    with fusednoise.backend("reference"):
        eager = fusednoise.add_neftune_noise(x, alpha, mask, seed=seed)
    return fused.cpu(), eager.cpu()


# ---------------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "int64", "bool", "float"])
@pytest.mark.parametrize("D", [64, 30, 1500])  # a multiple of 4; not one; two column blocks of the kernel
def test_kernel_matches_reference(dtype, mask_kind, D):
    B, T = 3, 11
    mask = None
    if mask_kind != "none":
        dtypes = {"int64": torch.int64, "bool": torch.bool, "float": torch.float32}
        mask = padded_mask(B, T, [T, 6, 0], dtypes[mask_kind])  # full, padded, all padding
        mask[0, 0] = 0  # a hole: the mask is read per token, not assumed to be a prefix
    x = torch.randn(B, T, D, device=KERNEL_DEVICE).to(dtype)
    seed = rng.draw_seed()
    # x = 0: the output is the noise itself, so the philox words and the per-example scale must agree bit for bit.
    zero_fused, zero_eager = run_both(torch.zeros_like(x), 7.5, mask, seed)
    assert torch.equal(zero_fused, zero_eager)
    assert bool((zero_fused != 0).any())
    fused, eager = run_both(x, 7.5, mask, seed)
    if dtype == torch.float32:  # a GPU may contract x + u * s into one FMA: within one rounding of the add
        torch.testing.assert_close(fused, eager, rtol=2e-7, atol=1e-7)
    else:
        steps = (fused.view(torch.int16).int() - eager.view(torch.int16).int()).abs()
        assert int(steps.max()) <= 1 and (steps > 0).float().mean() < 1e-3


def test_kernel_matches_reference_on_a_strided_batch_of_sequences():
    base = torch.randn(11, 4, 3, 64, device=KERNEL_DEVICE)
    x = base.permute(1, 2, 0, 3)  # (4, 3, 11, 64) non-contiguous, two batch dimensions
    mask = padded_mask(12, 11, [11, 5, 1, 0] * 3).view(4, 3, 11)
    fused, eager = run_both(x, 5.0, mask, 99)
    torch.testing.assert_close(fused, eager, rtol=2e-7, atol=1e-7)
    assert torch.equal(fused[3, 2], x[3, 2].cpu())  # the all-padding example


# ---------------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_per_example_scale_and_untouched_padding(backend):
    B, T, D, alpha = 4, 40, 128, 10.0
    lengths = [40, 25, 3, 0]
    mask = padded_mask(B, T, lengths)
    x = torch.randn(B, T, D, device=KERNEL_DEVICE)
    x[1, 30] = -0.0  # padded -0.0 must stay -0.0 (x + 0 would give +0.0)
    with fusednoise.backend(backend):
        out = fusednoise.add_neftune_noise(x, alpha, mask, seed=5)
    noise = (out - x).cpu().double()
    for b, length in enumerate(lengths):
        assert torch.equal(out[b, length:].cpu(), x[b, length:].cpu())  # padding: bit for bit
        if length:
            bound = alpha / math.sqrt(length * D)
            kept = noise[b, :length]
            assert float(kept.abs().max()) <= bound * (1 + 1e-6)
            assert float(kept.abs().max()) > 0.99 * bound  # ... and it is the bound, not a smaller one
    assert torch.equal(torch.signbit(out[1, 30]).cpu(), torch.ones(D, dtype=torch.bool))


def test_without_a_mask_every_token_counts_and_all_ones_is_no_mask():
    x = torch.randn(2, 9, 32)
    ones = torch.ones(2, 9, dtype=torch.int64)
    assert torch.equal(fusednoise.add_neftune_noise(x, 5.0, None, seed=3),
                       fusednoise.add_neftune_noise(x, 5.0, ones, seed=3))
    noise = fusednoise.add_neftune_noise(torch.zeros(2, 9, 32), 5.0, seed=3)
    assert float(noise.abs().max()) <= 5.0 / math.sqrt(9 * 32)


def test_noise_is_hype_uniform_noise_scaled_per_example():
    # The documented counter rule: for D a multiple of 4, add_noise's U(-1, 1) noise scaled by alpha / sqrt(L d).
    mask = padded_mask(2, 16, [16, 4], device="cpu")
    noise = fusednoise.add_neftune_noise(torch.zeros(2, 16, 64), 3.0, mask, seed=21)
    unit = fusednoise.add_noise(torch.zeros(2, 16, 64), 1.0, "uniform", seed=21)
    torch.testing.assert_close(noise[0], unit[0] * (3.0 / math.sqrt(16 * 64)), rtol=1e-6, atol=0)
    torch.testing.assert_close(noise[1, :4], unit[1, :4] * (3.0 / math.sqrt(4 * 64)), rtol=1e-6, atol=0)


def test_scale_is_ieee_rounded_float32():
    lengths = torch.tensor([1, 7, 511, 2**20 + 3, 0])
    scale = reference.row_scales(lengths, 5.0, 4096)
    exact = [5.0 / math.sqrt(n * 4096) if n else 0.0 for n in lengths.tolist()]
    # within one float32 rounding of the exact value (two IEEE steps: sqrt, then the division)
    for got, want in zip(scale.tolist(), exact):
        assert abs(got - want) <= 2 * 2**-24 * want


# ---------------------------------------------------------------------------------- distribution
@pytest.mark.parametrize("backend, shape", [("reference", (16, 256, 256)), ("triton", (4, 128, 256))])
def test_distribution_is_uniform_with_the_papers_scale(backend, shape):
    B, T, D = shape
    alpha = 5.0
    with fusednoise.backend(backend):
        noise = fusednoise.add_neftune_noise(torch.zeros(shape, device=KERNEL_DEVICE), alpha).cpu().double()
    bound = alpha / math.sqrt(T * D)
    flat = noise.reshape(-1).numpy()
    assert scipy.stats.kstest(flat, scipy.stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue > 1e-4
    n = flat.size
    assert abs(flat.mean()) < 5 * bound / math.sqrt(3 * n)
    assert abs(flat.std() / (bound / math.sqrt(3)) - 1) < 5 * math.sqrt(0.8 / n)


def test_determinism_and_fresh_seeds():
    x = torch.randn(2, 5, 16)
    torch.manual_seed(0)
    first = [fusednoise.add_neftune_noise(x, 5.0) for _ in range(2)]
    torch.manual_seed(0)
    again = [fusednoise.add_neftune_noise(x, 5.0) for _ in range(2)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(fusednoise.add_neftune_noise(x, 5.0, seed=1), fusednoise.add_neftune_noise(x, 5.0, seed=2))


def test_empty_inputs():
    for backend in ("triton", "reference"):
        with fusednoise.backend(backend):
            for shape in ((0, 7, 16), (3, 0, 16), (3, 7, 0)):
                x = torch.empty(shape, device=KERNEL_DEVICE)
                mask = torch.ones(shape[:-1], dtype=torch.int64, device=KERNEL_DEVICE)
                assert fusednoise.add_neftune_noise(x, 5.0, mask).shape == shape


# ---------------------------------------------------------------------------------- autograd and compile
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gradients_pass_unchanged(backend):
    x = torch.randn(2, 6, 32, device=KERNEL_DEVICE, requires_grad=True)
    mask = padded_mask(2, 6, [6, 2])
    upstream = torch.randn(2, 6, 32, device=KERNEL_DEVICE)
    with fusednoise.backend(backend):
        fusednoise.add_neftune_noise(x, 5.0, mask).backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_activation_checkpointing_replays_the_same_noise():
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(2, 8, 16, requires_grad=True)
    mask = padded_mask(2, 8, [8, 5], device="cpu")

    def block(inputs):
        return fusednoise.add_neftune_noise(layer(inputs), 50.0, mask) ** 2  # the gradient depends on the noise

    assert_checkpoint_replays_the_noise(block, x, layer)


def test_torch_compile_fullgraph_traces_the_op():
    mask = padded_mask(3, 7, [7, 4, 1], device="cpu")

    def step(x):
        return fusednoise.add_neftune_noise(x * 2.0, 5.0, mask, seed=11).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 7, 16, requires_grad=True)
    eager_loss = step(x)
    eager_loss.backward()
    eager_grad, x.grad = x.grad.clone(), None
    compiled_loss = compiled(x)
    compiled_loss.backward()
    assert torch.equal(compiled_loss, eager_loss) and torch.equal(x.grad, eager_grad)
    fresh = torch.compile(lambda t: fusednoise.add_neftune_noise(t, 5.0, mask), fullgraph=True, backend="aot_eager")
    zeros = torch.zeros(3, 7, 16)
    assert not torch.equal(fresh(zeros), fresh(zeros))  # the seed is drawn at run time, not baked into the graph


# ---------------------------------------------------------------------------------- packed rows
def packed_positions(lengths_per_row, tokens, device=KERNEL_DEVICE):
    """position_ids of rows packed with sequences of the given lengths (0, 1, ... per sequence), zero-filled."""
    rows = []
    for lengths in lengths_per_row:
        row = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.int64)
        rows.append(torch.cat([row, torch.zeros(tokens - len(row), dtype=torch.int64)]))
    return torch.stack(rows).to(device)


def papers_scales(lengths, alpha, D):
    """alpha / sqrt(L * D) in IEEE float32, written out: the scale each packed sequence must get."""
    import numpy as np

    return [float(np.float32(alpha) / np.sqrt(np.float32(n * D))) for n in lengths]


PACKED = [[3, 5, 4], [12], [1, 6, 2]]  # three sequences in a row; one; three ending in 3 zero-filled positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_packed_rows_kernel_matches_reference(dtype, masked):
    T, D = 12, 40
    positions = packed_positions(PACKED, T)
    mask = None
    if masked:  # a packed row with padding (TRL's packing without padding_free) and a hole inside a sequence
        mask = (positions != 0).long()
        mask[:, 0] = 1
        mask[0, 3] = 1
        mask[0, 4] = 0
    x = torch.randn(3, T, D, device=KERNEL_DEVICE).to(dtype)
    seed = rng.draw_seed()
    outs = {}
    for backend in ("triton", "reference"):
        with fusednoise.backend(backend):
            outs[backend] = (fusednoise.add_neftune_noise(torch.zeros_like(x), 7.5, mask, seed=seed,
                                                          position_ids=positions).cpu(),
                             fusednoise.add_neftune_noise(x, 7.5, mask, seed=seed, position_ids=positions).cpu())
    assert torch.equal(outs["triton"][0], outs["reference"][0])  # the noise alone: bitwise
    if dtype == torch.float32:
        torch.testing.assert_close(outs["triton"][1], outs["reference"][1], rtol=2e-7, atol=1e-7)
    else:
        steps = (outs["triton"][1].view(torch.int16).int() - outs["reference"][1].view(torch.int16).int()).abs()
        assert int(steps.max()) <= 1


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_each_packed_sequence_is_scaled_by_its_own_length(backend):
    T, D, alpha = 12, 40, 6.0
    positions = packed_positions(PACKED, T)
    seed = rng.draw_seed()
    with fusednoise.backend(backend):
        noise = fusednoise.add_neftune_noise(torch.zeros(3, T, D, device=KERNEL_DEVICE), alpha, seed=seed,
                                             position_ids=positions).cpu()
    unit = reference.uniform_rows(3 * T, D, seed).view(3, T, D)  # the U(-1, 1) draws of the counter rule
    for row, lengths in enumerate(PACKED):
        # a row's zero-filled tail: each position 0 starts a sequence of one token (as the varlen kernels see it)
        lengths = lengths + [1] * (T - sum(lengths))
        start = 0
        for length, scale in zip(lengths, papers_scales(lengths, alpha, D)):
            torch.testing.assert_close(noise[row, start:start + length], unit[row, start:start + length] * scale,
                                       rtol=1e-6, atol=0)
            start += length


def test_cu_seq_lens_and_position_ids_agree_and_one_sequence_per_row_is_the_unpacked_noise():
    T, D = 12, 16
    x = torch.zeros(1, 3 * T, D)
    lengths = [5, 20, 11]
    positions = packed_positions([lengths], 3 * T, device="cpu")
    cu_seq_lens = torch.tensor([0, 5, 25, 36], dtype=torch.int32)
    by_positions = fusednoise.add_neftune_noise(x, 5.0, seed=4, position_ids=positions)
    assert torch.equal(by_positions, fusednoise.add_neftune_noise(x, 5.0, seed=4, cu_seq_lens=cu_seq_lens))
    plain = torch.zeros(2, T, D)
    arange = torch.arange(T).expand(2, T)
    assert torch.equal(fusednoise.add_neftune_noise(plain, 5.0, seed=4, position_ids=arange),
                       fusednoise.add_neftune_noise(plain, 5.0, seed=4))  # positions 0..T-1: one sequence a row


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha="5"), TypeError, "alpha"),
    (dict(alpha=5.0, seed=-1), ValueError, "seed"),
    (dict(alpha=5.0, attention_mask=torch.ones(2, 4)), ValueError, "attention_mask must have shape"),
    (dict(alpha=5.0, attention_mask=[[1, 1, 1]] * 2), TypeError, "attention_mask must be a torch.Tensor"),
    (dict(alpha=5.0, attention_mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "attention_mask"),
    (dict(alpha=5.0, attention_mask=torch.ones(2, 3, device="meta")), ValueError, "attention_mask is on"),
    (dict(alpha=5.0, position_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "position_ids must have shape"),
    (dict(alpha=5.0, position_ids=torch.zeros(2, 3)), TypeError, "position_ids must be a dense integer"),
    (dict(alpha=5.0, position_ids=[[0, 1, 2]] * 2), TypeError, "position_ids must be a torch.Tensor"),
    (dict(alpha=5.0, cu_seq_lens=torch.zeros(2, 3, dtype=torch.int32)), ValueError, "cu_seq_lens must be 1-D"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    x = torch.randn(2, 3, 8)
    before = x.clone()
    with pytest.raises(error, match=match):
        fusednoise.add_neftune_noise(x, **kwargs)
    assert torch.equal(x, before)


@pytest.mark.parametrize("x, error, match", [
    (torch.arange(24).view(2, 3, 4), TypeError, "x must be float32"),
    (torch.randn(8), ValueError, "at least 2 dimensions"),
    ("embeddings", TypeError, "x must be a torch.Tensor"),
])
def test_bad_x(x, error, match):
    with pytest.raises(error, match=match):
        fusednoise.add_neftune_noise(x, 5.0)
