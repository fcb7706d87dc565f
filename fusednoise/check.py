"""``fusednoise check``: every fused op against its eager reference on this device, then what the methods cost
on the real pretrained all-MiniLM-L6-v2.

1. Each fused op (Triton) and its eager reference run on the same fresh random inputs with the same seed, in
   float32, float16 and bfloat16 where the op takes them: HyPe's three noise ops; LNSR's layer-wise diff norm
   (forward and backward, every ``reduction`` the op offers) and both noise makers (scaled standard noise forward
   and backward, in-manifold noise); NoisyTune's perturbation; the PATS step (parameters and optimizer state
   after three steps in float32, one in bfloat16); NEFTune's noise, where the package has it. A line per (op, dtype): the largest difference
   and ok / MISMATCH against the tolerance of the test suite for that dtype.
2. Timings on MiniLM (sentences from GLUE's RTE when ``--data-dir`` is given, else built-in ones): a training
   step with and without HyPe-N (the overhead HyPe adds), and the PATS optimizer step against
   ``torch.optim.Adamax`` (single-tensor, ``foreach=False``) over the same parameters and gradients.

Without a GPU the kernels run under Triton's interpreter (the command sets ``TRITON_INTERPRET=1``): the op checks
then test the kernels' logic on this CPU, and the timings are of the eager references (CPU reference mode).
"""
from __future__ import annotations

import csv
import inspect
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fusednoise

# Real sentences (premise / hypothesis style) used when no GLUE folder is given.
SENTENCES = [
    "The cat sat on the mat while the rain kept falling outside.",
    "A man is playing a guitar on a crowded street corner.",
    "The committee approved the new budget after a long debate.",
    "Scientists discovered a new species of frog in the rainforest.",
    "She finished the marathon despite an injury to her ankle.",
    "The museum will be closed for renovations until next spring.",
    "Stock prices fell sharply after the central bank raised interest rates.",
    "The children built a sandcastle near the edge of the water.",
    "He forgot his umbrella and got soaked on the way to work.",
    "The new bridge reduced the commute between the two towns by half.",
    "Volunteers planted three hundred trees in the city park on Saturday.",
    "The film received mixed reviews but was a success at the box office.",
    "A heavy storm knocked out power to thousands of homes overnight.",
    "The team won the championship for the third year in a row.",
    "Researchers say the vaccine is safe and effective for older adults.",
    "The restaurant on the corner serves the best noodles in town.",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol) per dtype: the tolerances tests/ uses between kernel and reference (float32 sums in a different
# order; one half-precision ulp of rounding).
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5)}

# An op check: (device, dtype, generator) -> {part name: (fused result, reference result[, (rtol, atol)])}.
Results = Dict[str, tuple]


def _load_sentences(data_dir: Optional[str], count: int) -> List[str]:
    if data_dir is None:
        return [SENTENCES[i % len(SENTENCES)] for i in range(count)]
    path = Path(data_dir) / "RTE" / "dev.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"--data-dir must hold GLUE's RTE/dev.tsv; {path} does not exist")
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [rows[i % len(rows)]["sentence1"] for i in range(count)]


def _both(run: Callable[[], object]) -> Tuple[object, object]:
    """``run()`` on the triton backend, then on the reference backend."""
    import fusednoise

    with fusednoise.backend("triton"):
        fused = run()
    with fusednoise.backend("reference"):
        eager = run()
    return fused, eager


