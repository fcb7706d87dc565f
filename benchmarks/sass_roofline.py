"""A static roofline model of every fusednoise kernel on an H100, H200 or H20 (sm_90), from its SASS, without a GPU.

    python benchmarks/sass_roofline.py                      # table on stdout, benchmarks/results/static-sm90.md
    python benchmarks/sass_roofline.py --device h200 --json model.json    # one JSON record per case
    python benchmarks/sass_roofline.py --only 'hype.*bf16' --path    # a subset, with each hot path's blocks

Run it in a process without ``TRITON_INTERPRET``.

Each case of ``fusednoise/kernels/specialisations.py`` (the launches the launchers build for large inputs,
compiled with the JIT's argument specialisation by ``fusednoise.kernels.compile_check``) is compiled for sm_90
with the ptxas Triton ships, disassembled with its nvdisasm, and the instructions one thread issues per element
on the hot path are counted.

The model (constants in ``DEVICES``; the counts are the same on every sm_90 part). Issue: SMs x 4 schedulers x 1
warp-instruction per clock (an H100 SXM: 132 SMs at 1.98 GHz = 33.45e12 thread-instructions/s), IMAD.WIDE and
IMAD.HI counting two issue slots. MUFU (lg2, ex2, sin, cos, rsq, rcp, sqrt): 16 per clock per SM (4.2e12/s).
Memory: a measured copy (H100 3.0e12 B/s, H200 4.3e12, H20 3.29e12). The raw predicted fraction of the memory
roofline is memory time / max(memory, issue, MUFU time) for the DRAM bytes the kernel must move per element; the
issue budget per element is 11.15 x those bytes on an H100 (7.78 on an H200). The calibrated fraction divides the
issue and MUFU times by an efficiency e (0.85 by default, ``--efficiency``): the sustained issue rate FlagGems'
philox kernels reached on an H20 was 0.85-0.99 of this model's, so a kernel near its issue budget runs below the
larger of the two times. Targets hold on the calibrated fraction. Every tensor load/store is also checked for
coalescing from the TTGIR's layouts (``ttgir_coalescing.py``): a targeted kernel with an uncoalesced access fails.

It is a model, not a measurement; a GPU timing outranks it. Left out: pipe limits (reported, not binding: ALU and
FMA pipes at 64 lanes per SM, conversions on the MUFU pipe), latency and occupancy beyond the resident-warp count
(a kernel with few warps per SM may not hide DRAM latency), barriers, caches (every byte is a DRAM byte; gathers
that hit L2 are charged in full), tails (the last partial program of a tensor), launch overhead, and whether
narrow (16-bit) accesses reach the copy bandwidth at all (reported as the narrowest element access on the path).

The hot path (what one thread executes per element in steady state), from the control-flow graph:
* element accesses are the global loads/stores whose address depends on the thread index (a taint from
  ``S2R SR_TID``); loads of one address by every thread (pointer tables, hyperparameters) are not;
* the path is the cheapest route (by issue slots) from the kernel's entry to its exit whose element accesses move
  the bytes the case declares for the thread's elements: predicated EXITs are not taken (in-bounds threads), and
  conditional code the bytes do not need (libdevice slow paths, a tensor's partial last block, the noise branch
  of a PATS tensor without noise) is off the path;
* a small per-program loop with element accesses (over partial sums) runs once; a CALL costs its callee;
* loop kernels: one trip of the outermost loop holding element accesses, per element of one trip (several
  iterations when ptxas unrolled the loop), plus the cheapest rest of the program amortised over the case's trip
  count.
The element bytes on the path must equal the bytes per element the case declares (more: the path carries
accesses the case does not count), and the narrowest of them is reported. A row padded to a power-of-two tile
carries its masked lanes' accesses (``Case.lane_padding`` scales the declared bytes for this check); bytes moved
once per row or per program (a norm's row statistics, a backward's partial dW rows) are the case's
``amortised_bytes_per_element``, added to the memory time (and the B/elem column), not to the path.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Triton 3.9 warns that its default (FP fusion on, as in the 3.6 a GPU machine runs) will change: keep it.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import sass_cfg  # noqa: E402
import ttgir_coalescing  # noqa: E402
from sass_cfg import Block, Ins  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MD = os.path.join(REPO, "benchmarks", "results", "static-sm90.md")
ARCH = 90

@dataclass(frozen=True)
class Device:
    """One GPU's constants: the SASS counts are the same on every sm_90 part, the rates are not."""

    name: str
    label: str
    sms: int
    clock: float       # Hz, the boost clock
    mem_bw: float      # bytes/s, a measured device-to-device copy
    source: str        # where mem_bw comes from

    @property
    def issue_rate(self) -> float:  # thread-instructions/s: 4 schedulers x 1 warp-instruction per clock per SM
        return self.sms * 4 * 32 * self.clock

    @property
    def mufu_rate(self) -> float:   # 16 per clock per SM
        return self.sms * 16 * self.clock

    @property
    def alu_rate(self) -> float:    # integer/logic/compare pipe; also the IMAD family's heavy FMA pipe
        return self.sms * 64 * self.clock

    @property
    def fp32_rate(self) -> float:   # FFMA/FMUL/FADD on the heavy and lite FMA pipes
        return self.sms * 128 * self.clock

    def summary(self) -> str:
        return (f"{self.label}: {self.sms} SMs at {self.clock / 1e9:.2f} GHz = {self.issue_rate / 1e12:.2f}e12 "
                f"thread-instructions/s, {self.mufu_rate / 1e12:.2f}e12 MUFU/s, {self.mem_bw / 1e12:.2f}e12 B/s "
                f"({self.source}); issue budget {self.issue_rate / self.mem_bw:.2f} slots per byte")


