"""The offset path of the noise ops (CUDA graphs: ``fusednoise/rng.py``, "Device-side offsets") without capturing,
through ``rng.graph_safe()``: the rule mapping (seed, offset) to philox counters, the reference's draws, the
kernels (under TRITON_INTERPRET on a CPU) against the reference, the ticket counter, and the host path left as it
was. Captured graphs and their replays are checked on a GPU in test_cuda_graphs.py."""
import types

import pytest
import torch

import fusednoise
from devices import KERNEL_DEVICE
from fusednoise import graph_offsets, ops_lnsr, rng
from fusednoise.kernels import offsets as offset_kernels
from fusednoise.reference import lnsr as ref_lnsr
from fusednoise.reference import neftune as ref_neftune
from fusednoise.reference import noise as ref_noise
from test_ops import assert_close_to_reference

SEED = 0x2345_6789_ABCD_EF01 >> 2  # 62 bits
OFFSETS = [0, 5, 2**32 + 3, 2**63 - 1]  # the host path's words, small, past 32 bits, the largest


def _philox_rows(seed, n_blocks, c2, c3):
    """Uniforms (n_blocks, 4) of blocks 0.. with counter words (c2, c3), through the plain-torch philox (not the
    C library the references use), as an independent statement of the rule."""
    blocks = torch.arange(n_blocks, dtype=torch.int64)
    words = rng._philox4x32_torch(seed, blocks & rng.MASK32, blocks >> 32, torch.full_like(blocks, c2),
                                  torch.full_like(blocks, c3), rng.PHILOX_ROUNDS)
    return torch.stack([rng.uint_to_uniform(w) for w in words], dim=1)


# ---------------------------------------------------------------------------------- the rule
def test_offset_counter_words_rule():
    assert rng.offset_counter_words(None, rng.PURPOSE_NOISE) == (0, 0)
    assert rng.offset_counter_words(None, rng.PURPOSE_ROUNDING) == (0, 1)
    assert rng.offset_counter_words(0, rng.PURPOSE_ROUNDING) == (0, 1)  # offset 0: the host path's words
    assert rng.offset_counter_words(7, rng.PURPOSE_NOISE) == (7, 0)
    assert rng.offset_counter_words(2**32 + 7, rng.PURPOSE_ROUNDING) == (7, 3)
    assert rng.offset_counter_words(2**63 - 1, rng.PURPOSE_ROUNDING) == (2**32 - 1, 2**32 - 1)
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match="offset"):
            rng.offset_counter_words(bad)


@pytest.mark.parametrize("offset", OFFSETS)
def test_reference_offset_path_draws_the_rules_words(offset):
    n = 37  # not a multiple of 4 or 8
    c2, c3 = offset % 2**32, 2 * (offset >> 32)
    rows = _philox_rows(SEED, 10, c2, c3)
    uniform = ref_noise.standard_noise(n, "uniform", SEED, offset=offset)
    assert torch.equal(uniform, (2.0 * rows - 1.0).view(-1)[:n])
    cos, sin = rng.box_muller(rows[:, 0::2], rows[:, 1::2])
    normal = ref_noise.standard_noise(n, "normal", SEED, offset=offset)
    assert torch.equal(normal, torch.stack([cos, sin], dim=2).view(-1)[:n])
    # Stochastic rounding: purpose 1 in the same c3, 16-bit halves of the four words, low half first.
    blocks = torch.arange(5, dtype=torch.int64)
    words = rng._philox4x32_torch(SEED, blocks, blocks * 0, torch.full_like(blocks, c2),
                                  torch.full_like(blocks, c3 + 1), rng.PHILOX_ROUNDS)
    halves = torch.stack([h for w in words for h in (w & 0xFFFF, w >> 16)], dim=1).view(-1)[:n]
    assert torch.equal(ref_noise.rounding_bits(n, SEED, offset=offset), halves)


def test_offset_zero_is_the_host_path_and_offsets_draw_apart():
    host = ref_noise.standard_noise(64, "uniform", SEED)
    assert torch.equal(ref_noise.standard_noise(64, "uniform", SEED, offset=0), host)
    draws = [ref_noise.standard_noise(64, "uniform", SEED, offset=o) for o in (1, 2, 2**32)]
    for i, a in enumerate([host] + draws):
        for b in draws[i:]:
            assert a is b or not torch.equal(a, b)
    # offset 2**32 moves c3 to 2: never the rounding bits (c3 = 1) of offset 0
    assert not torch.equal(ref_noise.rounding_bits(64, SEED, offset=2**32), ref_noise.rounding_bits(64, SEED))


# ---------------------------------------------------------------------------------- the counter
def test_ticket_kernel_equals_reference_and_advances_the_counter():
    state = torch.tensor([2**40 + 3], dtype=torch.int64, device=KERNEL_DEVICE)
    expected_state = state.clone()
    expected = rng.take_offset_reference(expected_state)
    ticket = offset_kernels.take_offset(state)
    assert ticket.dtype == torch.int64 and ticket.shape == (1,) and ticket.device == state.device
    assert torch.equal(ticket, expected) and torch.equal(state, expected_state)
    assert int(ticket) == 2**40 + 3 and int(state) == 2**40 + 4


