"""benchmarks/ttgir_coalescing.py on small hand-written TTGIR (no compiler needed): the lane stride and sector
efficiency of a load/store follow from its blocked layout and pointer arithmetic, worked out here by hand.
tests/test_kernels_compile.py checks the same on two compiled probe kernels."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ttgir_coalescing  # noqa: E402


SLICES = {"#S1": "#ttg.slice<{dim = 1, parent = #blocked}>", "#S0": "#ttg.slice<{dim = 0, parent = #blocked}>"}


def _module(layout: str, body: str) -> str:
    for short, slice_layout in SLICES.items():  # spelled out as Triton prints them
        body = body.replace(short, slice_layout)
    return (f"#blocked = #ttg.blocked<{{{layout}}}>\n"
            'module attributes {"ttg.num-warps" = 4 : i32} {\n'
            "  tt.func public @k(%out_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32}, %D: i32, "
            "%idx_ptr: !tt.ptr<i32>) {\n"
            f"{body}"
            "    tt.return\n  }\n}\n")


ONE_D = "sizePerThread = [{spt}], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]"
STRIDED_STORE = """\
    %cst = arith.constant dense<{stride}> : tensor<{n}xi32, #blocked>
    %r = tt.make_range {{end = {n} : i32, start = 0 : i32}} : tensor<{n}xi32, #blocked>
    %o = arith.muli %r, %cst : tensor<{n}xi32, #blocked>
    %p = tt.splat %out_ptr : !tt.ptr<f32> -> tensor<{n}x!tt.ptr<f32>, #blocked>
    %q = tt.addptr %p, %o : tensor<{n}x!tt.ptr<f32>, #blocked>, tensor<{n}xi32, #blocked>
    tt.store %q, %v : tensor<{n}x!tt.ptr<f32>, #blocked>
"""


def _one(text: str):
    (access,) = ttgir_coalescing.accesses(text)
    return access


@pytest.mark.parametrize("spt, stride, lane_stride, efficiency", [
    (1, 4, 16, 4 / 16),  # element 4i per lane: 4 bytes of every 16 written
    (1, 2, 8, 4 / 8),
    (1, 1, 4, 1.0),      # element i per lane: a warp writes 128 contiguous bytes
    (4, 1, 16, 1.0),     # four consecutive elements per lane: 512 contiguous bytes
])
def test_a_one_dimensional_store(spt, stride, lane_stride, efficiency):
    access = _one(_module(ONE_D.format(spt=spt), STRIDED_STORE.format(stride=stride, n=512)))
    assert access.op == "store" and access.shape == (512,) and access.element_bytes == 4
    assert access.lane_stride_bytes == lane_stride
    assert access.sector_efficiency == pytest.approx(efficiency)
    assert access.uncoalesced == (efficiency < 1)


ROWS = """\
    %rows = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32, #S1>
    %cols = tt.make_range {end = 16 : i32, start = 0 : i32} : tensor<16xi32, #S0>
    %r2 = tt.expand_dims %rows {axis = 1 : i32} : tensor<64xi32, #S1> -> tensor<64x1xi32, #blocked>
    %d = tt.splat %D : i32 -> tensor<64x1xi32, #blocked>
    %ro = arith.muli %r2, %d : tensor<64x1xi32, #blocked>
    %c2 = tt.expand_dims %cols {axis = 0 : i32} : tensor<16xi32, #S0> -> tensor<1x16xi32, #blocked>
    %rb = tt.broadcast %ro : tensor<64x1xi32, #blocked> -> tensor<64x16xi32, #blocked>
    %cb = tt.broadcast %c2 : tensor<1x16xi32, #blocked> -> tensor<64x16xi32, #blocked>
    %o = arith.addi %rb, %cb : tensor<64x16xi32, #blocked>
    %p = tt.splat %out_ptr : !tt.ptr<f32> -> tensor<64x16x!tt.ptr<f32>, #blocked>
    %q = tt.addptr %p, %o : tensor<64x16x!tt.ptr<f32>, #blocked>, tensor<64x16xi32, #blocked>
    %x = tt.load %q : tensor<64x16x!tt.ptr<f32>, #blocked>