DEVICES = {
    "h100": Device("h100", "H100 SXM", 132, 1.98e9, 3.0e12, "a measured copy"),
    "h200": Device("h200", "H200", 132, 1.98e9, 4.3e12, "the copy measured on the H200 of the device runs"),
    "h20": Device("h20", "H20", 78, 1.98e9, 3.29e12, "FlagGems' measured device-to-device copy"),
}
DEFAULT_DEVICE = "h100"
TABLE_DEVICES = ("h100", "h200")  # the Markdown table's columns
# The sustained issue rate as a fraction of the model's: FlagGems' philox kernels on an H20 ran at 0.85-0.99 of
# the issue-bound time this model predicts (README, "the model's agreement with measured timings"); the low end
# until a GPU of ours measures it (benchmarks/device_table.py reports it per kernel).
EFFICIENCY = 0.85
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, SHARED_PER_SM = 65536, 64, 32, 228 * 1024

_WIDE = re.compile(r"^IMAD\.(WIDE|HI)")
_CLASSES = {
    "mem": ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDC", "ULDC", "LDGSTS", "RED", "ATOMG", "REDG", "LD", "ST"),
    "mufu": ("MUFU",),
    "cvt": ("F2I", "I2F", "F2F", "FRND", "I2I"),  # on the MUFU pipe; I2FP/F2FP run on the ALU pipe
    "imad": ("IMAD", "VIADD", "IMUL"),
    "fp32": ("FFMA", "FMUL", "FADD", "FMUL2", "FFMA2", "FADD2", "HFMA2", "HADD2", "HMUL2", "FMNMX"),
    "fp64": ("DMUL", "DFMA", "DADD"),
    "ctrl": ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "WARPSYNC", "BAR", "NOP", "YIELD", "BMOV"),
    "shfl": ("SHFL",),
}


def classify(ins: Ins) -> str:
    if _WIDE.match(ins.op):
        return "imad_wide"
    for name, bases in _CLASSES.items():
        if ins.base in bases:
            return name
    if ins.base.startswith("U") or ins.base in ("S2UR", "R2UR", "VOTEU"):
        return "uniform"
    return "alu"


def issue_slots(ins: Ins) -> float:
    return 2.0 if _WIDE.match(ins.op) else 1.0


def global_bytes(ins: Ins) -> int:
    """Bytes one thread moves with a global load/store (0 for anything else, and for the constant-cache loads of
    libdevice's tables)."""
    if ins.base not in ("LDG", "STG") or "CONSTANT" in ins.op:
        return 0
    for width, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if f".{width}" in ins.op:
            return size
    return 4