def test_set_get_save_restore_and_bad_offsets():
    rng.set_offset(41, "cpu")
    assert rng.get_offset("cpu") == 41
    saved = rng.save_offsets("cpu")
    rng.set_offset(2**62, "cpu")
    rng.restore_offsets(saved)
    assert rng.get_offset("cpu") == 41
    with pytest.raises(TypeError, match="offset"):
        rng.set_offset(1.5, "cpu")
    with pytest.raises(TypeError, match="offset"):
        rng.set_offset(True, "cpu")
    with pytest.raises(ValueError, match="offset"):
        rng.set_offset(-1, "cpu")
    assert rng.get_offset("cpu") == 41  # nothing written by a refused call


def test_graph_safe_is_scoped():
    assert not rng.offsets_forced()
    with rng.graph_safe():
        assert rng.offsets_forced()
        with rng.graph_safe():
            assert rng.offsets_forced()
        assert rng.offsets_forced()
    assert not rng.offsets_forced()
    with pytest.raises(KeyError):
        with rng.graph_safe():
            raise KeyError("left by an exception")
    assert not rng.offsets_forced()


# ---------------------------------------------------------------------------------- the ops
def _hype(x, seed):
    return fusednoise.add_noise(x, 0.05, "normal", seed=seed)


def _hype_reference(x, seed, offset):
    return ref_noise.noisy_sum(x, None, 0.05, "normal", seed, offset=offset)


def _neftune_mask(device):
    return torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=device)  # a padded example, a full one


def _neftune(x, seed):
    return fusednoise.add_neftune_noise(x, 5.0, _neftune_mask(x.device), seed=seed)


def _neftune_reference(x, seed, offset):
    return ref_neftune.neftune_noise(x, 5.0, _neftune_mask(x.device), seed, offset)


def _scaled(x, seed):
    return ops_lnsr.scaled_noise(x, 0.05, seed=seed)


def _scaled_reference(x, seed, offset):
    return ref_lnsr.scaled_noise(x, 0.05, seed, offset)


def _manifold_inputs(device):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(30, 12, generator=g).to(device)
    ids = torch.randint(0, 30, (2, 5), generator=g).to(device)
    return weight, ids, ops_lnsr.nearest_neighbors(weight, k=4)


def _manifold(x, seed):
    weight, ids, neighbors = _manifold_inputs(x.device)
    return ops_lnsr.in_manifold_noise(x, ids, weight, mix_ratio=0.2, seed=seed, neighbors=neighbors)


def _manifold_reference(x, seed, offset):
    weight, ids, neighbors = _manifold_inputs(x.device)
    return ref_lnsr.in_manifold_noise(x, ids, weight, neighbors, 0.2, seed, offset)


OPS = {"add_noise": (_hype, _hype_reference), "add_neftune_noise": (_neftune, _neftune_reference),
       "scaled_noise": (_scaled, _scaled_reference), "in_manifold_noise": (_manifold, _manifold_reference)}


def _x(device):
    return torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(8)).to(device)


@pytest.mark.parametrize("name", list(OPS))
def test_reference_backend_offset_path_takes_one_ticket_per_call(name):
    op, reference = OPS[name]
    x = _x("cpu")
    with fusednoise.backend("reference"):
        rng.set_offset(2**32 + 9, "cpu")
        with rng.graph_safe():
            first, second = op(x, 77), op(x, 77)
        assert rng.get_offset("cpu") == 2**32 + 11
        host = op(x, 77)
    assert rng.get_offset("cpu") == 2**32 + 11  # the host path takes no ticket
    assert torch.equal(first, reference(x, 77, 2**32 + 9))
    assert torch.equal(second, reference(x, 77, 2**32 + 10))
    assert torch.equal(host, reference(x, 77, None))
    assert not torch.equal(first, second) and not torch.equal(first, host)


