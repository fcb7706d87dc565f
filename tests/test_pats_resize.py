"""PATSAdamax on a parameter resized after its state was created (issue 19, item 2): ``p.data`` grown, shrunk,
or swapped as ``resize_token_embeddings`` does. Both backends raise a RuntimeError naming the parameter and
the mismatched tensor before anything changes (the fused path used to launch with the new element count and
the old state's pointers: heap corruption when growing, a silent step on the old state's first elements when
shrinking). The "triton" cases run the kernels under Triton's interpreter without a GPU.
"""
import pytest
import torch

import fusednoise
from fusednoise.kernels import pats as kernels
from fusednoise.optim import PATSAdamax
from fusednoise.reference import pats as reference

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "triton"]


def _snapshot(opt, params):
    state = {k: {name: (v.clone() if isinstance(v, torch.Tensor) else v) for name, v in opt.state[p].items()}
             for k, p in enumerate(params)}
    return [p.detach().clone() for p in params], state


def _assert_unchanged(opt, params, before):
    values, state = before
    for k, (p, v) in enumerate(zip(params, values)):
        assert torch.equal(p.detach(), v), f"parameter {k} changed"
        for name, saved in state[k].items():
            now = opt.state[p][name]
            if isinstance(saved, torch.Tensor):
                assert torch.equal(now, saved), f"state {name!r} of parameter {k} changed"
            else:
                assert now == saved


def _stepped(backend, capturable=False, sizes=(16, 8)):
    """An optimizer (noise on) over two parameters, after one step on ``backend``."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device=KERNEL_DEVICE if backend == "triton" else "cpu"))
              for n in sizes]
    opt = PATSAdamax(params, lr=1e-2, noise_lambda=1e-3, noise_prob=0.5, seed=3, capturable=capturable)
    for p in params:
        p.grad = torch.randn_like(p)
    with fusednoise.backend(backend):
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("new_numel", [4096, 4], ids=["grown", "shrunk"])
@pytest.mark.parametrize("capturable", [False, True], ids=["host_counts", "capturable"])
def test_resized_parameter_is_refused_before_anything_changes(backend, new_numel, capturable):
    params, opt = _stepped(backend, capturable)
    resized = params[1]
    resized.data = torch.randn(new_numel, device=resized.device)
    resized.grad = torch.randn_like(resized)
    params[0].grad = torch.randn_like(params[0])
    before = _snapshot(opt, params)
    with fusednoise.backend(backend), pytest.raises(RuntimeError) as info:
        opt.step()
    message = str(info.value)
    assert "parameter 1" in message and f"({new_numel},)" in message and "(8,)" in message
    assert "exp_avg" in message and "resize" in message
    # nothing half-written: the first parameter (fine) was not stepped either, no step count advanced
    _assert_unchanged(opt, params, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_embedding_weight_is_refused_and_state_can_be_restarted(backend):
    """``resize_token_embeddings`` keeps the Parameter and replaces its ``.data``: the next step must refuse,
    and dropping the parameter's state (what the message suggests) lets training go on."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    torch.manual_seed(1)
    emb = torch.nn.Embedding(6, 4).to(device)
    opt = PATSAdamax(emb.parameters(), lr=1e-2, noise_lambda=1e-3, seed=5)
    tokens = torch.tensor([[0, 2, 5]], device=device)
    with fusednoise.backend(backend):
        emb(tokens).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        old = emb.weight.detach().clone()
        grown = torch.randn(10, 4, device=device)
        grown[:6] = old
        emb.weight.data = grown  # what resize_token_embeddings does to the same Parameter
        emb(tokens).square().sum().backward()
        before = _snapshot(opt, [emb.weight])
        with pytest.raises(RuntimeError, match=r"parameter 0 has shape \(10, 4\) but its state 'exp_avg' has "
                                               r"shape \(6, 4\)"):
            opt.step()
        _assert_unchanged(opt, [emb.weight], before)
        del opt.state[emb.weight]
        opt.step()
    assert opt.state[emb.weight]["exp_avg"].shape == (10, 4)
    assert float(opt.state[emb.weight]["step"]) == 1.0
    assert not torch.equal(emb.weight.detach()[:6], old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_another_shape_is_refused(backend):
    params, opt = _stepped(backend)
    params[1].data = torch.randn(32, device=params[1].device)  # the old, 8-element gradient stays
    params[1].grad = None
    params[1].grad = torch.randn(32, device=params[1].device)
    params[1].data = torch.randn(8, device=params[1].device)   # now the gradient is the odd one out
    params[0].grad = torch.randn_like(params[0])
    before = _snapshot(opt, params)
    with fusednoise.backend(backend), pytest.raises(RuntimeError, match=r"parameter 1 has shape \(8,\) but its "
                                                                         r"gradient has shape \(32,\)"):
        opt.step()
    _assert_unchanged(opt, params, before)


def test_launcher_refuses_jobs_of_mismatched_sizes():
    """The launcher, usable on its own, checks element counts before launching anything."""
    sc = reference.step_scalars(step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                decoupled_weight_decay=True, noise=True, sensitivity_beta=0.75, noise_lambda=1e-3,
                                gamma=2e-3, noise_prob=0.2, noise_eps=1e-8, seed=1)
    param = torch.randn(4096, device=KERNEL_DEVICE)
    small = [torch.zeros(8, device=KERNEL_DEVICE) for _ in range(3)]
    kept = param.clone()
    with pytest.raises(RuntimeError, match=r"jobs\[0\] has a parameter of 4096 elements but its exp_avg has 8"):
        kernels.PatsLauncher().step([(param, torch.randn_like(param), *small, sc, 0)])
    assert torch.equal(param, kept) and all(not t.any() for t in small)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_of_another_shape_loaded_or_set_after_a_step_is_refused(backend):
    """The check is cached per parameter between steps: a checkpoint of another shape (torch's
    load_state_dict does not compare shapes) or a state tensor replaced by hand is checked again."""
    params, opt = _stepped(backend)
    small, small_opt = _stepped(backend, sizes=(16, 5))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.load_state_dict(small_opt.state_dict())
    before = _snapshot(opt, params)
    with fusednoise.backend(backend), pytest.raises(RuntimeError, match=r"parameter 1 has shape \(8,\) but its "
                                                                         r"state 'exp_avg' has shape \(5,\)"):
        opt.step()
    _assert_unchanged(opt, params, before)

    params, opt = _stepped(backend)
    for p in params:
        p.grad = torch.randn_like(p)
    with fusednoise.backend(backend):
        opt.step()  # the shapes are now cached as checked
    opt.state[params[0]]["sensitivity"] = torch.zeros(3, device=params[0].device)
    before = _snapshot(opt, params)
    with fusednoise.backend(backend), pytest.raises(RuntimeError, match="its state 'sensitivity' has shape"):
        opt.step()
    _assert_unchanged(opt, params, before)
