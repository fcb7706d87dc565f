"""CUDA graphs on a GPU (benchmarks/device_run.sh runs this file as its own step): a captured noise op draws new
noise on every replay, distinct calls in one graph draw apart, and a replay draws the words an eager call on the
offset path (``rng.graph_safe()``) draws for the same seed and offset. HyPe and LNSR on a small BERT training
step, the HyPe ops, NEFTune, LNSR's scaled noise with its backward, ``torch.compile(mode="reduce-overhead")``, and
the errors a capture must raise. The offset path itself (its rule, the kernels against the reference) is checked
on a CPU in test_graph_offsets.py."""
import pytest
import torch

import fusednoise
from fusednoise import graph_offsets, hype, ops_lnsr, rng

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA graphs capture CUDA streams: needs a CUDA GPU (test_graph_offsets.py checks the offset path on "
           "a CPU)")

SEED = 0x1357_9BDF_2468_ACE0 >> 2


def capture(step):
    """Warm ``step`` up on a side stream (the first call creates the device's offset counter and compiles and
    loads the kernels, none of which a capture can do), then capture one call into a graph. Returns the graph
    and the call's outputs (static tensors the replays overwrite)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def replay(graph, outputs):
    graph.replay()
    torch.cuda.synchronize()
    return [t.clone() for t in outputs]


def eager_offset_path(step, offset, calls=2):
    """``calls`` eager runs of ``step`` on the offset path, the counter starting at ``offset``."""
    rng.set_offset(offset)
    with rng.graph_safe():
        return [[t.clone() for t in step()] for _ in range(calls)]


def assert_all_distinct(tensors):
    for i, a in enumerate(tensors):
        for b in tensors[i + 1:]:
            assert not torch.equal(a, b)


def test_replays_of_the_hype_ops_draw_new_noise_and_equal_eager_calls_at_the_same_offsets():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 1000, device="cuda", generator=g)
    residual = torch.randn(4, 1000, device="cuda", generator=g)
    y = torch.empty(4, 1000, device="cuda", dtype=torch.bfloat16)

    def step():
        a = fusednoise.add_noise(x, 0.1, seed=SEED)
        b = fusednoise.add_noise(x, 0.1, seed=SEED)  # the same seed: only the offset tells the two calls apart
        c = fusednoise.add_residual_noise(x, residual, 0.1, "uniform", seed=SEED)
        y.copy_(x)
        fusednoise.add_noise_(y, 0.1, seed=SEED, rounding="stochastic")
        return a, b, c, y

    graph, outputs = capture(step)
    rng.set_offset(1000)
    first = replay(graph, outputs)
    second = replay(graph, outputs)
    assert rng.get_offset() == 1008  # one ticket per call per replay
    assert_all_distinct(first[:2] + second[:2])
    for a, b in zip(first, second):
        assert not torch.equal(a, b)
    eager = eager_offset_path(step, 1000)
    for replayed, expected in zip(first + second, eager[0] + eager[1]):
        assert torch.equal(replayed, expected)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertModel(config).cuda().train()


def test_a_captured_hype_training_step_adds_new_noise_on_every_replay():
    model = _tiny_bert()
    handle = hype.apply(model, sigma=1e-2)
    ids = torch.randint(0, 128, (4, 16), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    watched = [model.embeddings.word_embeddings.weight, model.encoder.layer[0].attention.self.query.weight]

    def step():
        model.zero_grad(set_to_none=True)  # the backward allocates the gradients (in the graph's pool)
        torch.random.default_generator.manual_seed(5)  # the CPU generator HyPe's seeds come from
        loss = model(input_ids=ids).last_hidden_state.float().pow(2).mean()
        loss.backward()
        return [loss.detach()] + [p.grad for p in watched]

    try:
        graph, outputs = capture(step)
        rng.set_offset(77)
        first = replay(graph, outputs)
        second = replay(graph, outputs)
        assert rng.get_offset() == 77 + 2 * 2  # two HyPe layers: one ticket each per replay
        rng.set_offset(77)
        with rng.graph_safe():
            eager = [t.clone() for t in step()]
        model.eval()  # HyPe adds noise only in training mode; dropout is 0 anyway
        with torch.no_grad():
            clean_loss = model(input_ids=ids).last_hidden_state.float().pow(2).mean()
    finally:
        handle.remove()
    # The replay equals the eager step at the same seeds and offsets (to the last bits atomics may reorder), and
    # the two replays differ by far more: the noise changed.
    for replayed, expected in zip(first, eager):
        torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[0], clean_loss)
    for a, b in zip(first[1:], second[1:]):
        assert not torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_captured_lnsr_training_step_adds_new_noise_on_every_replay():
    # Issue 18: a whole LNSR step (clean and noisy passes, the layer-wise diff norm forward and backward, the
    # scaled noise's backward) in one graph, as HyPe's above: each replay draws new noise, and equals the eager
    # step on the offset path at the same seeds and offset.
    from fusednoise import lnsr

    model = _tiny_bert()
    reg = lnsr.LNSR(model, scale=0.05)
    ids = torch.randint(0, 128, (4, 16), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    watched = [model.embeddings.word_embeddings.weight, model.encoder.layer[1].output.dense.weight]

    def step():
        model.zero_grad(set_to_none=True)
        torch.random.default_generator.manual_seed(6)  # the CPU generator LNSR's seeds come from
        outputs, penalty = reg(input_ids=ids)
        loss = outputs.last_hidden_state.float().pow(2).mean() + penalty
        loss.backward()
        return [loss.detach(), penalty.detach()] + [p.grad for p in watched]

    graph, outputs = capture(step)
    rng.set_offset(91)
    first = replay(graph, outputs)
    second = replay(graph, outputs)
    per_replay = (rng.get_offset() - 91) // 2
    assert per_replay >= 1  # the noise takes tickets inside the graph
    rng.set_offset(91)
    with rng.graph_safe():
        eager = [t.clone() for t in step()]
    for replayed, expected in zip(first, eager):
        torch.testing.assert_close(replayed, expected, rtol=1e-5, atol=1e-7)
    assert float(first[1]) > 0 and not torch.equal(first[1], second[1])  # a new penalty: new noise
    for a, b in zip(first[2:], second[2:]):
        assert not torch.equal(a, b)


def test_replays_of_neftune_draw_new_noise_and_leave_padding_alone():
    embeddings = torch.randn(2, 8, 64, device="cuda")
    mask = torch.ones(2, 8, dtype=torch.int64, device="cuda")
    mask[0, 5:] = 0

    def step():
        return (fusednoise.add_neftune_noise(embeddings, 5.0, mask, seed=SEED),)

    graph, outputs = capture(step)
    rng.set_offset(2**32 + 5)  # an offset past 32 bits: its high word goes to c3
    first, second = replay(graph, outputs)[0], replay(graph, outputs)[0]
    assert not torch.equal(first, second)
    assert torch.equal(first[0, 5:], embeddings[0, 5:]) and torch.equal(second[0, 5:], embeddings[0, 5:])
    eager = eager_offset_path(step, 2**32 + 5)
    assert torch.equal(first, eager[0][0]) and torch.equal(second, eager[1][0])


def test_a_captured_lnsr_scaled_noise_backward_redraws_its_replays_noise():
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(4, 8, 64, device="cuda", generator=g).requires_grad_()
    upstream = torch.randn(4, 8, 64, device="cuda", generator=g)

    def step():
        x.grad = None
        out = ops_lnsr.scaled_noise(x, 0.05, seed=SEED)
        out.backward(upstream)
        return out.detach(), x.grad

    graph, outputs = capture(step)
    rng.set_offset(500)
    first = replay(graph, outputs)
    second = replay(graph, outputs)
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    eager = eager_offset_path(step, 500)
    for replayed, expected in zip(first + second, eager[0] + eager[1]):
        torch.testing.assert_close(replayed, expected, rtol=1e-6, atol=1e-7)


def test_reduce_overhead_compile_draws_new_noise_on_every_call(monkeypatch):
    """The device's counter and 0 offset are first created inside the compiled function's warm-up, which
    allocates from the graphs' private pool: they must live outside it (rng.persistent_zero) and survive."""
    monkeypatch.setattr(rng, "_offset_states", {})
    monkeypatch.setattr(graph_offsets, "_host_zeros", {})
    x = torch.randn(8, 256, device="cuda")
    compiled = torch.compile(lambda t: fusednoise.add_noise(t, 0.1) * 2.0, mode="reduce-overhead")
    outs = [compiled(x).clone() for _ in range(6)]  # warm-up, recording, then replays of the recorded graph
    torch.cuda.synchronize()
    assert_all_distinct(outs)
    runs = rng.get_offset()
    assert runs >= 3  # one ticket per run of the recorded graph
    outs.append(compiled(x).clone())
    assert rng.get_offset() == runs + 1
    assert_all_distinct(outs)


def test_the_reference_backend_refuses_to_be_captured():
    x = torch.randn(64, device="cuda")
    fusednoise.add_noise(x, 0.1)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="reference backend cannot run inside a CUDA graph capture"):
        with fusednoise.backend("reference"), torch.cuda.graph(graph):
            fusednoise.add_noise(x, 0.1)


def test_a_capture_without_a_warm_up_raises_a_clear_error(monkeypatch):
    x = torch.randn(64, device="cuda")
    monkeypatch.setattr(rng, "_offset_states", {})  # as if no noise op had run on this device yet
    monkeypatch.setattr(graph_offsets, "_host_zeros", {})
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="no RNG offset counter exists yet"):
        with torch.cuda.graph(graph):
            fusednoise.add_noise(x, 0.1)