# ------------------------------------------------------------------------------------------------ hot path
class HotPath:
    """The per-element hot path of one compiled case (see the module docstring for the rules)."""

    def __init__(self, sass: str, bytes_per_thread: float, loop: bool, force_small_loops: bool = True):
        self.blocks: List[Block] = sass_cfg.blocks_of(sass_cfg.parse(sass))
        self.labels = sass_cfg.label_index(self.blocks)
        self.live = sass_cfg.reachable(self.blocks)
        self.element_accesses = sass_cfg.thread_indexed_accesses(self.blocks)
        self._callee: Dict[str, Counter] = {}
        self._force_small_loops = force_small_loops
        loops = self._natural_loops()
        in_loops = {b for _, _, body in loops for b in body}
        exits = {b.idx for b in self.blocks if b.idx in self.live and b.ins[-1].base == "EXIT"
                 and b.ins[-1].pred is None}
        need = int(math.ceil(bytes_per_thread - 1e-6))
        if loop:
            # the bulk loop: the outermost loop holding element accesses; every other loop is small
            candidates = [(h, u, body) for h, u, body in loops if any(self._element_bytes(b) for b in body)]
            if not candidates:
                raise RuntimeError("a loop kernel without a loop around its element accesses")
            header, latch, body = max(candidates, key=lambda t: len(t[2]))
            self.small_loop_blocks = in_loops - body
            self._loops = [(h, u, b) for h, u, b in loops if not b & body]
            start = self.blocks[header].start
            self.path = self._search(header, {latch}, need, within=body)
            self.prologue = self._search(0, {header}, 0, before=start)[:-1]
            leaving = [s for b in body for s in self.blocks[b].succ if s not in body]
            self.epilogue = (self._search(min(leaving, key=lambda s: self.blocks[s].start), exits, 0, after=start)
                             if leaving else [])  # else the loop ends the program through a predicated EXIT
        else:
            self.small_loop_blocks = in_loops
            self._loops = loops
            self.path = self._search(0, exits, need)
            self.prologue, self.epilogue = [], []

    # ---- costs
    def counts(self, b: int) -> Counter:
        block = self.blocks[b]
        counts = Counter(block.ins)
        if block.call:
            counts.update(self._callee_counts(block.call))
        return counts

    def cost(self, b: int) -> float:
        return sum(issue_slots(i) * n for i, n in self.counts(b).items())

    def _element_bytes(self, b: int) -> int:
        return sum(global_bytes(i) for i in self.blocks[b].ins if i.addr in self.element_accesses)

    def gbytes(self, b: int) -> int:
        """Bytes the block's element accesses (thread-indexed global loads/stores) move per thread, outside the
        small per-program loops."""
        return 0 if b in self.small_loop_blocks else self._element_bytes(b)

    def _callee_counts(self, label: str) -> Counter:
        if label not in self._callee:
            start = self.labels[label]
            ends = {b.idx for b in self.blocks if b.ins[-1].base == "RET" and b.idx >= start}
            counts = Counter()
            for b in self._search(start, ends, 0, waypoints=False):
                counts.update(self.counts(b))
            self._callee[label] = counts
        return self._callee[label]

    # ---- graph search
    def _search(self, src: int, targets: Set[int], need: int, within: Optional[Set[int]] = None,
                before: Optional[int] = None, after: Optional[int] = None, waypoints: bool = True) -> List[int]:
        """The cheapest block path from ``src`` to one of ``targets`` (both ends included, by issue cost) whose
        element accesses move at least ``need`` bytes per thread and which passes, in address order, through
        one block with element accesses of every small loop in the region (``within`` a set of blocks,
        ``before``/``after`` an address)."""
        clusters: List[Set[int]] = []
        if waypoints and self._force_small_loops:
            for _, _, body in sorted(self._loops, key=lambda t: self.blocks[t[0]].start):
                cluster = {b for b in body if self._element_bytes(b)}
                start = min((self.blocks[b].start for b in body), default=0)
                if (not cluster or (within is not None and not body <= within)
                        or (before is not None and start >= before) or (after is not None and start <= after)
                        or any(cluster == c for c in clusters)):
                    continue
                clusters.append(cluster)

        def advance(b: int, nbytes: int, w: int) -> Tuple[int, int]:
            nbytes = min(need, nbytes + self.gbytes(b))
            if w < len(clusters) and b in clusters[w]:
                w += 1
            return nbytes, w

        first = (src, *advance(src, 0, 0))
        dist = {first: self.cost(src)}
        prev: Dict[tuple, Optional[tuple]] = {first: None}
        heap = [(dist[first], first)]
        while heap:
            d, state = heapq.heappop(heap)
            if d > dist.get(state, math.inf):
                continue
            b, nbytes, w = state
            if b in targets and nbytes >= need and w == len(clusters) and (state != first or src in targets):
                path = []
                while state is not None:
                    path.append(state[0])
                    state = prev[state]
                return path[::-1]
            for s in self.blocks[b].succ:
                if within is not None and s not in within:
                    continue
                nxt = (s, *advance(s, nbytes, w))
                nd = d + self.cost(s)
                if nd < dist.get(nxt, math.inf):
                    dist[nxt], prev[nxt] = nd, state
                    heapq.heappush(heap, (nd, nxt))
        raise RuntimeError(f"no path from block B{src} to {sorted(targets)} moving {need} bytes per thread")

    def _natural_loops(self) -> List[Tuple[int, int, Set[int]]]:
        """(header, latch, body) per back edge among live blocks."""
        preds: Dict[int, List[int]] = {b: [] for b in self.live}
        for x in self.live:
            for s in self.blocks[x].succ:
                preds[s].append(x)
        loops = []
        for latch in self.live:
            for header in self.blocks[latch].succ:
                if self.blocks[header].start <= self.blocks[latch].start:
                    body, stack = {header}, [latch]
                    while stack:
                        x = stack.pop()
                        if x not in body:
                            body.add(x)
                            stack.extend(preds[x])
                    loops.append((header, latch, body))
        return loops