@pytest.mark.parametrize("name", list(OPS))
def test_kernel_offset_path_equals_reference_offset_path(name):
    op, _ = OPS[name]
    x = _x(KERNEL_DEVICE)
    outs = {}
    for backend in ("triton", "reference"):
        device = x.device if backend == "triton" else "cpu"
        with fusednoise.backend(backend):
            rng.set_offset(2**33 + 1, device)
            with rng.graph_safe():
                outs[backend] = [op(x.to(device), 123).cpu() for _ in range(2)]
            assert rng.get_offset(device) == 2**33 + 3
    for fused, eager in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5 if KERNEL_DEVICE == "cpu" else 1e-4)
    assert not torch.equal(outs["triton"][0], outs["triton"][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("distribution", ["normal", "uniform"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_hype_kernel_offset_path_matches_reference_in_every_form(dtype, distribution, rounding):
    """add_noise, add_noise_ and add_residual_noise on the offset path: the kernels against the reference at the
    same offsets (stochastic rounding's bits included)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 333, generator=g).to(device=KERNEL_DEVICE, dtype=dtype)
    residual = torch.randn(3, 333, generator=g).to(device=KERNEL_DEVICE, dtype=dtype)
    kwargs = dict(sigma=0.05, distribution=distribution, seed=SEED, rounding=rounding)
    results = {}
    for backend in ("triton", "reference"):
        with fusednoise.backend(backend):
            rng.set_offset(2**32 + 17, x.device)
            with rng.graph_safe():
                inplace = x.clone()
                fusednoise.add_noise_(inplace, **kwargs)
                results[backend] = (inplace, fusednoise.add_noise(x, **kwargs),
                                    fusednoise.add_residual_noise(x, residual, **kwargs))
    offsets = (2**32 + 17, 2**32 + 18, 2**32 + 19)
    for fused, eager, offset in zip(results["triton"], results["reference"], offsets):
        assert_close_to_reference(fused, eager, 0.05, distribution, SEED, offset)
    direct = ref_noise.noisy_sum(x.cpu(), None, 0.05, distribution, SEED, rounding == "stochastic",
                                 offset=offsets[1])
    assert torch.equal(results["reference"][1].cpu(), direct)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_scaled_noise_backward_redraws_the_forwards_offset(backend):
    """The backward runs later, after other calls advanced the counter: it redraws with the forward's ticket."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 16, generator=g).to(device)
    grad = torch.randn(3, 4, 16, generator=g).to(device)
    xi = x.clone().requires_grad_()
    with fusednoise.backend(backend):
        rng.set_offset(900, device)
        with rng.graph_safe():
            out = ops_lnsr.scaled_noise(xi, 0.05, seed=5)
            fusednoise.add_noise(torch.zeros(8, device=device), 1.0)  # moves the counter on
        (dx,) = torch.autograd.grad(out, xi, grad)
    expected = ref_lnsr.scaled_noise_backward(grad.cpu(), x.cpu(), 0.05, 5, offset=900)
    torch.testing.assert_close(dx.cpu(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, ref_lnsr.scaled_noise_backward(grad.cpu(), x.cpu(), 0.05, 5, offset=901))


def test_saved_and_restored_offsets_replay_the_same_noise():
    """What a recompute (or LNSR's replayed noisy pass) needs on the offset path: the same seed and the same
    offsets again."""
    x = _x(KERNEL_DEVICE)
    with fusednoise.backend("triton"), rng.graph_safe():
        saved = rng.save_offsets(x.device)
        a = fusednoise.add_noise(x, 0.1, seed=3)
        rng.restore_offsets(saved)
        b = fusednoise.add_noise(x, 0.1, seed=3)
        c = fusednoise.add_noise(x, 0.1, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_host_path_is_unchanged_and_takes_no_ticket():
    x = _x(KERNEL_DEVICE)
    with fusednoise.backend("triton"):
        fusednoise.add_noise(x, 0.1, seed=1)  # creates the device's counter if this is its first call
        before = rng.get_offset(x.device)
        fused = fusednoise.add_noise(x, 0.1, "uniform", seed=SEED)
        assert rng.get_offset(x.device) == before
    eager = ref_noise.noisy_sum(x.cpu(), None, 0.1, "uniform", SEED)
    assert torch.equal(fused.cpu(), eager)  # uniform noise: bitwise, as before the offset existed


def test_compiled_code_decides_the_path_when_it_runs():
    """The capture check runs inside the op at run time: a compiled function takes the offset path inside
    graph_safe() and the host path outside, with one compiled graph."""
    x = _x("cpu")
    compiled = torch.compile(lambda t: fusednoise.add_noise(t, 0.1, seed=3), backend="aot_eager", fullgraph=True)
    with fusednoise.backend("reference"):
        rng.set_offset(12, "cpu")
        with rng.graph_safe():
            on_offset = compiled(x)
        host = compiled(x)
    assert torch.equal(on_offset, ref_noise.noisy_sum(x, None, 0.1, "normal", 3, offset=12))
    assert torch.equal(host, ref_noise.noisy_sum(x, None, 0.1, "normal", 3))
    assert rng.get_offset("cpu") == 13


def test_reference_backend_refuses_to_be_captured(monkeypatch):
    """While a (pretended) capture is under way, a call that would run the reference backend on a CUDA tensor
    raises before anything is drawn; the triton backend takes a ticket. The real capture is test_cuda_graphs.py's."""
    monkeypatch.setattr(graph_offsets, "_is_capturing", lambda: True)
    cuda_like = types.SimpleNamespace(is_cuda=True)
    with pytest.raises(RuntimeError, match="reference backend cannot run inside a CUDA graph capture"):
        graph_offsets.kernel_offset(cuda_like, "reference", "add_noise")
    with pytest.raises(RuntimeError, match=r"in_manifold_noise: the reference backend \(which runs"):
        graph_offsets.check_capturable(cuda_like, "reference", "lnsr.in_manifold_noise", " (which runs a tile)")
    graph_offsets.check_capturable(cuda_like, "triton", "add_noise")  # no error
