"""nvdisasm output of one Triton kernel as instructions, basic blocks and a control-flow graph (for
``sass_roofline.py``).

    python benchmarks/sass_cfg.py KERNEL.sass      # the blocks: address range, successors, memory/MUFU opcodes
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^([.$\w]+):$")
_TARGET = re.compile(r"`\(([^)]+)\)")
_BRANCHES = ("BRA", "JMP", "BRX", "JMX")


@dataclass(eq=False)
class Ins:
    addr: int
    pred: Optional[str]  # guard predicate, e.g. "P0" or "!P1"
    op: str              # opcode with modifiers, e.g. LDG.E.128
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def __str__(self) -> str:
        return f"{self.addr:05x} {('@' + self.pred + ' ') if self.pred else ''}{self.op} {self.args}"


@dataclass
class Block:
    idx: int
    ins: List[Ins]
    labels: List[str] = field(default_factory=list)
    succ: List[int] = field(default_factory=list)
    call: Optional[str] = None  # the callee's label when the block ends in CALL

    @property
    def start(self) -> int:
        return self.ins[0].addr


def parse(text: str) -> List[object]:
    """Instructions (:class:`Ins`) and label names in address order."""
    items: List[object] = []
    for raw in text.splitlines():
        line = re.sub(r"/\* 0x[0-9a-f]{16} \*/", "", raw)
        label = _LABEL.match(line.strip())
        if label:
            items.append(label.group(1))
            continue
        match = _LINE.match(line)
        if not match:
            continue
        body = match.group(2).strip()
        pred = None
        if body.startswith("@"):
            pred, body = body.split(None, 1)
            pred = pred[1:]
        parts = body.split(None, 1)
        items.append(Ins(int(match.group(1), 16), pred, parts[0], parts[1] if len(parts) > 1 else ""))
    return items


def blocks_of(items: List[object]) -> List[Block]:
    """Basic blocks with successors. A predicated EXIT does not end a block: the model follows the threads that
    stay (in-bounds elements)."""
    blocks: List[Block] = []
    current: Optional[Block] = None
    pending: List[str] = []
    for item in items:
        if isinstance(item, str):
            pending.append(item)
            if current is not None:
                blocks.append(current)
                current = None
            continue
        if item.op == "NOP":
            continue
        if current is None:
            current, pending = Block(len(blocks), [], pending), []
        current.ins.append(item)
        ends = item.base in _BRANCHES or item.base in ("EXIT", "RET", "CALL", "BRK", "KILL")
        if ends and not (item.base == "EXIT" and item.pred is not None):
            blocks.append(current)
            current = None
    if current is not None:
        blocks.append(current)
    label_at = {label: b.idx for b in blocks for label in b.labels}
    for b in blocks:
        last = b.ins[-1]
        falls = b.idx + 1 < len(blocks)
        target = _TARGET.search(last.args)
        if last.base in _BRANCHES:
            if target:
                b.succ.append(label_at[target.group(1)])
            if last.pred is not None and falls:
                b.succ.append(b.idx + 1)
        elif last.base == "CALL":
            b.call = target.group(1) if target else None
            if falls:
                b.succ.append(b.idx + 1)
        elif last.base not in ("EXIT", "RET") and falls:
            b.succ.append(b.idx + 1)
    return blocks


_SOURCE = re.compile(r'^\s*//## File "([^"]*)", line (\d+)(?: inlined at "([^"]*)", line (\d+))?')


def source_lines(text: str) -> Dict[int, Tuple[str, int]]:
    """{instruction address: (file name, line)} of the innermost source location ``nvdisasm -gi`` prints before
    each instruction (an inlined function's line, not its caller's); instructions without one inherit the last."""
    out: Dict[int, Tuple[str, int]] = {}
    group: List[Tuple[str, int, Optional[Tuple[str, int]]]] = []
    current: Optional[Tuple[str, int]] = None
    for raw in text.splitlines():
        match = _SOURCE.match(raw)
        if match:
            caller = (match.group(3).rsplit("/", 1)[-1], int(match.group(4))) if match.group(3) else None
            group.append((match.group(1).rsplit("/", 1)[-1], int(match.group(2)), caller))
            continue
        ins = _LINE.match(re.sub(r"/\* 0x[0-9a-f]{16} \*/", "", raw))
        if not ins:
            continue
        if group:
            # the last frame printed is the outermost; walk back while a frame is inlined at the one after it
            k = len(group) - 1
            while k > 0 and group[k - 1][2] == group[k][:2]:
                k -= 1
            current = group[k][:2]
            group = []
        if current is not None:
            out[int(ins.group(1), 16)] = current
    return out


def label_index(blocks: List[Block]) -> Dict[str, int]:
    return {label: b.idx for b in blocks for label in b.labels}


def reachable(blocks: List[Block], start: int = 0) -> Set[int]:
    seen: Set[int] = set()
    stack = [start]
    while stack:
        b = stack.pop()
        if b not in seen:
            seen.add(b)
            stack.extend(blocks[b].succ)
    return seen


_REGISTER = re.compile(r"\b(R(\d+)|P[0-6])(\.64)?\b")
_NO_DESTINATION = ("STG", "STS", "STL", "ST", "RED", "REDG", "BAR", "BRA", "EXIT", "RET", "CALL", "BSSY", "BSYNC",
                   "WARPSYNC", "NOP", "MEMBAR", "DEPBAR", "ERRBAR", "YIELD", "JMP", "BRX")


def _registers(operand: str, width: int = 1) -> Set[str]:
    """Register names (R<n>, P<n>) in an operand; a 64-bit pair R2.64 is R2 and R3."""
    names: Set[str] = set()
    for match in _REGISTER.finditer(operand):
        if match.group(2) is None:
            names.add(match.group(1))
            continue
        n = int(match.group(2))
        names.update(f"R{n + k}" for k in range(2 if match.group(3) else width))
    return names


def _width(op: str) -> int:
    return 4 if ".128" in op else (2 if ".64" in op or "WIDE" in op or "F64" in op else 1)


def thread_indexed_accesses(blocks: List[Block]) -> Set[int]:
    """Addresses (``Ins.addr``) of the global loads/stores whose address depends on the thread index: the
    element accesses, as opposed to loads every thread of a program makes from one address (a pointer table,
    a hyperparameter). A forward taint from ``S2R SR_TID`` over the control-flow graph (a register is
    thread-dependent after an instruction that read a thread-dependent register or predicate, on any path)."""
    preds: Dict[int, List[int]] = {b.idx: [] for b in blocks}
    for b in blocks:
        for s in b.succ:
            preds[s].append(b.idx)
    tainted_out: Dict[int, Set[str]] = {b.idx: set() for b in blocks}
    found: Set[int] = set()
    changed = True
    while changed:  # a fixed point: loops carry taint from their end to their start
        changed = False
        for block in blocks:
            tainted = set().union(set(), *(tainted_out[p] for p in preds[block.idx]))
            for ins in block.ins:
                _taint_step(ins, tainted, found)
            if tainted != tainted_out[block.idx]:
                tainted_out[block.idx] = tainted
                changed = True
    return found


def _taint_step(ins: Ins, tainted: Set[str], found: Set[int]) -> None:
    operands = [o.strip() for o in ins.args.split(",")] if ins.args else []
    if ins.base in ("LDG", "STG") and operands:
        address = operands[1] if ins.base == "LDG" and len(operands) > 1 else operands[0]
        if _registers(address) & tainted:
            found.add(ins.addr)
    if ins.base in _NO_DESTINATION or not operands:
        return
    n_dest = 2 if len(operands) > 1 and re.fullmatch(r"!?P[0-6T]", operands[1]) else 1
    destinations = set().union(*(_registers(o, _width(ins.op)) for o in operands[:n_dest]))
    sources = set().union(set(), *(_registers(o) for o in operands[n_dest:]))
    if ins.pred:
        sources |= _registers(ins.pred)
    if (ins.base == "S2R" and ("SR_TID" in ins.args or "SR_LANEID" in ins.args)) or sources & tainted:
        tainted |= destinations
    elif not ins.pred:  # a guarded write may not happen: keep what the register held
        tainted -= destinations


def _summary(block: Block) -> str:
    keys = Counter(i.op for i in block.ins
                   if i.base in ("LDG", "STG", "LDS", "STS", "LDL", "STL", "MUFU", "CALL", "BAR", "SHFL")
                   or i.op.startswith(("IMAD.WIDE", "IMAD.HI")))
    return ", ".join(f"{k}x{v}" for k, v in sorted(keys.items()))


def main(path: str) -> None:
    blocks = blocks_of(parse(open(path).read()))
    live = reachable(blocks)
    for b in blocks:
        tag = "" if b.idx in live else " (unreachable)"
        print(f"B{b.idx:<3} {b.start:05x} n={len(b.ins):<4} -> {b.succ}{' call ' + b.call if b.call else ''}"
              f" {b.labels}{tag}  {_summary(b)}")


if __name__ == "__main__":
    main(sys.argv[1])
