"""Every fused op once, and one PATS step, on small tensors: the script ``benchmarks/device_run.sh`` runs under
``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` (issue 18).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python benchmarks/sanitizer_smoke.py

Each call launches its Triton kernels (``fusednoise.backend("triton")``) on the GPU, or under Triton's
interpreter on a CPU (``TRITON_INTERPRET=1``: a check that the script itself runs). The shapes reach each
kernel's less common paths: a numel that is not a multiple of the block or of 4, an unaligned view, the ragged
tail of a NoisyTune chunk, an LNSR row wider than one block, a mask with an all-padding example, a transposed
(non-contiguous) PATS parameter beside a bfloat16 one. It prints one line per op and "sanitizer smoke: ok".
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fusednoise
if __name__ == "__main__" and not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

import fusednoise  # noqa: E402
from fusednoise import noisytune, ops_lnsr, rng  # noqa: E402
from fusednoise.kernels import launch, offsets  # noqa: E402
from fusednoise.kernels.rng import philox_words  # noqa: E402
from fusednoise.optim import PATSAdamax  # noqa: E402


def _randn(*shape, dtype=torch.float32, device, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def calls(device):
    """(name, thunk) for every fused op."""
    x = _randn(3, 7, 331, device=device)  # numel not a multiple of 4 or of the block
    half = _randn(5, 413, dtype=torch.bfloat16, device=device)
    unaligned = _randn(1 + 4 * 1000, device=device)[1:]  # a view 4 bytes past an aligned address
    emb = _randn(3, 16, 64, device=device, seed=1)
    mask = torch.ones(3, 16, dtype=torch.int64, device=device)
    mask[1, 6:] = 0
    mask[2] = 0  # an example with no token
    rows = _randn(2, 5, 96, device=device, seed=2).requires_grad_()
    wide = _randn(4, 5000, device=device, seed=3).requires_grad_()  # two sweeps over each row
    vocab = _randn(50, 96, device=device, seed=4)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(5)).to(device)
    clean = [_randn(2, 5, 96, device=device, seed=10 + i).requires_grad_() for i in range(3)]
    noisy = [_randn(2, 5, 96, device=device, seed=20 + i).requires_grad_() for i in range(3)]
    attention = torch.ones(2, 5, device=device)
    attention[1, 3:] = 0
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 3)).to(device)
    return [
        ("add_noise[fp32,normal]", lambda: fusednoise.add_noise(x, 0.1, seed=1)),
        ("add_noise[fp32,uniform,unaligned]", lambda: fusednoise.add_noise(unaligned, 0.1, "uniform", seed=16)),
        ("add_noise_[bf16,stochastic]", lambda: fusednoise.add_noise_(half.clone(), 0.1, seed=2**40,
                                                                       rounding="stochastic")),
        ("add_residual_noise[bf16]", lambda: fusednoise.add_residual_noise(half, half, 0.1, "uniform", seed=3)),
        ("add_neftune_noise[mask]", lambda: fusednoise.add_neftune_noise(emb, 5.0, mask, seed=4)),
        ("scaled_noise[forward,backward]", lambda: ops_lnsr.scaled_noise(rows, 0.05, seed=5).sum().backward()),
        ("scaled_noise[two sweeps]", lambda: ops_lnsr.scaled_noise(wide, 0.05, seed=6).square().sum().backward()),
        ("in_manifold_noise", lambda: ops_lnsr.in_manifold_noise(rows.detach(), ids, vocab, k=4, seed=7)),
        ("layerwise_diff_norm[forward,backward]", lambda: fusednoise.layerwise_diff_norm(
            clean, noisy, [1.0, 0.5, 0.25], attention).backward()),
        ("noisytune.perturb_", lambda: noisytune.perturb_(model, seed=8, include_head=True)),
        ("philox_words", lambda: philox_words(9, 1500, 2**32 - 100, 7, 1, device=device)),
        ("take_offset", lambda: offsets.take_offset(torch.zeros(1, dtype=torch.int64, device=device))),
    ]


def pats_step(device) -> None:
    """One PATSAdamax step over a transposed float32 parameter and a bfloat16 one (two buckets)."""
    gen = torch.Generator().manual_seed(11)
    a = torch.nn.Parameter((0.05 * torch.randn(40, 30, generator=gen)).to(device).t())
    b = torch.nn.Parameter((0.05 * torch.randn(64, generator=gen)).to(device, torch.bfloat16))
    opt = PATSAdamax([{"params": [a]}, {"params": [b]}], lr=1e-2, noise_lambda=1e-4, noise_prob=0.5, seed=12)
    a.grad = torch.randn(40, 30, generator=gen).to(device).t()
    b.grad = torch.randn(64, generator=gen).to(device, torch.bfloat16)
    opt.step()


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng.draw_seed()  # the CPU generator's buffer, outside the calls
    launched = []
    launch.observers.append(lambda record: launched.append(record.kernel.__name__))
    silent = []
    with fusednoise.backend("triton"):
        for name, call in calls(device) + [("PATSAdamax.step", lambda: pats_step(device))]:
            launched.clear()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"ok {name}: {', '.join(launched) or 'NO KERNEL LAUNCHED'}", flush=True)
            if not launched:
                silent.append(name)
    if silent:  # an op that fell back to the reference would check nothing here
        print(f"sanitizer smoke: {', '.join(silent)} launched no kernel")
        return 1
    print(f"sanitizer smoke: ok ({device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
