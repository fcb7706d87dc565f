"""Every kernel launch runs on its tensors' GPU (issue 18, item 1).

Triton launches on the current CUDA device and its current stream, whatever device the pointers belong to; a
model on ``cuda:1`` would get an illegal memory access (or, with peer access, silently wrong results). The CPU
tests record which device each launch is made under, with tensors that claim to live on ``cuda:1``; the GPU test
runs the ops on the second GPU of a two-GPU machine while the first is current.
"""
import contextlib

import pytest
import torch

from devices import HAS_CUDA
from fusednoise.kernels import launch as launch_module
from fusednoise.kernels.launch import Launch, launch_device


class _ClaimsCuda1(torch.Tensor):
    """A CPU tensor whose ``device`` says ``cuda:1`` (the launch code reads nothing else of it)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def _on_cuda1(*shape):
    return torch.zeros(*shape).as_subclass(_ClaimsCuda1)


class _RecordingKernel:
    """Stands in for a @triton.jit function: records the device current at each launch."""

    def __init__(self, current):
        self.current, self.launched_under = current, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched_under.append(self.current[-1])


def _recording_guard(monkeypatch):
    current = [None]

    @contextlib.contextmanager
    def guard(device):
        current.append(torch.device(device))
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(launch_module, "_cuda_device", guard)
    return current


def test_launch_device_is_the_first_tensor_arguments():
    assert launch_device((3, _on_cuda1(2), torch.zeros(1))) == torch.device("cuda", 1)
    assert launch_device((torch.zeros(1), _on_cuda1(2))) is None  # a CPU launch: no CUDA guard
    assert launch_device((1, 2.0)) is None


def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    current = _recording_guard(monkeypatch)
    kernel = _RecordingKernel(current)
    Launch(kernel, (1,), (_on_cuda1(4), 7), {"BLOCK": 16}).run()
    Launch(kernel, (1,), (torch.zeros(4),)).run()
    assert kernel.launched_under == [torch.device("cuda", 1), None]
    assert current == [None]  # the guard is left after the launch


def test_the_ticket_launch_runs_under_the_counters_device(monkeypatch):
    # the ticket of an offset-path call (CUDA graphs) goes through Launch.run too
    from fusednoise.kernels import offsets

    current = _recording_guard(monkeypatch)
    kernel = _RecordingKernel(current)
    launch = offsets.take_offset_launch(_on_cuda1(1), _on_cuda1(1))
    Launch(kernel, launch.grid, launch.args, launch.constexprs, launch.num_warps).run()
    assert kernel.launched_under == [torch.device("cuda", 1)]


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                    reason="needs two GPUs: the ops run on cuda:1 while cuda:0 is the current device")
def test_ops_and_pats_on_the_second_gpu_while_the_first_is_current():
    # the same kernels on the same GPU model: a launch on cuda:1 made while cuda:0 is current must give the bits
    # of the one made while cuda:1 is current (without the guard: an illegal address, or cuda:0 reading cuda:1)
    import fusednoise
    from fusednoise.optim.pats import PATSAdamax

    x = torch.randn(4096, device="cuda:1")
    with torch.cuda.device(0):
        away = fusednoise.add_noise(x, 0.3, seed=5)
    with torch.cuda.device(1):
        home = fusednoise.add_noise(x, 0.3, seed=5)
    assert torch.equal(away, home)

    def run(devices):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300, 70, generator=gen).to(d)) for d in devices]
        opt = PATSAdamax([{"params": [p]} for p in params], lr=1e-2, noise_lambda=1e-2, seed=3)
        with torch.cuda.device(0):
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.device)
                opt.step()
        return [p.detach().cpu() for p in params]

    for two_gpus, one_gpu in zip(run(["cuda:0", "cuda:1"]), run(["cuda:0", "cuda:0"])):
        assert torch.equal(two_gpus, one_gpu)
