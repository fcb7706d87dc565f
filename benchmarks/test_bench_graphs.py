"""What the device-side offset costs inside a CUDA graph: one ticket kernel per noise op call per replay.

    pytest benchmarks/test_bench_graphs.py --benchmark-json benchmarks/results/graphs-<device>.json

Three graphs of ``CALLS`` HyPe noise calls on a BERT-base activation (8 x 128 tokens x 768, bfloat16), each replayed
and timed as a whole:

* ``ops``: ``fusednoise.add_noise`` captured as users capture it: each call takes its ticket (a one-program
  kernel, a graph node) and the noise kernel reads it;
* ``kernels-only``: the same noise kernels launched directly with a constant offset, no ticket: what the graph
  would cost if the offset were free;
* ``tickets-only``: the tickets alone.

``extra_info["per_call_us"]`` is the median replay time over ``CALLS``; ``ops`` minus ``kernels-only`` is the
per-call price of the offset. GPU only (a CPU cannot capture a graph).
"""
import pytest
import torch

import fusednoise
from benchutil import needs_cuda

CALLS = 24  # one per layer of a 24-layer model's forward
SHAPE = (8, 128, 768)


def _graph_of(step):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: creates the offset counter, compiles and loads the kernels
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _steps(x):
    from fusednoise import rng
    from fusednoise.kernels import noise, offsets

    out = torch.empty_like(x)
    zero = torch.zeros(1, dtype=torch.int64, device=x.device)
    state = rng.offset_state(x.device)

    def ops():
        for _ in range(CALLS):
            fusednoise.add_noise(x, 1e-5, seed=1234)

    def kernels_only():
        for _ in range(CALLS):
            noise.launch_noise(x, None, out, 1e-5, "normal", 1234, False, 0, zero)

    def tickets_only():
        for _ in range(CALLS):
            offsets.take_offset(state)

    return {"ops": ops, "kernels-only": kernels_only, "tickets-only": tickets_only}


@needs_cuda
@pytest.mark.parametrize("case", ["ops", "kernels-only", "tickets-only"])
def test_graph_replay_per_noise_call(benchmark, case):
    benchmark.group = f"cuda-graph {CALLS} HyPe calls {SHAPE} bf16"
    x = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
    with fusednoise.backend("triton"):
        graph = _graph_of(_steps(x)[case])

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=30, iterations=10, warmup_rounds=3)
    benchmark.extra_info.update(case=case, calls=CALLS, shape=list(SHAPE), dtype="bf16")
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["per_call_us"] = round(stats.stats.median / CALLS * 1e6, 3)
