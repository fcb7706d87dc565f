"""torch.compile over the methods' entry points: each either traces (one opaque op) or is a clean graph break
that runs eagerly, and gives the eager result for the same seed. The HyPe ops are in test_ops.py and
PATSAdamax's step in test_pats.py; this file covers NoisyTune's ``perturb_``, LNSR's noise makers and the
philox fallback (numpy, traced by dynamo into uint64 torch ops CPU torch lacks, so it must stay eager)."""
import pytest
import torch

from fusednoise import native_philox, noisytune, ops_lnsr


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


@pytest.mark.parametrize("philox", ["c", "numpy-fallback"])
def test_noisytune_perturb_under_compile_equals_eager(philox):
    native_philox.reset(False if philox == "numpy-fallback" else None)
    try:
        eager, compiled = _mlp(), _mlp()
        eager_report = noisytune.perturb_(eager, 0.15, seed=4)
        compiled_report = torch.compile(lambda: noisytune.perturb_(compiled, 0.15, seed=4), backend="eager")()
    finally:
        native_philox.reset()
    assert all(torch.equal(a, b) for a, b in zip(eager.parameters(), compiled.parameters()))
    assert compiled_report.perturbed == eager_report.perturbed and len(eager_report.perturbed) == 4
    assert not all(torch.equal(a, b) for a, b in zip(eager.parameters(), _mlp().parameters()))


def test_lnsr_scaled_noise_traces_as_one_op():
    x = torch.randn(2, 5, 16, requires_grad=True)
    eager = ops_lnsr.scaled_noise(x, 0.05, seed=5)
    compiled = torch.compile(lambda t: ops_lnsr.scaled_noise(t, 0.05, seed=5), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.equal(out, eager)
    upstream = torch.randn_like(out)
    (eager_grad,) = torch.autograd.grad(eager, x, upstream)
    (compiled_grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(compiled_grad, eager_grad)


def test_lnsr_in_manifold_noise_compiles_with_a_graph_break():
    """Its token-id range check reads values (data-dependent): not fullgraph-traceable, but a graph break, never
    an error, and the noise op itself is the same."""
    torch.manual_seed(1)
    embedding = torch.randn(50, 16)
    token_ids = torch.randint(0, 50, (2, 7))
    x = embedding[token_ids].clone()
    neighbors = ops_lnsr.nearest_neighbors(embedding, k=4)
    eager = ops_lnsr.in_manifold_noise(x, token_ids, embedding, k=4, mix_ratio=0.1, seed=9, neighbors=neighbors)
    compiled = torch.compile(lambda t: ops_lnsr.in_manifold_noise(t, token_ids, embedding, k=4, mix_ratio=0.1,
                                                                  seed=9, neighbors=neighbors),
                             backend="aot_eager")
    assert torch.equal(compiled(x), eager)
    assert not torch.equal(eager, x)