# ------------------------------------------------------------------------------------------------ the model
def predict(bytes_per_element: float, per_element: Counter, device: Device, efficiency: float) -> dict:
    """The roofline prediction on ``device`` of a kernel moving ``bytes_per_element`` DRAM bytes and issuing
    ``per_element``'s counts per element: the raw fraction, and the calibrated one with the issue and MUFU
    rates sustained at ``efficiency`` of the model's."""
    t_mem = bytes_per_element / device.mem_bw
    t_issue = per_element["_issue"] / device.issue_rate
    t_mufu = per_element["mufu"] / device.mufu_rate
    limits = {"memory": t_mem, "issue": t_issue, "MUFU": t_mufu}
    calibrated = {"memory": t_mem, "issue": t_issue / efficiency, "MUFU": t_mufu / efficiency}
    heavy = per_element["imad"] + 2 * per_element["imad_wide"]
    pipes = {"ALU": per_element["alu"] / device.alu_rate,
             "FMA": max(heavy / device.alu_rate, (heavy + per_element["fp32"]) / device.fp32_rate),
             "MUFU+cvt": (per_element["mufu"] + per_element["cvt"]) / device.mufu_rate}
    return dict(
        budget_share=t_issue / t_mem, issue_seconds_per_element=t_issue, memory_seconds_per_element=t_mem,
        predicted_fraction=t_mem / max(limits.values()), binding_limit=max(limits, key=limits.get),
        efficiency=efficiency, calibrated_fraction=t_mem / max(calibrated.values()),
        calibrated_limit=max(calibrated, key=calibrated.get),
        pipe_fraction=t_mem / max(t_mem, t_issue, *pipes.values()),
        pipe_limit=max({"memory": t_mem, "issue": t_issue, **pipes}.items(), key=lambda kv: kv[1])[0],
    )


