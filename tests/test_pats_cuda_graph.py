"""PATSAdamax inside a CUDA graph (issue 13): a captured step replayed N times equals N eager steps for the same
seed, because with ``capturable=True`` the step counts live on the GPU, the graph advances them, and the kernels
derive each step's bias correction and noise key from them. Capturing a step without ``capturable`` is refused.

GPU only (``benchmarks/device_run.sh`` runs it); the CPU suite checks the capturable path against the normal one
under the interpreter and on the reference (tests/test_pats.py).
"""
import pytest
import torch

from fusednoise.optim import PATSAdamax

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA GPU; this machine has none")

REPLAYS = 5
SHAPES = [(300, 70), (1000,), (4, 5), (33000,)]  # 33000: two pass-1 chunks


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((0.05 * torch.randn(s, generator=gen)).cuda()) for s in SHAPES]


def _grads(steps):
    gen = torch.Generator().manual_seed(1)
    return [[(1e-2 * torch.randn(s, generator=gen)).cuda() for s in SHAPES] for _ in range(steps)]


def _optimizer(params, capturable):
    groups = [{"params": params[:2]}, {"params": params[2:3], "noise": False},
              {"params": params[3:], "weight_decay": 0.1}]
    return PATSAdamax(groups, lr=1e-3, noise_lambda=1e-4, noise_prob=0.5, seed=42, capturable=capturable)


def _eager(capturable, grads):
    params = _params()
    opt = _optimizer(params, capturable)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    torch.cuda.synchronize()
    return params, opt


def _captured(grads):
    """One warm-up step on a side stream (torch.cuda.graph's recipe), the step captured, then replays with new
    gradients copied into the static ones."""
    params = _params()
    opt = _optimizer(params, capturable=True)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in grads[1:]:
        for p, g in zip(params, step):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    return params, opt


def test_replays_of_a_captured_step_equal_eager_steps():
    grads = _grads(1 + REPLAYS)
    captured, opt = _captured(grads)
    same_kernels, _ = _eager(True, grads)      # the capturable path, eagerly: the same kernels and numbers
    host_numbers, _ = _eager(False, grads)     # the default path: bias correction and key from the host
    for a, b, c in zip(captured, same_kernels, host_numbers):
        assert torch.equal(a, b), (a - b).abs().max()
        assert torch.allclose(a, c, rtol=0, atol=1e-6), (a - c).abs().max()
    assert all(float(state["step"]) == 1 + REPLAYS for state in opt.state.values())
    # every replay drew new noise: the noise-free run ends elsewhere
    quiet = _params()
    quiet_opt = PATSAdamax(quiet, lr=1e-3, noise_lambda=0.0, seed=42)
    for step in grads:
        for p, g in zip(quiet, step):
            p.grad = g.clone()
        quiet_opt.step()
    assert (captured[0] - quiet[0]).abs().max() > 1e-4


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8)).cuda()


def _batches(n):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(32, 64, generator=gen).cuda(), torch.randn(32, 8, generator=gen).cuda()) for _ in range(n)]


def test_a_captured_training_step_with_gradients_from_the_graph_pool():
    """torch's whole-network recipe: warm-up steps on a side stream, gradients set to None, then forward,
    backward and step captured together, so the gradients (and the step's table of addresses) are allocated
    inside the capture; replays with new data copied into the static batch equal eager training."""
    warm_up = 3
    batches = _batches(warm_up + REPLAYS)
    model = _mlp()
    opt = PATSAdamax(model.parameters(), lr=1e-3, noise_lambda=1e-4, noise_prob=0.5, seed=9, capturable=True)
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:warm_up]:
            static_x.copy_(x)
            static_y.copy_(y)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(static_x), static_y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(model(static_x), static_y).backward()
        opt.step()
    for x, y in batches[warm_up:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()

    eager = _mlp()
    eager_opt = PATSAdamax(eager.parameters(), lr=1e-3, noise_lambda=1e-4, noise_prob=0.5, seed=9)
    for x, y in batches:
        eager_opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(eager(x), y).backward()
        eager_opt.step()
    for a, b in zip(model.parameters(), eager.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    assert all(float(state["step"]) == warm_up + REPLAYS for state in opt.state.values())


def test_capturing_a_step_without_capturable_is_refused():
    params = _params()
    opt = _optimizer(params, capturable=False)
    for p, g in zip(params, _grads(1)[0]):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"):
        with torch.cuda.graph(graph):
            opt.step()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
