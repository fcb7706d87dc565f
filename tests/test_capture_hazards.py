"""What a CUDA graph capture needs of the host code, decided on CPU by forcing a capture (issue 18, "Likely or
possible, to settle"): memory a captured graph reads on every replay stays alive, and what cannot be captured
raises a clear error before anything changes."""
import gc
import weakref

import pytest
import torch

from fusednoise import lnsr
from fusednoise.kernels import host_tables
from fusednoise.kernels import pats as pats_kernels


def test_replay_rng_refuses_a_capture_before_touching_the_generators(monkeypatch):
    # torch.cuda.get_rng_state / set_rng_state inside a capture: the graph would not replay the clean pass's
    # dropout. The refusal comes first, so nothing has read or set a generator.
    monkeypatch.setattr(lnsr, "_is_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: pytest.fail("read the CUDA generator"))
    with pytest.raises(RuntimeError, match=r"replay_rng=True\) cannot run inside a CUDA graph capture"):
        lnsr._RngState(torch.device("cuda", 0))
    lnsr._RngState(torch.device("cpu"))  # CPU state: no capture involved


class _FakePinned:
    """Stands in for the pinned copy of a host table (the CPU build cannot pin)."""

    def __init__(self, table):
        self.table = table

    def to(self, device, non_blocking=False):
        return self.table.clone()


def _host_table_held(monkeypatch, capturing):
    monkeypatch.setattr(host_tables, "capturing", lambda device: capturing)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: _FakePinned(self))
    monkeypatch.setattr(host_tables, "_held_for_graphs", [])
    host_tables.to_device(torch.arange(4), torch.device("cuda", 1))
    return host_tables._held_for_graphs


def test_a_host_table_copied_in_a_capture_outlives_the_call(monkeypatch):
    # the diff norm's address tables and LNSR's per-call weights: a captured copy reads the host buffer on replay
    held = _host_table_held(monkeypatch, capturing=True)
    assert len(held) == 1 and torch.equal(held[0].table, torch.arange(4))


def test_an_eager_host_table_is_not_held(monkeypatch):
    assert _host_table_held(monkeypatch, capturing=False) == []


def _table(value):
    return torch.full((2, pats_kernels.META_FIELDS), value, dtype=torch.int64)


def test_pats_device_table_a_capture_used_is_kept_when_replaced(monkeypatch):
    tables = pats_kernels._CapturableTables()
    slot = ("cpu", torch.float32)
    device = torch.device("cpu")
    used = weakref.ref(tables.upload(_table(1), device, slot))    # the eager warm-up's table
    monkeypatch.setattr(pats_kernels, "capturing", lambda device: True)
    assert tables.upload(_table(1), device, slot) is used()       # the capture reuses it
    monkeypatch.setattr(pats_kernels, "capturing", lambda device: False)
    tables.upload(_table(2), device, slot)                        # a later eager step replaces it
    gc.collect()
    assert used() is not None and torch.equal(used(), _table(1))
    eager_only = weakref.ref(tables.upload(_table(3), device, slot))
    tables.upload(_table(4), device, slot)
    gc.collect()
    assert eager_only() is None                                   # a table no capture used is freed


def test_pats_chunk_table_a_capture_used_survives_the_cache_eviction(monkeypatch):
    launcher = pats_kernels.PatsLauncher(max_cache=2)
    device = torch.device("cpu")
    used = weakref.ref(launcher._chunks_for(device, [10, 20], [True, False])[0])
    monkeypatch.setattr(pats_kernels, "capturing", lambda device: True)
    assert launcher._chunks_for(device, [10, 20], [True, False])[0] is used()
    monkeypatch.setattr(pats_kernels, "capturing", lambda device: False)
    not_captured = weakref.ref(launcher._chunks_for(device, [5], [True])[0])
    for n in range(30, 33):  # new layouts: the cache is cleared
        launcher._chunks_for(device, [n], [True])
    gc.collect()
    assert used() is not None and not_captured() is None


# --------------------------------------------------------------------------------------------- shared memory
# NoisyTune and PATS update every tensor of a device and dtype in one launch: two views of one storage would race
# on a GPU. De-duplicating by identity alone let them through.
def test_first_overlap_finds_views_of_one_storage():
    from fusednoise.validation import first_overlap

    w = torch.zeros(10, 10)
    assert first_overlap([torch.zeros(3), w[:2], w[5:], torch.zeros(0)]) is None
    assert first_overlap([torch.zeros(3), w, w[4:6, 2]]) == (1, 2)
    assert first_overlap([w.t(), torch.zeros(3), w[9, 9:]]) == (0, 2)  # a transposed view spans the same bytes
    assert first_overlap([w[:5], w.view(-1)[49:51]]) == (0, 1)          # one element in common


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_noisytune_refuses_overlapping_views_and_perturbs_a_repeated_view_once(backend):
    import fusednoise
    from fusednoise.noisytune import SAME_MEMORY_REASON, perturb_

    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    before = w.clone()
    with fusednoise.backend(backend):
        with pytest.raises(ValueError, match="'a' and 'b' share memory"):
            perturb_([("a", w), ("b", w[2:4])], seed=1)
        assert torch.equal(w, before)  # refused before anything changed
        report = perturb_([("a", w), ("b", w.view(8, 16))], seed=1)  # two objects, the same elements
    assert report.perturbed == ["a"] and report.skipped == {"b": SAME_MEMORY_REASON}
    alone = before.clone()
    with fusednoise.backend(backend):
        perturb_([("a", alone)], seed=1)
    assert torch.equal(w, alone)  # perturbed once, exactly as alone


def test_pats_refuses_parameters_that_share_memory():
    from fusednoise.optim import PATSAdamax

    w = torch.zeros(10, 10)
    a, b = torch.nn.Parameter(w), torch.nn.Parameter(w[2:4])
    with pytest.raises(ValueError, match=r"params\[0\] of param group 0 and params\[1\] of param group 0 overlap"):
        PATSAdamax([a, b])
    with pytest.raises(ValueError, match="an earlier group and params.0. of param group 1 overlap"):
        PATSAdamax([{"params": [a]}, {"params": [b]}])
    with pytest.raises(ValueError, match="are one tensor"):
        PATSAdamax([a, a])
    PATSAdamax([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3)), a])  # own memory: fine


# --------------------------------------------------------------------------------------------- side streams
def test_the_warm_up_tickets_scratch_counter_is_recorded_on_the_stream_that_uses_it(monkeypatch):
    """graph_offsets._prepare runs the ticket kernel once on a scratch counter allocated on a side stream
    (rng.persistent_zero) and frees it: the block must be recorded on the current stream, which uses it."""
    from fusednoise import graph_offsets, rng

    events = []

    class Scratch:
        def record_stream(self, stream):
            events.append(("record_stream", stream))

    class ClaimsCuda(torch.Tensor):
        is_cuda = True

        @property
        def device(self):
            return torch.device("cuda", 1)

        def get_device(self):
            return 1

    x = torch.zeros(2).as_subclass(ClaimsCuda)
    monkeypatch.setattr(rng, "offset_state", lambda device: None)
    monkeypatch.setattr(rng, "persistent_zero", lambda device: Scratch())
    monkeypatch.setattr(graph_offsets, "_kernels", lambda: type("K", (), {
        "take_offset": staticmethod(lambda state: events.append(("take_offset", state)))}))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"current stream of {device}")
    monkeypatch.setattr(graph_offsets, "_host_zeros", {})
    graph_offsets._prepare(x)
    assert [e[0] for e in events] == ["take_offset", "record_stream"]
    assert events[1][1] == "current stream of cuda:1"