def model(case, compiled: dict, show_path: bool = False, device_name: str = DEFAULT_DEVICE,
          efficiency: float = EFFICIENCY) -> dict:
    """One JSON record: the hot path's counts per element and the roofline prediction for ``case`` on every
    device (``devices``), with ``device_name``'s at the top level."""
    launch = case.launch
    threads = 32 * launch.num_warps
    programs = math.prod(launch.grid)
    ept = elements_per_thread = case.elements / (programs * case.iterations * threads)
    path = HotPath(compiled["sass"], ept * case.bytes_per_element, case.iterations > 1,
                   force_small_loops=not case.skip_noise)
    if case.iterations > 1:  # ptxas may unroll the bulk loop: one trip then covers several iterations
        trips = round(sum(path.gbytes(b) for b in path.path) / (ept * case.bytes_per_element))
        if trips > 1 and case.iterations % trips == 0:
            ept *= trips

    per_element: Counter = Counter()

    def add(blocks: List[int], scale: float) -> None:
        for b in blocks:
            for ins, n in path.counts(b).items():
                per_element[classify(ins)] += n * scale
                per_element["_issue"] += issue_slots(ins) * n * scale
                per_element["_instructions"] += n * scale

    add(path.path, 1.0 / ept)
    add(path.prologue + path.epilogue, 1.0 / (elements_per_thread * case.iterations))
    path_bytes = sum(path.gbytes(b) for b in path.path) / ept
    access_bits = [8 * global_bytes(i) for b in path.path if path.gbytes(b) for i in path.blocks[b].ins
                   if i.addr in path.element_accesses and global_bytes(i)]
    if case.row_weight_bytes_per_element:  # the 32-bit per-row weights are not bulk accesses
        access_bits = [bits for bits in access_bits if bits != 32] or access_bits

    registers = compiled["registers"]
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    blocks_per_sm = min(REGISTERS_PER_SM // (regs_per_warp * launch.num_warps), MAX_WARPS_PER_SM // launch.num_warps,
                        MAX_BLOCKS_PER_SM, SHARED_PER_SM // max(compiled["shared"] + 1024, 1))
    record = dict(
        name=case.name, kernel=case.kernel_name, num_warps=launch.num_warps, elements_per_thread=ept,
        bytes_per_element=case.bytes_per_element, path_bytes_per_element=path_bytes,
        issue_slots_per_element=per_element["_issue"], instructions_per_element=per_element["_instructions"],
        mufu_per_element=per_element["mufu"],
        classes_per_element={k: v for k, v in sorted(per_element.items()) if not k.startswith("_")},
        registers=registers, spill_bytes=compiled["spill_bytes"],
        local_bytes=compiled["local_bytes"], shared_bytes=compiled["shared"],
        warps_per_sm=blocks_per_sm * launch.num_warps,
        min_global_access_bits=min(access_bits) if access_bits else None,
        amortised_bytes_per_element=case.amortised_bytes_per_element,
        devices={name: predict(case.bytes_per_element + case.amortised_bytes_per_element, per_element, device,
                               efficiency)
                 for name, device in DEVICES.items()},
    )
    # An access is off the hot path when the SASS loads/stores of its source line are all off it. ptxas may
    # attribute a load to the line that uses it: a line with no SASS access at all counts as on the hot path.
    hot_sources = {tuple(compiled["sources"][i.addr]) for b in path.path if b not in path.small_loop_blocks
                   for i in path.blocks[b].ins if i.addr in path.element_accesses and i.addr in compiled["sources"]}
    all_sources = {tuple(source) for source in compiled["sources"].values()}
    for access in compiled.get("accesses") or []:
        if access.get("source") is not None and compiled["sources"]:
            source = tuple(access["source"])
            access["on_hot_path"] = source in hot_sources or source not in all_sources
    record.update(record["devices"][device_name], device=device_name, **coalescing(compiled))
    if show_path:
        record["path"] = dict(body=[f"B{b}" for b in path.path], prologue=[f"B{b}" for b in path.prologue],
                              epilogue=[f"B{b}" for b in path.epilogue])
    record["failures"] = failures(case, record)
    return record


def coalescing(compiled: dict) -> dict:
    """The record's coalescing fields, from the TTGIR check of ``ttgir_coalescing``: the uncoalesced tensor
    loads/stores on the hot path (matched by source line with the hot path's element accesses; every access when
    the hot path is not known: a compiled-only case, or no line info), and those off it (reported, not failing)."""
    accesses = compiled.get("accesses") or []
    hot = [a for a in accesses if a.get("on_hot_path") is not False]
    return dict(global_accesses=len(accesses), hot_path_accesses=len(hot),
                uncoalesced_accesses=[a for a in hot if a["uncoalesced"]],
                uncoalesced_off_hot_path=[a for a in accesses if a["uncoalesced"] and a not in hot],
                undetermined_accesses=[a for a in hot if a["undetermined"]])


def failures(case, record: dict) -> List[str]:
    """What the record misses of the case's target (and the model's own consistency checks)."""
    out = []
    # Row weights reloaded from the cache may add up to row_weight_bytes_per_element to the declared bytes.
    low, high = case.bytes_per_element, case.bytes_per_element + case.row_weight_bytes_per_element
    # Masked lanes of a padded row tile carry accesses that move nothing (Case.lane_padding).
    low, high = low * case.lane_padding, high * case.lane_padding
    if not 0.98 * low <= record["path_bytes_per_element"] <= 1.02 * high:
        out.append(f"the hot path moves {record['path_bytes_per_element']:.2f} B/element in element accesses, the case "
                   f"declares {low:g}" + (f" to {high:g}" if high > low else ""))
    if record["spill_bytes"]:
        out.append(f"{record['spill_bytes']} bytes of register spills")
    target = case.target
    if target is None:
        return out
    out += coalescing_failures(record)
    on = record["devices"][target.device]
    label = DEVICES[target.device].label
    if on["calibrated_fraction"] < target.min_fraction:
        out.append(f"calibrated {on['calibrated_fraction']:.1%} (raw {on['predicted_fraction']:.1%}) < "
                   f"{target.min_fraction:.0%} of the roofline on {label} at efficiency {on['efficiency']:g} "
                   f"({on['calibrated_limit']}-bound)")
    if target.max_budget_share and on["budget_share"] > target.max_budget_share:
        out.append(f"uses {on['budget_share']:.0%} of the issue budget on {label} > {target.max_budget_share:.0%}")
    if record["warps_per_sm"] < target.min_warps_per_sm:
        out.append(f"{record['warps_per_sm']} resident warps/SM < {target.min_warps_per_sm}")
    bits = record["min_global_access_bits"]
    if target.min_access_bits and (bits is None or bits < target.min_access_bits):
        out.append(f"narrowest element access {bits} bits < {target.min_access_bits}")
    return out


def coalescing_failures(record: dict) -> List[str]:
    """A targeted kernel fails on every uncoalesced global access (issue 23)."""
    return [f"uncoalesced {a['description']}" for a in record.get("uncoalesced_accesses", [])]


# ------------------------------------------------------------------------------------------------ compiling
# Contracted float32 multiply-adds, less the exact one of a 16-bit uniform (kernels/draws.py, _uniform16_pair:
# b * 2**-15 - (1 - 2**-16) needs no rounding, so it is the reference's value with or without contraction).
FP32_FMA = re.compile(r"\bfma\.rn(?:\.ftz)?(?:\.sat)?\.f32\b(?![^;\n]*0f38000000, 0fBF7FFF00;)")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile_one(index: int) -> dict:
    """Compile case ``index`` and disassemble it (run in a worker process)."""
    from fusednoise.kernels.compile_check import compile_error, compile_launch
    from fusednoise.kernels.specialisations import cases

    case = cases()[index]
    started = time.perf_counter()
    try:
        compiled = compile_launch(case.launch, ARCH)
    except Exception as error:  # noqa: BLE001 - a compiler failure is a finding to report
        return dict(error=compile_error(error), seconds=time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], check=True, capture_output=True, text=True).stdout
        # the same code with source lines: which TTGIR loads/stores the hot path's accesses come from
        with_lines = subprocess.run([_tool("nvdisasm"), "-c", "-gi", cubin], capture_output=True, text=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], check=True, capture_output=True,
                               text=True).stdout
    try:
        accesses = [a.as_dict() for a in ttgir_coalescing.accesses(compiled.asm["ttgir"])]
    except Exception as error:  # noqa: BLE001 - a TTGIR the check cannot read is reported with the case
        accesses = [dict(undetermined=f"{type(error).__name__}: {error}", uncoalesced=False,
                         description=f"the TTGIR could not be read: {error}")]
    resources = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    registers, stack, _, local = (int(x) for x in resources.groups())
    spill_ops = len(re.findall(r"\b(STL|LDL)\b", sass))
    sources = sass_cfg.source_lines(with_lines)
    sources = {i.addr: sources[i.addr] for i in sass_cfg.parse(sass)
               if isinstance(i, Ins) and i.base in ("LDG", "STG") and i.addr in sources}
    return dict(error="", sass=sass, registers=registers, local_bytes=local + stack, sources=sources,
                # float32 multiply-adds contracted into one rounding (none where a launch disables fp fusion
                # because its result is claimed bitwise equal to the reference's: tests/test_kernels_compile.py)
                fp32_fma=len(FP32_FMA.findall(compiled.asm["ptx"])), options=case.launch.compile_options(),
                # local memory used by spill code (no kernel here keeps an array in local memory on purpose)
                spill_bytes=(local + stack) if spill_ops else 0,
                shared=compiled.metadata.shared, accesses=accesses, seconds=time.perf_counter() - started)


