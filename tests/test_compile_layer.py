"""What the JIT does with argument values, checked on a CPU (issue 18 §2, §3 and "A CPU layer between the
interpreter and the GPU").

The interpreter runs a kernel whatever its arguments' values; the JIT specialises them and compiles a variant
per specialisation. A seed is a per-call value: if the JIT specialised it, ``seed=1`` would make it a constant
(``seed.to(tl.uint64)`` then fails to compile), a seed divisible by 16 would need a second kernel and a seed that
fits in 32 bits a third, and a CUDA-graph capture whose fresh seed needs a variant its eager warm-up never loaded
fails (a capture cannot load a module). ``compile_check.specialise`` computes the specialisation with Triton's
own binder, ``do_not_specialize`` and annotations included, so these tests see what the JIT would do.

The last test (moved to the end of the session by ``conftest.py``) waits for the compile layer: every distinct
launch the session made, compiled for sm_90 (and sm_80) (``tests/compile_layer.py``).
"""
import contextlib
import importlib.util
import os
import time

import pytest
import torch

import compile_layer
import fusednoise
from devices import HAS_CUDA, KERNEL_DEVICE
from fusednoise import ops_lnsr
from fusednoise.kernels import compile_check, launch as launch_module, specialisations
from fusednoise.kernels import noisytune as noisytune_kernels
from fusednoise.kernels.rng import philox_words

SEEDS = (1, 16, 17, 42, 2**33, 2**40, 2**40 + 16, specialisations.DRAWN_SEED)
SEEDED_KERNELS = {"noise_kernel", "_noise_kernel", "_scaled_noise_kernel", "_in_manifold_kernel", "_neftune_kernel",
                  "philox_words_kernel", "add_rms_norm_forward_kernel", "add_layer_norm_forward_kernel"}

needs_nvidia_backend = pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="this Triton build has no NVIDIA backend (no bundled ptxas), so nothing can be compiled for a GPU")


@contextlib.contextmanager
def specialisations_of_launches():
    """(kernel name, specialisation key) of every launch made inside the block."""
    seen = []

    def observe(launch):
        seen.append((compile_check.jit_function(launch.kernel).__name__, compile_check.specialisation_key(launch)))

    launch_module.observers.append(observe)
    try:
        yield seen
    finally:
        launch_module.observers.remove(observe)