def _randn(shape, device, dtype, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- op checks
def _hype_ops(device, dtype, generator) -> Results:
    import fusednoise
    from fusednoise import rng

    x = _randn((2, 64, 384), device, dtype, generator)
    residual = _randn((2, 64, 384), device, dtype, generator)
    ops = {
        "add_noise_ (normal)": lambda seed: fusednoise.add_noise_(x.clone(), 1e-2, seed=seed),
        "add_noise (uniform)": lambda seed: fusednoise.add_noise(x, 1e-2, "uniform", seed=seed),
        "add_residual_noise": lambda seed: fusednoise.add_residual_noise(x, residual, 1e-2, seed=seed),
    }
    results = {}
    for name, op in ops.items():
        seed = rng.draw_seed()
        results[name] = _both(lambda: op(seed))
    return results


def _diff_norm(device, dtype, generator) -> Results:
    from fusednoise import ops_lnsr

    L, B, T, D = 6, 2, 16, 384
    clean = _randn((L, B, T, D), device, dtype, generator)
    noisy = clean + 0.1 * _randn((L, B, T, D), device, dtype, generator)
    mask = torch.ones(B, T, device=device, dtype=torch.long)
    mask[1, T // 2:] = 0  # one padded example
    weights = [0.2 + 0.16 * r for r in range(L)]
    # Every reduction the op offers (the reading of ||.||^2; SPEC section 2), and today's default otherwise.
    parameters = inspect.signature(ops_lnsr.layerwise_diff_norm).parameters
    reductions = ("sum", "token_mean", "mean") if "reduction" in parameters else (None,)
    results = {}
    for reduction in reductions:
        extra = {} if reduction is None else {"reduction": reduction}

        def run():
            c, n = clean.clone().requires_grad_(), noisy.clone().requires_grad_()
            total = ops_lnsr.layerwise_diff_norm(list(c.unbind(0)), n, weights=weights, mask=mask, **extra)
            total.backward()
            return total.detach(), c.grad, n.grad

        (total, grad_clean, grad_noisy), (ref_total, ref_clean, ref_noisy) = _both(run)
        suffix = f" [{reduction}]" if reduction else ""
        results[f"layerwise_diff_norm fwd{suffix}"] = (total, ref_total)
        results[f"layerwise_diff_norm bwd{suffix}"] = (torch.cat([grad_clean.flatten(), grad_noisy.flatten()]),
                                                       torch.cat([ref_clean.flatten(), ref_noisy.flatten()]))
    return results


def _noise_makers(device, dtype, generator) -> Results:
    from fusednoise import ops_lnsr, rng

    x = _randn((2, 16, 384), device, dtype, generator)
    upstream = _randn((2, 16, 384), device, dtype, generator)
    seed = rng.draw_seed()

    def scaled():
        xi = x.clone().requires_grad_()
        out = ops_lnsr.scaled_noise(xi, 0.05, seed=seed)
        (grad,) = torch.autograd.grad(out, xi, upstream)
        return out.detach(), grad

    (out, grad), (ref_out, ref_grad) = _both(scaled)
    weight = _randn((500, 64), device, dtype, generator)
    neighbors = ops_lnsr.nearest_neighbors(weight, k=10)
    ids = torch.randint(0, 500, (2, 16), generator=generator).to(device)
    hidden = _randn((2, 16, 64), device, dtype, generator)
    manifold = _both(lambda: ops_lnsr.in_manifold_noise(hidden, ids, weight, mix_ratio=0.15, seed=seed,
                                                        neighbors=neighbors))
    return {"scaled_noise fwd": (out, ref_out), "scaled_noise bwd": (grad, ref_grad),
            "in_manifold_noise": manifold}


def _noisytune(device, dtype, generator) -> Results:
    from fusednoise import noisytune, rng

    shapes = [(384, 384), (40000,), (384,)]  # 40000: the statistics of one tensor merged over two chunks
    tensors = [0.02 * _randn(shape, device, dtype, generator) for shape in shapes]
    seed = rng.draw_seed()

    def run():
        copies = [t.clone() for t in tensors]
        noisytune.perturb_(copies, noise_lambda=0.15, seed=seed)
        return torch.cat([c.flatten() for c in copies])

    return {"noisytune.perturb_": _both(run)}


def _pats_step(device, dtype, generator) -> Results:
    from fusednoise import rng
    from fusednoise.optim import PATSAdamax

    shapes = [(384, 384), (33000,), (384,)]  # 33000: a mean sensitivity reduced from several partial sums
    start = [0.05 * _randn(shape, device, dtype, generator) for shape in shapes]
    # Three steps in float32 (the state's history matters). One in half precision: there the two backends' float32
    # results, one ulp apart, can round to neighbouring half values, and a later step's noise, whose variance
    # depends on those parameters, would carry the difference further than rounding explains.
    steps = 3 if dtype == torch.float32 else 1
    grads = [[1e-2 * _randn(shape, device, dtype, generator) for shape in shapes] for _ in range(steps)]
    seed = rng.draw_seed()

    def run():
        params = [p.clone().requires_grad_() for p in start]
        groups = [{"params": params[:2]}, {"params": params[2:], "noise": False}]
        optimizer = PATSAdamax(groups, lr=1e-3, noise_lambda=1e-4, noise_prob=0.5, seed=seed)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        state = [optimizer.state[p][name] for p in params for name in ("exp_avg", "exp_inf")]
        return torch.cat([p.detach().float().flatten() for p in params]), torch.cat([s.flatten() for s in state])

    (params, state), (ref_params, ref_state) = _both(run)
    eps = torch.finfo(dtype).eps
    tolerance = (1e-5, 1e-6) if dtype == torch.float32 else (eps, 1e-7)  # one half-precision ulp
    name = f"PATSAdamax.step x{steps}"
    return {f"{name} params": (params, ref_params, tolerance), f"{name} state": (state, ref_state, (1e-5, 1e-9))}


def _neftune(device, dtype, generator) -> Results:
    import fusednoise
    from fusednoise import rng

    x = _randn((2, 16, 384), device, dtype, generator)
    mask = torch.ones(2, 16, device=device, dtype=torch.long)
    mask[1, 10:] = 0  # padded positions stay as they are
    seed = rng.draw_seed()
    return {"add_neftune_noise": _both(lambda: fusednoise.add_neftune_noise(x, 5.0, mask, seed=seed))}


OP_CHECKS: Dict[str, Tuple[Callable, Sequence[torch.dtype]]] = {
    "HyPe": (_hype_ops, DTYPES),
    "LNSR diff norm": (_diff_norm, DTYPES),
    "LNSR noise": (_noise_makers, DTYPES),
    "NoisyTune": (_noisytune, (torch.float32, torch.bfloat16)),
    "PATS": (_pats_step, (torch.float32, torch.bfloat16)),
}
if hasattr(fusednoise, "add_neftune_noise"):  # NEFTune's op, where this version of the package has it
    OP_CHECKS["NEFTune"] = (_neftune, DTYPES)


def _verdict(fused: torch.Tensor, eager: torch.Tensor, tolerance: tuple) -> Tuple[float, bool]:
    """The largest difference, and whether ``|fused - eager| <= atol + rtol * |eager|`` everywhere (``atol`` a
    number or a tensor of eager's shape)."""
    rtol, atol = tolerance
    fused, eager = fused.detach().float().cpu(), eager.detach().float().cpu()
    if fused.shape != eager.shape:
        return float("inf"), False
    difference = (fused - eager).abs()
    atol = atol.float().cpu() if isinstance(atol, torch.Tensor) else atol
    ok = bool((difference <= atol + rtol * eager.abs()).all())
    return (difference.max().item() if difference.numel() else 0.0), ok


def check_ops(device: str, methods: Optional[Sequence[str]] = None,
              dtypes: Optional[Sequence[torch.dtype]] = None) -> List[str]:
    """Every fused op of ``methods`` (default: all of :data:`OP_CHECKS`) against its reference on ``device``, in
    each dtype the op takes (or those of ``dtypes`` among them): one line per (op, dtype), ending in ``ok`` or
    ``MISMATCH``."""
    from fusednoise import backends

    if not backends.triton_available():
        return ["triton is not installed here: only the reference backend runs (CPU reference mode)"]
    if device == "cpu" and not backends.interpreter_enabled():
        return ["no GPU and TRITON_INTERPRET is not 1: the kernels cannot run on this machine"]
    lines = []
    generator = torch.Generator().manual_seed(0)
    for method in methods or OP_CHECKS:
        check, supported = OP_CHECKS[method]
        for dtype in (d for d in supported if dtypes is None or d in dtypes):
            for name, (fused, eager, *tolerance) in check(device, dtype, generator).items():
                max_diff, ok = _verdict(fused, eager, tolerance[0] if tolerance else TOLERANCE[dtype])
                lines.append(f"{name:<34} {str(dtype).replace('torch.', ''):<9} max|fused-ref| = {max_diff:.2e}  "
                             f"{'ok' if ok else 'MISMATCH'}")
    return lines


# --------------------------------------------------------------------------------------------- timings
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_training_steps(model, batch, steps: int, hype_sigma: Optional[float], device: str) -> List[float]:
    """Seconds per AdamW step (forward, backward, update), after one warm-up step."""
    from tqdm.auto import tqdm

    from . import hype

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    handle = hype.apply(model, sigma=hype_sigma) if hype_sigma is not None else None
    label = "HyPe-N" if handle is not None else "vanilla"
    times = []
    model.train()
    try:
        for step in tqdm(range(steps + 1), desc=f"{label} steps", leave=False):
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if step > 0:
                times.append(time.perf_counter() - start)
    finally:
        if handle is not None:
            handle.remove()
    return times


def time_optimizer_steps(optimizer, steps: int, device: str) -> List[float]:
    """Seconds per ``optimizer.step()`` over the gradients already in place, after one warm-up step."""
    times = []
    for step in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        if step > 0:
            times.append(time.perf_counter() - start)
    return times


def pats_against_adamax(model, batch, steps: int, device: str) -> Dict[str, float]:
    """Median seconds per step of PATSAdamax (the paper's groups, noise on) and of ``torch.optim.Adamax``
    (single-tensor: ``foreach=False``) over the same parameters, with the gradients of one real batch."""
    from .optim import PATSAdamax, pats_param_groups

    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    results = {}
    builders = {
        "pats": lambda: PATSAdamax(pats_param_groups(model), lr=2e-5),
        "adamax": lambda: torch.optim.Adamax(model.parameters(), lr=2e-5, foreach=False),
    }
    for name, build in builders.items():
        results[name] = statistics.median(time_optimizer_steps(build(), steps, device))
        with torch.no_grad():  # the next optimizer starts from the same weights
            for pname, p in model.named_parameters():
                p.copy_(saved[pname])
    model.zero_grad(set_to_none=True)
    return results


def run_check(model: Optional[str] = None, device: Optional[str] = None, steps: int = 5, batch_size: int = 16,
              max_length: int = 128, sigma: float = 1e-5, data_dir: Optional[str] = None) -> dict:
    """The whole ``fusednoise check``: prints the op lines and the timings; returns the timings (seconds)."""
    from . import backends
    from .experiments.models import load_classifier, resolve_model_path

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fusednoise check on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print("\n1. Every fused op against its eager reference (same inputs, same seed):")
    lines = check_ops(device)
    for line in lines:
        print("   " + line)

    print(f"\n2. Timings on {model or 'the packaged all-MiniLM-L6-v2'} ({resolve_model_path(model)})")
    torch.manual_seed(0)
    network, tokenizer = load_classifier(model, num_labels=2)
    network.to(device)
    sentences = _load_sentences(data_dir, batch_size)
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
    batch["labels"] = torch.arange(batch_size, device=device) % 2
    backend = backends.resolve(next(network.parameters()))
    results = {}
    for name, method_sigma in (("vanilla", None), ("hype-n", sigma)):
        results[name] = statistics.median(time_training_steps(network, batch, steps, method_sigma, device))
    overhead = results["hype-n"] / results["vanilla"] - 1
    print(f"   training step, batch {batch_size} x {max_length} tokens, median of {steps} steps ({backend} backend)")
    print(f"   vanilla  {results['vanilla'] * 1e3:9.1f} ms/step")
    print(f"   HyPe-N   {results['hype-n'] * 1e3:9.1f} ms/step   ({overhead:+.1%}, sigma={sigma:g})")
    optimizers = pats_against_adamax(network, batch, steps, device)
    results.update({f"{name}_step": value for name, value in optimizers.items()})
    parameters = sum(p.numel() for p in network.parameters())
    print(f"   optimizer step over {parameters / 1e6:.1f}M parameters, median of {steps} steps ({backend} backend)")
    print(f"   torch.optim.Adamax (foreach=False) {optimizers['adamax'] * 1e3:9.1f} ms/step")
    print(f"   PATSAdamax                         {optimizers['pats'] * 1e3:9.1f} ms/step   "
          f"({optimizers['pats'] / optimizers['adamax']:.2f}x Adamax)")
    results["op_lines"] = lines
    return results