def compile_cases(indices: List[int], jobs: int) -> Dict[int, dict]:
    if jobs <= 1 or len(indices) <= 1:
        return {i: _compile_one(i) for i in indices}
    import multiprocessing

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(indices, pool.map(_compile_one, indices)))


# ------------------------------------------------------------------------------------------------ report
def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    return "-" if value is None else format(value, fmt)


def _coalesced_cell(record: dict) -> str:
    bad, unknown = len(record.get("uncoalesced_accesses", [])), len(record.get("undetermined_accesses", []))
    off = len(record.get("uncoalesced_off_hot_path", []))
    if not record.get("global_accesses"):
        return "-"
    notes = [f"{unknown} undetermined"] * bool(unknown) + [f"{off} uncoalesced off the hot path"] * bool(off)
    return (f"NO: {bad} of {record['hot_path_accesses']}" if bad else "yes") + (f" ({', '.join(notes)})"
                                                                                if notes else "")


def table(records: List[dict], targeted: bool, devices=TABLE_DEVICES) -> List[str]:
    per_device = "".join(f" | {DEVICES[d].label}: budget used | raw | calibrated | bound by" for d in devices)
    lines = [f"| case | B/elem | issue slots/elem | MUFU/elem | regs | warps/SM | narrowest access | coalesced"
             f"{per_device} | target |",
             "|---" * (9 + 4 * len(devices)) + "|"]
    for r in records:
        if bool(r.get("target")) != targeted:
            continue
        if r.get("error") or "predicted_fraction" not in r:
            what = r["error"] or f"compiled only, {r['registers']} registers, {r['spill_bytes']} spill bytes"
            coalesced = _coalesced_cell(r)
            lines.append(f"| {r['name']} | {what} ||||||" + (f" {coalesced} " if coalesced != "-" else "") + "|"
                         + "||||" * len(devices) + "|")
            continue
        target = r.get("target")
        verdict = "" if not target else ("met" if not r["failures"] else
                                         ("pending: " if target.get("pending") else "MISSED: ")
                                         + "; ".join(r["failures"]))
        cells = "".join(
            f" | {p['budget_share']:.0%} | {p['predicted_fraction']:.0%} | {p['calibrated_fraction']:.0%}"
            f" | {p['calibrated_limit']}" for p in (r["devices"][d] for d in devices))
        lines.append(
            f"| {r['name']} | {r['bytes_per_element'] + r.get('amortised_bytes_per_element', 0):.4g} "
            f"| {r['issue_slots_per_element']:.1f} "
            f"| {r['mufu_per_element']:.2f} | {r['registers']} | {r['warps_per_sm']} "
            f"| {_cell(r, 'min_global_access_bits', 'd')} bit | {_coalesced_cell(r)}{cells} | {verdict} |")
    return lines