"""


def test_rows_of_a_runtime_stride_are_coalesced_when_each_row_segment_fills_sectors():
    # 4 lanes x 4 elements x 4 bytes = 64 contiguous bytes per row, 8 rows a runtime stride apart: 16 sectors
    layout = "sizePerThread = [1, 4], threadsPerWarp = [8, 4], warpsPerCTA = [4, 1], order = [1, 0]"
    access = _one(_module(layout, ROWS))
    assert access.op == "load" and access.shape == (64, 16)
    assert access.lane_stride_bytes == 16 and access.sector_efficiency == 1.0


def test_one_element_per_row_and_lane_is_uncoalesced():
    # each lane reads 4 bytes of its own row: 32 sectors touched for 128 bytes, which fit in 4
    layout = "sizePerThread = [1, 1], threadsPerWarp = [32, 1], warpsPerCTA = [4, 1], order = [1, 0]"
    access = _one(_module(layout, ROWS))
    assert access.lane_stride_bytes == ttgir_coalescing.RUNTIME_STRIDE * 4
    assert access.sector_efficiency == pytest.approx(4 / 32) and access.uncoalesced


def test_a_broadcast_value_is_not_uncoalesced():
    # every lane of a row reads the same per-row weight (a slice layout): one sector for 4 bytes
    layout = "sizePerThread = [1, 4], threadsPerWarp = [1, 32], warpsPerCTA = [4, 1], order = [1, 0]"
    body = """\
    %rows = tt.make_range {end = 4 : i32, start = 0 : i32} : tensor<4xi32, #S1>
    %p = tt.splat %out_ptr : !tt.ptr<f32> -> tensor<4x!tt.ptr<f32>, #S1>
    %q = tt.addptr %p, %rows : tensor<4x!tt.ptr<f32>, #S1>, tensor<4xi32, #S1>
    %w = tt.load %q : tensor<4x!tt.ptr<f32>, #S1>
"""
    access = _one(_module(layout, body))
    assert access.lane_stride_bytes == 0 and access.sector_efficiency == 1.0 and not access.uncoalesced


def test_a_gather_is_undetermined_not_uncoalesced():
    body = """\
    %r = tt.make_range {end = 128 : i32, start = 0 : i32} : tensor<128xi32, #blocked>
    %ip = tt.splat %idx_ptr : !tt.ptr<i32> -> tensor<128x!tt.ptr<i32>, #blocked>
    %iq = tt.addptr %ip, %r : tensor<128x!tt.ptr<i32>, #blocked>, tensor<128xi32, #blocked>
    %i = tt.load %iq : tensor<128x!tt.ptr<i32>, #blocked>
    %p = tt.splat %out_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>, #blocked>
    %q = tt.addptr %p, %i : tensor<128x!tt.ptr<f32>, #blocked>, tensor<128xi32, #blocked>
    %x = tt.load %q : tensor<128x!tt.ptr<f32>, #blocked>
"""
    index_load, gather = ttgir_coalescing.accesses(_module(ONE_D.format(spt=1), body))
    assert index_load.sector_efficiency == 1.0
    assert gather.undetermined == "addresses from loaded data" and not gather.uncoalesced


def test_a_name_reused_in_a_sibling_loop_reads_its_own_definition():
    # MLIR names values per region: both loops define %o; the second loop's store reads the second %o
    body = """\
    %cst = arith.constant dense<4> : tensor<128xi32, #blocked>
    %r = tt.make_range {end = 128 : i32, start = 0 : i32} : tensor<128xi32, #blocked>
    %p = tt.splat %out_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>, #blocked>
    scf.for %i = %c0 to %D step %c1  : i32 {
      %o = arith.muli %r, %cst : tensor<128xi32, #blocked>
      %q = tt.addptr %p, %o : tensor<128x!tt.ptr<f32>, #blocked>, tensor<128xi32, #blocked>
      tt.store %q, %v : tensor<128x!tt.ptr<f32>, #blocked>
    }
    scf.for %i = %c0 to %D step %c1  : i32 {
      %o = arith.addi %r, %cst : tensor<128xi32, #blocked>
      %q = tt.addptr %p, %o : tensor<128x!tt.ptr<f32>, #blocked>, tensor<128xi32, #blocked>
      tt.store %q, %v : tensor<128x!tt.ptr<f32>, #blocked>
    }
"""
    strided, contiguous = ttgir_coalescing.accesses(_module(ONE_D.format(spt=1), body))
    assert strided.lane_stride_bytes == 16 and strided.uncoalesced
    assert contiguous.lane_stride_bytes == 4 and contiguous.sector_efficiency == 1.0


def test_a_slice_layout_maps_lanes_through_its_parent():
    # a per-row vector in the slice of a layout with a row per lane: lanes hold consecutive rows, 4 bytes apart
    layout = "sizePerThread = [1, 1], threadsPerWarp = [32, 1], warpsPerCTA = [4, 1], order = [0, 1]"
    body = """\
    %rows = tt.make_range {end = 128 : i32, start = 0 : i32} : tensor<128xi32, #S1>
    %p = tt.splat %out_ptr : !tt.ptr<f32> -> tensor<128x!tt.ptr<f32>, #S1>
    %q = tt.addptr %p, %rows : tensor<128x!tt.ptr<f32>, #S1>, tensor<128xi32, #S1>
    %w = tt.load %q : tensor<128x!tt.ptr<f32>, #S1>
"""
    access = _one(_module(layout, body))
    assert access.lane_stride_bytes == 4 and access.sector_efficiency == 1.0