def _x(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(KERNEL_DEVICE)


def _ops():
    x, r = _x((3, 50)), _x((3, 50), seed=1)
    half = _x((4, 24), torch.bfloat16)
    emb = _x((2, 5, 8))
    rows = _x((6, 16))
    vocab = _x((40, 8), seed=2)
    tokens = torch.randint(0, 40, (2, 3), generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE)
    manifold_x = _x((2, 3, 8), seed=4)
    grad = _x((6, 16), seed=5)
    wide, wide_r, weight = _x((4, 32), seed=6), _x((4, 32), seed=7), _x((32,), seed=8)
    return {
        "add_noise[normal]": lambda seed: fusednoise.add_noise(x, 0.1, seed=seed),
        "add_noise[uniform]": lambda seed: fusednoise.add_noise(x, 0.1, "uniform", seed=seed),
        "add_noise[bf16,stochastic]": lambda seed: fusednoise.add_noise(half, 0.1, seed=seed, rounding="stochastic"),
        "add_residual_noise": lambda seed: fusednoise.add_residual_noise(x, r, 0.1, seed=seed),
        "add_neftune_noise": lambda seed: fusednoise.add_neftune_noise(emb, 5.0, seed=seed),
        "scaled_noise[forward,backward]": lambda seed: _scaled_noise_forward_and_backward(rows, grad, seed),
        "in_manifold_noise": lambda seed: ops_lnsr.in_manifold_noise(manifold_x, tokens, vocab, k=4, seed=seed),
        "noisytune": lambda seed: noisytune_kernels.launch_perturb([x.clone()], [0], 0.15, seed),
        "philox_words": lambda seed: philox_words(seed, 64, seed % 1000, seed % 7, seed % 2, device=KERNEL_DEVICE),
        "add_rms_norm": lambda seed: fusednoise.add_rms_norm(wide, wide_r, weight, sigma=0.1, seed=seed),
        "add_layer_norm": lambda seed: fusednoise.add_layer_norm(wide, wide_r, weight, weight, sigma=0.1, seed=seed),
    }


def _scaled_noise_forward_and_backward(rows, grad, seed):
    leaf = rows.clone().requires_grad_()
    ops_lnsr.scaled_noise(leaf, 0.1, seed=seed).backward(grad)
    return leaf.grad


@pytest.mark.parametrize("op", list(_ops()))
def test_a_seeded_op_takes_one_kernel_whatever_its_seed(op):
    # Issue 18 §2/§3, through the public ops: seeds 1, 16, 17, 42 and 64-bit ones give each kernel the op
    # launches one specialisation, so the kernel an eager warm-up compiled is the one every later call (and a
    # capture) needs.
    call = _ops()[op]
    sequences = []
    with fusednoise.backend("triton"):
        for seed in SEEDS:
            with specialisations_of_launches() as seen:
                call(seed)
            sequences.append(seen)
    assert {kernel for kernel, _ in sequences[0]} & SEEDED_KERNELS
    # The same launches, in the same order, with the same specialisation, whatever the seed.
    differ = [seed for seed, seen in zip(SEEDS, sequences) if seen != sequences[0]]
    assert not differ, f"seeds {differ} need other kernels than seed {SEEDS[0]}"


def test_every_seeded_case_of_the_table_has_one_specialisation_for_any_seed():
    # What `python -m fusednoise.kernels.compile_check` checks (without compiling): every launch of the
    # specialisation table whose kernel takes a seed or another per-call value.
    findings = compile_check.per_call_findings()
    assert {compile_check.jit_function(c.launch.kernel).__name__ for c in specialisations.cases()
            if any(name in compile_check.PER_CALL_ARGUMENTS for name in
                   compile_check.jit_function(c.launch.kernel).arg_names)} == SEEDED_KERNELS
    assert len(findings) >= 30
    assert not [f for f in findings if f[1]], [f for f in findings if f[1]]


def test_the_table_compiles_seed_1_and_seeds_divisible_by_16():
    # Compile-only cases of the table (tests/test_kernels_compile.py compiles them): each seeded kernel with a seed
    # of 1, and seeds divisible by 16 and a first block of 1 where a kernel takes them.
    names = [c.name for c in specialisations.cases()]
    for kernel in ("hype", "noisytune.noise", "lnsr.scaled_noise", "lnsr.in_manifold", "neftune", "rng.philox_words"):
        assert [n for n in names if n.startswith(kernel) and ("seed=1]" in n or "seed=1," in n)], kernel
    assert [n for n in names if "seed=16," in n or "seed=16]" in n or "seed=32]" in n]
    assert [n for n in names if "first_index=8" in n]  # a first block of 1 (8 half-precision elements)


def _real_launches():
    """Launches with CPU tensors and argument values that the JIT treats differently: an unaligned view, a
    size of 1, sizes divisible by 16 or not, an int64 size."""
    from fusednoise.kernels import neftune, noise, rng

    base = torch.zeros(64)
    unaligned = base[1:33]
    yield noise.noise_launch(unaligned, None, unaligned, 0.1, "normal", 1, False)
    yield noise.noise_launch(base[:1], None, base[:1], 0.1, "uniform", 16, False, first_index=4)
    yield noise.noise_launch(base[:32], base[:32], base[:32], 0.1, "normal", 2**40, False, first_index=2**36)
    out = torch.empty(4, 17, dtype=torch.int64)
    yield rng.philox_words_launch(out, 1, 17, 1, 1, 1)
    emb = torch.zeros(1, 1, 16)
    yield neftune.neftune_launch(emb, None, None, emb, 5.0, 1)


def test_spelled_out_specialisation_is_the_jit_binders():
    # compile_check keeps the JIT's rule spelled out for a Triton whose binder differs (the GPU machine's 3.6):
    # here it must agree with this Triton's own binder on every case, every per-call value, and real tensors.
    launches = [c.launch for c in specialisations.cases()] + list(_real_launches())
    for launch in launches:
        variants = [launch] + [compile_check._with_value(launch, name, value)
                               for name in compile_check.per_call_specialisations(launch) for value in (1, 16, 2**40)]
        for variant in variants:
            assert compile_check.specialise(variant, spelled_out=True) == compile_check.specialise(variant)


def test_the_binder_sees_what_the_interpreter_hides():
    # The values the compile layer exists for: an unaligned pointer loses its divisibility, a size of 1 becomes a
    # constant, a size over 2**31 an i64 (so a real compile of each is needed, not one per kernel).
    first, single, wide, *_ = list(_real_launches())
    signature, constexprs, attrs = compile_check.specialise(first)
    divisible = [["tt.divisibility", 16]]
    assert attrs[(0,)] == attrs[(2,)] == [] and attrs[(3,)] == divisible  # x/out unaligned, the offset aligned
    signature, constexprs, _ = compile_check.specialise(single)
    assert signature["numel"] == "constexpr" and constexprs[(4,)] == 1
    assert signature["seed"] == "u64" and signature["first_block"] == "i64"
    big = compile_check._with_value(wide, "numel", 2**31 + 16)
    assert compile_check.specialise(big)[0]["numel"] == "i64"


@needs_nvidia_backend
@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the JIT itself compiles every launch the suite makes")
def test_every_launch_of_the_session_compiles_for_sm90_and_sm80(request):
    # Runs last (conftest.py): the worker has compiled, in parallel with the session, each distinct launch the
    # session made, with Triton's real compiler and ptxas (run alone, it makes this file's launches itself).
    layer = compile_layer.active(request.config)
    if layer is None and os.environ.get("FUSEDNOISE_COMPILE_LAYER") == "0":
        pytest.skip("FUSEDNOISE_COMPILE_LAYER=0: the session's launches were not recorded nor compiled")
    assert layer is not None, "conftest.py starts the compile layer when this test is collected"
    if not layer.records:  # run alone: this file's ops, once each, with the seed that did not compile (issue 18)
        with fusednoise.backend("triton"):
            for call in _ops().values():
                call(1)
    assert layer.records, "no launch was recorded: the observer on Launch.run is not installed"
    started = time.perf_counter()
    results = layer.finish(timeout=1500)
    layer.waited = time.perf_counter() - started
    layer.compile_seconds = sum(r["seconds"] for r in results.values())
    missing = [i for i in range(len(layer.records)) if i not in results]
    assert not missing, (f"{len(missing)} of {len(layer.records)} records not compiled"
                         + (f" within {layer.timed_out:.0f} s" if layer.timed_out else "")
                         + f"; worker log:\n{layer.worker_log()}")
    failures = [f"sm_{arch}: {error}\n    {layer.describe(i)}" for i, result in sorted(results.items())
                for arch, error in result["errors"].items() if error]
    assert not layer.unrecordable, layer.unrecordable
    assert not failures, f"{len(failures)} launches do not compile:\n" + "\n".join(failures)