def markdown(records: List[dict], devices=TABLE_DEVICES, efficiency: float = EFFICIENCY) -> str:
    intro = "Each case of" + __doc__.split("Each case of", 1)[1].split("The hot path", 1)[0]
    lines = [f"# Static roofline model of the kernels on {' and '.join(DEVICES[d].label for d in devices)} (sm_90)",
             "", "Written by `python benchmarks/sass_roofline.py` (Triton's ptxas and nvdisasm, no GPU).", "",
             intro.rstrip().replace("``", "`"), "",
             "Devices:", ""] + [f"* {DEVICES[d].summary()}" for d in devices] + [
             "", f"Columns per device: the share of the issue budget the kernel uses, the raw predicted fraction "
             f"of the memory roofline, the calibrated one (issue and MUFU rates sustained at e = {efficiency:g} of "
             f"the model's) and what binds it. Targets hold on the calibrated fraction of the device the target "
             f"names (H100 unless the verdict says otherwise). Coalesced: every tensor load/store of the kernel "
             f"uses all the bytes of the 32-byte sectors a warp touches (`benchmarks/ttgir_coalescing.py`).", ""]
    for d in devices:
        worst = min((r for r in records if r.get("target") and "devices" in r),
                    key=lambda r: r["devices"][d]["calibrated_fraction"], default=None)
        if worst:
            p = worst["devices"][d]
            lines.append(f"Worst targeted case on {DEVICES[d].label}: **{worst['name']}**, calibrated "
                         f"{p['calibrated_fraction']:.0%} (raw {p['predicted_fraction']:.0%}) of the roofline "
                         f"({p['calibrated_limit']}-bound).")
    lines += ["", "## Cases with a target (issue 9)", ""] + table(records, True, devices)
    lines += ["", "## Other specialisations (small inputs, other widths, other dtypes; no target)", ""]
    lines += table(records, False, devices)
    return "\n".join(lines) + "\n"


