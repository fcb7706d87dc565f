"""Whether a compiled Triton kernel's global loads and stores are coalesced, read from its TTGIR (for
``sass_roofline.py``, issue 23).

    python benchmarks/ttgir_coalescing.py KERNEL.ttgir     # one line per tensor load/store

The SASS model counts access widths, not the address pattern across a warp's lanes: a kernel that stores four
separate values per thread at a stride of four elements across the warp issues 32-bit stores the model calls
cheap, yet each store touches four times the 32-byte sectors its bytes fill, and a GPU runs it byte-bound at a
quarter of the copy bandwidth. The TTGIR has what is needed to see it: every tensor carries a blocked layout
(``sizePerThread``, ``threadsPerWarp``, ``warpsPerCTA``, ``order``: which lane holds which element), and every
``tt.load``/``tt.store`` takes a tensor of pointers built from ``tt.make_range``, ``tt.splat``, integer arithmetic
and ``tt.addptr``.

For each tensor load/store this evaluates its pointer tensor's backward slice with numpy, as byte offsets from a
base common to all lanes: a scalar argument or program id (the same for every lane) counts as 0 when added and as
a large stride (``RUNTIME_STRIDE`` bytes, so that no two rows share a sector) when it multiplies a per-lane index
(a row stride known only at run time). Then it takes the elements warp 0 holds in the layout's first repetition
(every lane's ``sizePerThread`` elements) and reports
* ``lane_stride_bytes``: the address step from lane 0 to lane 1 (their first elements);
* ``sector_efficiency``: the fewest 32-byte sectors that could hold the distinct bytes the warp accesses / the
  sectors it touches, with the warp's lowest address at the start of a sector (the access pattern, not the base's
  alignment, which is a property of the tensor). 1.0 is a coalesced access (a warp's bytes fill whole
  sectors, or lanes share one element: a broadcast); the strided store above is 0.25.
An access is uncoalesced when its efficiency is below ``MIN_EFFICIENCY``. Addresses that depend on loaded data (a
gather) or on an operation this does not evaluate are reported as undetermined, not as uncoalesced.

Every tensor access of the kernel is checked, not only the SASS hot path's: mapping TTGIR ops to SASS blocks is
not robust, and an uncoalesced access off the hot path is worth knowing about too.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

RUNTIME_STRIDE = 1 << 20   # bytes: a stride known only at run time, taken as larger than any sector
MIN_EFFICIENCY = 0.99      # sector efficiency below which an access is uncoalesced
SECTOR = 32                # bytes
_MAX_ELEMENTS = 1 << 18    # a pointer tensor larger than this is not evaluated (none of ours comes close)

_TYPE_BYTES = {"i1": 1, "i8": 1, "i16": 2, "f16": 2, "bf16": 2, "i32": 4, "f32": 4, "i64": 8, "f64": 8,
               "f8E4M3FN": 1, "f8E5M2": 1}
_LAYOUT_DEF = re.compile(r"^(#[\w]+)\s*=\s*#ttg\.blocked<\{(.*)\}>")
_OP = re.compile(r"^\s*(?:(%[\w#]+(?::\d+)?)\s*=\s*)?([a-z_]+\.[a-z_.]+)\s*(.*)$")
_VALUE = re.compile(r"%[\w]+(?:#\d+)?")


@dataclass
class Blocked:
    size_per_thread: Tuple[int, ...]
    threads_per_warp: Tuple[int, ...]
    warps_per_cta: Tuple[int, ...]
    order: Tuple[int, ...]


@dataclass
class Access:
    op: str                      # "load" or "store"
    line: int                    # line of the TTGIR (1-based)
    shape: Tuple[int, ...]
    element_bytes: int
    lane_stride_bytes: Optional[int] = None
    sector_efficiency: Optional[float] = None
    undetermined: str = ""       # why the addresses could not be derived
    source: Optional[Tuple[str, int]] = None  # (file name, line) of the innermost source location
    on_hot_path: Optional[bool] = None        # set by sass_roofline from the SASS line info (None: not known)

    @property
    def uncoalesced(self) -> bool:
        return self.sector_efficiency is not None and self.sector_efficiency < MIN_EFFICIENCY

    def describe(self) -> str:
        where = f"{self.source[0]}:{self.source[1]}, " if self.source else ""
        what = f"{self.op} of {'x'.join(map(str, self.shape))} x {self.element_bytes} B ({where}TTGIR line {self.line})"
        if self.undetermined:
            return f"{what}: undetermined ({self.undetermined})"
        return (f"{what}: lanes {self.lane_stride_bytes} B apart, sector efficiency {self.sector_efficiency:.0%}")

    def as_dict(self) -> dict:
        return dict(op=self.op, line=self.line, shape=list(self.shape), element_bytes=self.element_bytes,
                    lane_stride_bytes=self.lane_stride_bytes, sector_efficiency=self.sector_efficiency,
                    undetermined=self.undetermined, uncoalesced=self.uncoalesced, description=self.describe(),
                    source=list(self.source) if self.source else None, on_hot_path=self.on_hot_path)


class _Unknown(Exception):
    """The value cannot be evaluated (data-dependent or an unsupported operation)."""


# ------------------------------------------------------------------------------------------------ parsing
def _ints(text: str, key: str) -> Tuple[int, ...]:
    match = re.search(key + r"\s*=\s*\[([\d,\s]*)\]", text)
    return tuple(int(x) for x in match.group(1).split(",") if x.strip()) if match else ()


def _layouts(ttgir: str) -> Dict[str, Blocked]:
    layouts = {}
    for line in ttgir.splitlines():
        match = _LAYOUT_DEF.match(line.strip())
        if match:
            body = match.group(2)
            layouts[match.group(1)] = Blocked(_ints(body, "sizePerThread"), _ints(body, "threadsPerWarp"),
                                              _ints(body, "warpsPerCTA"), _ints(body, "order"))
    return layouts


def _strip_loc(text: str) -> str:
    index = text.rfind(" loc(")
    return text[:index] if index >= 0 else text


def _split_top(text: str, sep: str) -> List[str]:
    """``text`` split at ``sep`` outside <>, (), {} and []."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "<({[":
            depth += 1
        elif c in ">)}]" and not (c == ">" and text[i - 1] == "-"):
            depth -= 1
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i += len(sep)
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _tensor_type(type_text: str) -> Tuple[Tuple[int, ...], str, str]:
    """(shape, element type, layout name) of ``tensor<4x8x!tt.ptr<f16>, #blocked>``; () for a scalar."""
    type_text = type_text.strip()
    match = re.match(r"tensor<((?:\d+x)*)(.*)>$", type_text)
    if not match:
        return (), type_text, ""
    shape = tuple(int(x) for x in match.group(1).split("x") if x)
    element, _, layout = match.group(2).partition(", ")
    return shape, element.strip(), layout.strip()


_LOC_DEF = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$")


def _source(loc: str, defs: Dict[str, str], depth: int = 0) -> Optional[Tuple[str, int]]:
    """The innermost (file name, line) of an MLIR location: a file:line:col, a name or call site around one, or
    an alias ``#locN`` of one."""
    loc = loc.strip()
    if depth > 50:
        return None
    match = re.match(r'^"([^"]*)":(\d+):\d+', loc)
    if match:
        return match.group(1).rsplit("/", 1)[-1], int(match.group(2))
    if loc.startswith("#loc"):
        name = re.match(r"#loc\d*", loc).group(0)
        return _source(defs[name], defs, depth + 1) if name in defs else None
    if loc.startswith("callsite("):
        return _source(loc[len("callsite("):].split(" at ", 1)[0], defs, depth + 1)
    match = re.match(r'^"[^"]*"\((.*)\)$', loc)  # a name location
    if match:
        return _source(match.group(1), defs, depth + 1)
    if loc.startswith("fused"):
        for part in re.findall(r'#loc\d*|"[^"]*":\d+:\d+', loc):
            found = _source(part, defs, depth + 1)
            if found:
                return found
    return None


@dataclass
class _Op:
    line: int
    results: List[str]
    name: str
    operands: List[str]
    text: str          # the op's text without its results and loc
    result_type: str   # the first result's type
    operand_type: str  # the first operand's type
    loc: str = ""      # the op's location (``#loc12`` or an inline one)


def _parse(ttgir: str) -> Tuple[List[_Op], List[Tuple[int, str, str, str]]]:
    """The ops in text order, and the region arguments and loop results as aliases ``(line, %name, kind,
    %value)``, kind "init" (an ``scf.for``'s iteration arguments and results are their initial values: the
    first trip) or "unknown" (the induction variable, the same for every lane)."""
    ops, aliases = [], []
    for number, raw in enumerate(ttgir.splitlines(), 1):
        index = raw.rfind(" loc(")
        loc = raw[index + len(" loc("):].rstrip().rstrip(")") if index >= 0 else ""
        match = _OP.match(_strip_loc(raw).rstrip(" {"))
        if not match:
            continue
        result, name, rest = match.groups()
        results = []
        if result:
            base, _, count = result.partition(":")
            results = [f"{base}#{k}" for k in range(int(count))] if count else [base]
            if count:
                results.append(base)  # a use of the whole list (rare) reads the first
        if name == "scf.for":
            head = re.match(r"(%\w+)\s*=", rest)
            if head:
                aliases.append((number, head.group(1), "unknown", ""))
            for arg, init in re.findall(r"(%\w+)\s*=\s*(%[\w#]+)", rest.split("iter_args", 1)[-1]):
                aliases.append((number, arg, "init", init))
            inits = re.findall(r"=\s*(%[\w#]+)", rest.split("iter_args", 1)[-1]) if "iter_args" in rest else []
            for k, res in enumerate(r for r in results if "#" in r or len(results) == 1):
                if k < len(inits):
                    aliases.append((number, res, "init", inits[k]))
            continue
        # attributes inside {...} may hold " : " (tt.make_range): split the types off at the top level instead
        pieces = _split_top(rest, " : ")
        code, types = pieces[0], pieces[-1] if len(pieces) > 1 else ""
        arrow = types.rsplit("->", 1)
        result_type = _split_top(arrow[-1].strip().strip("()"), ", ")[0] if types else ""
        operand_type = _split_top(arrow[0].strip(), ", ")[0] if types else ""
        if name == "arith.constant":
            result_type = types.strip()
        ops.append(_Op(number, results, name, _VALUE.findall(code), rest, result_type.strip(), operand_type.strip(),
                       loc))
    return ops, aliases


# ------------------------------------------------------------------------------------------------ evaluation
class _Uniform:
    """A value the same for every lane whose number is not known (an argument, a program id, a loaded scalar)."""


UNIFORM = _Uniform()


class _Evaluator:
    """Values by name at a line: MLIR reuses a name in sibling regions (two loops may each define ``%idx_3``), so
    a use reads the latest definition above it."""

    def __init__(self, ops: List[_Op], aliases: List[Tuple[int, str, str, str]]):
        self.defs: Dict[str, List[Tuple[int, object]]] = {}
        for op in ops:
            for r in op.results:
                self.defs.setdefault(r, []).append((op.line, op))
        for line, name, kind, init in aliases:
            self.defs.setdefault(name, []).append((line, (kind, init)))
        for entries in self.defs.values():
            entries.sort(key=lambda e: e[0])
        self.values: Dict[Tuple[str, int], object] = {}

    def value(self, name: str, at: int):
        """The value of ``name`` as the op on line ``at`` reads it."""
        entries = [e for e in self.defs.get(name, []) if e[0] < at]
        if not entries:
            return UNIFORM  # a function argument
        line, definition = entries[-1]
        key = (name, line)
        if key not in self.values:
            self.values[key] = self._evaluate(definition, line)
        value = self.values[key]
        if isinstance(value, _Unknown):
            raise value
        return value

    def _evaluate(self, definition, line: int):
        try:
            if isinstance(definition, tuple):
                kind, init = definition
                return UNIFORM if kind == "unknown" else self.value(init, line)
            return self._op(definition)
        except _Unknown as error:
            return error

    def _op(self, op: _Op):
        shape, element, _ = _tensor_type(op.result_type)
        name = op.name
        if name == "arith.constant":
            match = re.match(r"(?:dense<)?(-?\d+)(?:>)?\s*$", _split_top(op.text, " : ")[0].strip())
            if not match:
                raise _Unknown(f"constant {op.text[:40]}")
            return np.full(shape, int(match.group(1)), dtype=np.int64) if shape else np.int64(int(match.group(1)))
        if name == "tt.make_range":
            start, end = (int(re.search(key + r"\s*=\s*(-?\d+)", op.text).group(1)) for key in ("start", "end"))
            return np.arange(start, end, dtype=np.int64)
        if name in ("tt.get_program_id", "tt.get_num_programs"):
            return UNIFORM
        if name == "tt.load":
            if shape or _tensor_type(op.operand_type)[0]:
                raise _Unknown("addresses from loaded data")
            return UNIFORM  # a scalar load: the same value for every lane
        args = [self.value(a, op.line) for a in op.operands]
        if all(a is UNIFORM or np.ndim(a) == 0 for a in args) and not shape:
            # scalar arithmetic: exact when every input is a known constant
            if any(a is UNIFORM for a in args) or name not in _BINARY:
                return UNIFORM
            with np.errstate(all="ignore"):
                return np.int64(_BINARY[name](np.int64(args[0]), np.int64(args[1])))
        if name == "tt.splat":
            return UNIFORM if args[0] is UNIFORM else np.full(shape, args[0], dtype=np.int64)
        if name in ("tt.broadcast", "arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast",
                    "ttg.convert_layout", "tt.bitcast", "tt.ptr_to_int", "tt.int_to_ptr"):
            if args[0] is UNIFORM:
                return UNIFORM
            return np.broadcast_to(args[0], shape) if name == "tt.broadcast" else args[0]
        if name == "tt.expand_dims":
            axis = int(re.search(r"axis\s*=\s*(\d+)", op.text).group(1))
            return UNIFORM if args[0] is UNIFORM else np.expand_dims(args[0], axis)
        if name == "tt.reshape":
            return UNIFORM if args[0] is UNIFORM else np.reshape(args[0], shape)
        if name == "tt.trans":
            order = _ints(op.text, "order")
            return UNIFORM if args[0] is UNIFORM else np.transpose(args[0], order or None)
        if name == "tt.addptr":
            pointee = re.search(r"!tt\.ptr<(\w+)>", op.result_type)
            size = _TYPE_BYTES.get(pointee.group(1) if pointee else "", 0)
            if not size:
                raise _Unknown(f"pointer to {op.result_type}")
            base, offset = args
            if offset is UNIFORM:
                return base
            offset = offset * size
            return offset if base is UNIFORM else base + offset
        if name == "arith.select":
            cond, a, b = args
            if cond is UNIFORM:
                if a is UNIFORM and b is UNIFORM:
                    return UNIFORM
                raise _Unknown("a select on a runtime condition")
            if a is UNIFORM or b is UNIFORM:
                raise _Unknown("a select of a runtime value")
            return np.where(cond, a, b)
        if name in _BINARY or name == "arith.cmpi":
            function = _cmpi(op.text) if name == "arith.cmpi" else _BINARY[name]
            a, b = args
            if a is UNIFORM and b is UNIFORM:
                return UNIFORM
            if a is UNIFORM or b is UNIFORM:
                known = b if a is UNIFORM else a
                if name == "arith.addi" or (name == "arith.subi" and b is UNIFORM):
                    return known  # a shift common to every lane
                if name == "arith.subi":
                    return -known
                if name == "arith.muli":
                    return known * RUNTIME_STRIDE
                raise _Unknown(f"{name} with a runtime operand")
            with np.errstate(all="ignore"):
                return function(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        raise _Unknown(f"unsupported op {name}")


def _floordiv(a, b):
    return np.where(b != 0, np.floor_divide(a, np.where(b == 0, 1, b)), 0)


_BINARY = {
    "arith.addi": np.add, "arith.subi": np.subtract, "arith.muli": np.multiply,
    "arith.divsi": _floordiv, "arith.divui": _floordiv,
    "arith.remsi": lambda a, b: np.where(b != 0, np.remainder(a, np.where(b == 0, 1, b)), 0),
    "arith.remui": lambda a, b: np.where(b != 0, np.remainder(a, np.where(b == 0, 1, b)), 0),
    "arith.andi": np.bitwise_and, "arith.ori": np.bitwise_or, "arith.xori": np.bitwise_xor,
    "arith.shli": np.left_shift, "arith.shrsi": np.right_shift, "arith.shrui": np.right_shift,
    "arith.maxsi": np.maximum, "arith.minsi": np.minimum, "arith.maxui": np.maximum, "arith.minui": np.minimum,
}


def _cmpi(op_text: str):
    predicate = op_text.strip().split(",", 1)[0].strip()
    return {"eq": np.equal, "ne": np.not_equal, "slt": np.less, "sle": np.less_equal, "sgt": np.greater,
            "sge": np.greater_equal, "ult": np.less, "ule": np.less_equal, "ugt": np.greater,
            "uge": np.greater_equal}[predicate]


# ------------------------------------------------------------------------------------------------ layouts
def _warp0_first_repetition(shape: Tuple[int, ...], layout: Blocked) -> Dict[int, List[Tuple[int, ...]]]:
    """{lane: [element indices]} of warp 0 in the layout's first repetition (the elements one pass of the
    warp's accesses covers)."""
    spt, tpw, order = layout.size_per_thread, layout.threads_per_warp, layout.order
    lanes: Dict[int, List[Tuple[int, ...]]] = {}
    # lane coordinates: order[0] varies fastest
    for lane in range(math.prod(tpw)):
        coords, rest = [0] * len(shape), lane
        for d in order:
            coords[d], rest = rest % tpw[d], rest // tpw[d]
        elements = []
        for offsets in np.ndindex(*spt):
            index = tuple(coords[d] * spt[d] + offsets[d] for d in range(len(shape)))
            # a tensor smaller than the layout's tile wraps around (lanes hold copies)
            elements.append(tuple(index[d] % shape[d] for d in range(len(shape))))
        lanes[lane] = elements
    return lanes


def _measure(offsets: np.ndarray, shape: Tuple[int, ...], layout: Blocked, element_bytes: int):
    lanes = _warp0_first_repetition(shape, layout)
    first = {lane: int(offsets[elements[0]]) for lane, elements in lanes.items()}
    stride = first[1] - first[0] if len(first) > 1 else 0
    touched = set()
    for elements in lanes.values():
        for index in elements:
            touched.update(range(int(offsets[index]), int(offsets[index]) + element_bytes))
    low = min(touched)  # the pattern, not the alignment: the warp's lowest address starts a sector
    sectors = {(byte - low) // SECTOR for byte in touched}
    return stride, math.ceil(len(touched) / SECTOR) / len(sectors)


def _resolve_layout(name: str, shape: Tuple[int, ...], layouts: Dict[str, Blocked]):
    """(blocked layout, shape in its rank, the sliced dimensions, outermost slice first) of a blocked layout or a
    ``#ttg.slice<{dim = d, parent = ...}>`` of one (a tensor with the parent's dimension d removed)."""
    sliced: List[int] = []
    full = list(shape)
    while True:
        match = re.fullmatch(r"#ttg\.slice<\{dim = (\d+), parent = (.*)\}>", name)
        if not match:
            break
        dim = int(match.group(1))
        full.insert(dim, 1)
        sliced.append(dim)
        name = match.group(2)
    return layouts.get(name), tuple(full), sliced


def accesses(ttgir: str) -> List[Access]:
    """Every tensor ``tt.load``/``tt.store`` of the kernel, with its lane stride and sector efficiency."""
    layouts = _layouts(ttgir)
    ops, aliases = _parse(ttgir)
    loc_defs = {m.group(1): m.group(2) for m in map(_LOC_DEF.match, ttgir.splitlines()) if m}
    evaluator = _Evaluator(ops, aliases)
    found = []
    for op in ops:
        if op.name not in ("tt.load", "tt.store"):
            continue
        shape, element, layout_name = _tensor_type(op.operand_type)
        if not shape:
            continue  # a scalar access: one address for every lane
        pointee = re.search(r"!tt\.ptr<(\w+)>", element)
        element_bytes = _TYPE_BYTES.get(pointee.group(1) if pointee else "", 0)
        access = Access(op.name.split(".")[1], op.line, shape, element_bytes, source=_source(op.loc, loc_defs))
        found.append(access)
        layout, full_shape, sliced = _resolve_layout(layout_name, shape, layouts)
        if layout is None:
            access.undetermined = f"layout {layout_name or '?'} is not a blocked layout or a slice of one"
            continue
        if math.prod(shape) > _MAX_ELEMENTS or not element_bytes:
            access.undetermined = "too large a tensor" if element_bytes else f"element type {element}"
            continue
        try:
            offsets = evaluator.value(op.operands[0], op.line)
        except _Unknown as error:
            access.undetermined = str(error)
            continue
        if offsets is UNIFORM:
            offsets = np.zeros(shape, dtype=np.int64)
        offsets = np.broadcast_to(np.asarray(offsets), shape)
        for dim in sliced:  # lanes along a sliced dimension hold the same element
            offsets = np.expand_dims(offsets, dim)
        access.lane_stride_bytes, access.sector_efficiency = _measure(offsets, full_shape, layout, element_bytes)
    return found


def main(path: str) -> None:
    for access in accesses(open(path).read()):
        print(("UNCOALESCED " if access.uncoalesced else "") + access.describe())


if __name__ == "__main__":
    main(sys.argv[1])