def run(only: str = "", jobs: int = 1, show_path: bool = False, device: str = DEFAULT_DEVICE,
        efficiency: float = EFFICIENCY) -> List[dict]:
    from fusednoise.kernels.compile_check import refuse_under_interpreter
    from fusednoise.kernels.specialisations import cases

    refuse_under_interpreter()
    all_cases = cases()
    indices = [i for i, c in enumerate(all_cases) if not only or re.search(only, c.name)]
    compiled = compile_cases(indices, jobs)
    records = []
    for i in indices:
        case, result = all_cases[i], compiled[i]
        target = None if case.target is None else vars(case.target)
        if result["error"] or not case.modelled:
            record = dict(name=case.name, kernel=case.kernel_name, target=target, error=result["error"],
                          failures=[f"compile error: {result['error']}"] if result["error"] else [],
                          registers=result.get("registers"), spill_bytes=result.get("spill_bytes"),
                          device=device, fp32_fma=result.get("fp32_fma"), options=result.get("options"),
                          **coalescing(result))
            if target and not result["error"]:
                record["failures"] += coalescing_failures(record)
            records.append(record)
            continue
        try:
            record = model(case, result, show_path, device, efficiency)
        except Exception as error:  # noqa: BLE001 - a case the model cannot read is reported, not skipped
            record = dict(name=case.name, kernel=case.kernel_name, error=f"model: {type(error).__name__}: {error}",
                          failures=[f"model error: {error}"], device=device)
        record.update(target=target, compile_seconds=result["seconds"], fp32_fma=result["fp32_fma"],
                      options=result["options"])
        record.setdefault("error", "")
        records.append(record)
    return records


def _efficiency(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--efficiency must be in (0, 1], got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="regular expression on the case names")
    parser.add_argument("--device", choices=sorted(DEVICES), default=DEFAULT_DEVICE,
                        help="the device whose prediction the JSON records and stdout table carry (default "
                             "%(default)s); every record also holds every device's under 'devices', and each "
                             "target is held on the device it names")
    parser.add_argument("--efficiency", type=_efficiency, default=EFFICIENCY,
                        help="sustained issue (and MUFU) rate as a fraction of the model's, for the calibrated "
                             "fraction (default %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the records as a JSON list")
    parser.add_argument("--md", metavar="FILE", default=None,
                        help="Markdown report (default: benchmarks/results/static-sm90.md for a full run, none "
                             "with --only, so a subset never overwrites the committed table; '' for none)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiler processes")
    parser.add_argument("--path", action="store_true", help="print each hot path's blocks")
    args = parser.parse_args(argv)
    if args.md is None:
        args.md = "" if args.only else DEFAULT_MD
    records = run(args.only, args.jobs, args.path, args.device, args.efficiency)
    devices = tuple(dict.fromkeys((*TABLE_DEVICES, args.device)))
    print("\n".join(table(records, True, (args.device,)) + [""] + table(records, False, (args.device,))))
    if args.path:
        for r in records:
            print(r["name"], r.get("path"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(records, devices, args.efficiency))
    missed = [r for r in records if r["failures"] and not (r.get("target") or {}).get("pending")]
    for r in missed:
        print(f"MISSED {r['name']}: {'; '.join(r['failures'])}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
