"""SASS of a cubin -> per-function control-flow graph, loops, and instructions EXECUTED per warp.

``nvdisasm -c -gi`` prints every function's SASS with source lines (and the inlining chain) as
comments. We split it into basic blocks (leaders: the entry, branch targets, the instruction after
a branch or exit), build the CFG from the branches (``BRA`` with or without a predicate, ``EXIT``,
``RET``; ``CALL`` falls through: callees are slow paths such as IEEE division), compute dominators
over the blocks reachable from the entry, and find natural loops from back edges (an edge to a
block that dominates its source). A loop is identified by the source line of its back-edge branch
(``LoopSite``) so that a per-kernel descriptor can supply its trip count (iterations per entry).

Executed instructions per warp = sum over reachable blocks of (instructions in the block) x
(product of the trip counts of the loops around it). Every reachable block counts once per
iteration of its loops: both sides of an if/else and predicated-off paths are counted (an upper
bound where a warp skips a branch; the kernels here are mostly straight-line between loops).
"""
from __future__ import annotations

import linecache
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["Instr", "Block", "Loop", "LoopSite", "Function", "disassemble", "parse", "weigh", "classify",
           "enclosing_loop",
           "hmma_flops", "inflight_bytes", "access_bytes"]

_FUNC = re.compile(r"^//-+ \.text\.(\S+)\s+-+")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_\w+|\$[\w$.]+):")
_LOC = re.compile(r'"([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\(([^)]+)\)")


@dataclass
class Instr:
    addr: int
    pred: str  # "" or "@P0" / "@!P1" ...
    op: str  # full opcode with modifiers, e.g. "MUFU.EX2"
    args: str
    loc: Tuple[Tuple[str, int], ...] = ()  # innermost first: ((file, line), (call-site file, line), ...)

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]


@dataclass
class Block:
    index: int
    instrs: List[Instr]
    succ: List[int] = field(default_factory=list)
    pred: List[int] = field(default_factory=list)


@dataclass
class LoopSite:
    """Where a loop is in the source: the back-edge branch's line and its inlining chain."""

    file: str
    line: int
    text: str
    chain: Tuple[Tuple[str, int, str], ...] = ()  # outer frames: (file, line, text)

    def __str__(self) -> str:
        import os

        s = f"{os.path.basename(self.file)}:{self.line} `{self.text.strip()[:60]}`"
        if self.chain:
            f, ln, _ = self.chain[0]
            s += f" (inlined at {os.path.basename(f)}:{ln})"
        return s


@dataclass
class Loop:
    header: int
    body: frozenset
    site: Optional[LoopSite]
    parent: Optional[int] = None  # index into Function.loops
    trips: float = 1.0
    why: str = "unmatched: counted once"
    matched: bool = False


@dataclass
class Function:
    name: str
    blocks: List[Block]
    loops: List[Loop]
    reachable: frozenset
    irreducible: int = 0  # edges to an earlier block that does not dominate the source

    def static_count(self) -> int:
        return sum(len(b.instrs) for b in self.blocks if b.index in self.reachable and not _padding(b))


def disassemble(cubin_path: str, nvdisasm: Optional[str] = None, keep: bool = True) -> str:
    """``nvdisasm -c -gi`` of a cubin; with ``keep`` the listing is saved next to it (``.sass``)."""
    import os

    saved = cubin_path + ".sass"
    if keep and os.path.exists(saved) and os.path.getmtime(saved) >= os.path.getmtime(cubin_path):
        with open(saved) as f:
            return f.read()
    if nvdisasm is None:
        from .aot import tool

        nvdisasm = tool("nvdisasm")
    r = subprocess.run([nvdisasm, "-c", "-gi", cubin_path], capture_output=True, text=True)
    if r.returncode != 0:  # line info can be absent or odd: fall back to plain SASS
        r = subprocess.run([nvdisasm, "-c", cubin_path], capture_output=True, text=True, check=True)
    if keep:
        try:
            with open(saved + ".tmp", "w") as f:
                f.write(r.stdout)
            os.replace(saved + ".tmp", saved)
        except OSError:
            pass
    return r.stdout


def _split_functions(text: str) -> Dict[str, List[str]]:
    funcs: Dict[str, List[str]] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        if line.startswith("//----"):  # SYMBOLS and other non-code sections
            cur = None
            continue
        if cur is not None:
            cur.append(line)
    return funcs


def _instructions(lines: Sequence[str]):
    """Yield (labels before it, Instr)."""
    loc: Tuple[Tuple[str, int], ...] = ()
    fresh = True  # the first //## line after an instruction carries the full inlining chain
    labels: List[str] = []
    for line in lines:
        s = line.strip()
        if s.startswith("//##"):
            if fresh:
                loc = tuple((f, int(n)) for f, n in _LOC.findall(s))
                fresh = False
            continue
        m = _LABEL.match(s)
        if m:
            labels.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2).rstrip(" ;")
        pred = ""
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        op, _, args = body.partition(" ")
        yield labels, Instr(int(m.group(1), 16), pred, op, args.strip(), loc)
        labels, fresh = [], True


def _is_branch(i: Instr) -> bool:
    return i.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET")


def _padding(b: Block) -> bool:
    return all(i.base == "NOP" for i in b.instrs)


def parse(text: str, only=None) -> Dict[str, Function]:
    """Every function (or those named in ``only``) of an ``nvdisasm -c -gi`` listing, with CFG and
    loops (trip counts 1)."""
    out = {}
    for name, lines in _split_functions(text).items():
        if only is None or name in only:
            out[name] = _function(name, list(_instructions(lines)))
    return out


def _function(name: str, items) -> Function:
    instrs = [i for _, i in items]
    label_at: Dict[str, int] = {}
    for k, (labels, _) in enumerate(items):
        for lb in labels:
            label_at[lb] = k
    leaders = {0}
    for k, (labels, ins) in enumerate(items):
        if labels:
            leaders.add(k)
        if _is_branch(ins):
            if k + 1 < len(items):
                leaders.add(k + 1)
            t = _TARGET.search(ins.args)
            if t and t.group(1) in label_at:
                leaders.add(label_at[t.group(1)])
    starts = sorted(leaders)
    block_of = {}
    blocks: List[Block] = []
    for bi, s in enumerate(starts):
        e = starts[bi + 1] if bi + 1 < len(starts) else len(instrs)
        blocks.append(Block(bi, instrs[s:e]))
        for k in range(s, e):
            block_of[k] = bi
    for b in blocks:
        if not b.instrs:
            continue
        last = b.instrs[-1]
        nxt = b.index + 1 if b.index + 1 < len(blocks) else None
        if _is_branch(last):
            t = _TARGET.search(last.args)
            if last.base in ("BRA", "JMP") and t and t.group(1) in label_at:
                b.succ.append(block_of[label_at[t.group(1)]])
            elif last.base in ("BRX", "JMX"):  # indirect: assume any labelled block in the function
                b.succ.extend(block_of[k] for k in label_at.values())
            if last.pred and nxt is not None:
                b.succ.append(nxt)
        elif nxt is not None:
            b.succ.append(nxt)
        b.succ = sorted(set(b.succ))
    for b in blocks:
        for s in b.succ:
            blocks[s].pred.append(b.index)
    reach = _reachable(blocks)
    dom = _dominators(blocks, reach)
    loops: Dict[int, set] = {}
    back_src: Dict[int, int] = {}
    irreducible = 0
    for b in blocks:
        if b.index not in reach:
            continue
        for s in b.succ:
            if s in dom[b.index]:  # back edge b -> s
                body = loops.setdefault(s, {s})
                _grow(blocks, body, b.index, s)
                back_src[s] = max(back_src.get(s, -1), b.index)
            elif s <= b.index:
                irreducible += 1
    lst = []
    for h in sorted(loops):
        br = blocks[back_src[h]].instrs[-1]
        lst.append(Loop(h, frozenset(loops[h]), _site(br) or _site_of_block(blocks[h])))
    for i, lp in enumerate(lst):  # parent: the smallest other loop whose body contains this header
        cands = [j for j, o in enumerate(lst) if j != i and lp.header in o.body and lp.body <= o.body]
        if cands:
            lp.parent = min(cands, key=lambda j: len(lst[j].body))
    return Function(name, blocks, lst, frozenset(reach), irreducible)


def _reachable(blocks: List[Block]) -> set:
    seen, stack = set(), [0] if blocks else []
    while stack:
        b = stack.pop()
        if b in seen:
            continue
        seen.add(b)
        stack.extend(blocks[b].succ)
    return seen


def _dominators(blocks: List[Block], reach: set) -> Dict[int, set]:
    nodes = sorted(reach)
    dom = {n: set(nodes) for n in nodes}
    if not nodes:
        return dom
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for n in nodes[1:]:
            ps = [p for p in blocks[n].pred if p in reach]
            new = set.intersection(*(dom[p] for p in ps)) if ps else set()
            new = new | {n}
            if new != dom[n]:
                dom[n], changed = new, True
    return dom


def _grow(blocks: List[Block], body: set, tail: int, header: int) -> None:
    stack = [tail]
    while stack:
        n = stack.pop()
        if n in body:
            continue
        body.add(n)
        stack.extend(p for p in blocks[n].pred if p != header)


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def source_path(path: str) -> str:
    """``path`` as recorded in a binary's line info, or the same repository-relative file in this
    checkout when it is gone: the compile cache is keyed by source content, so a hit may carry the
    path of another (since deleted) checkout of identical sources."""
    if os.path.exists(path):
        return path
    for top in ("/mixkernels/", "/csrc/", "/tests/"):
        k = path.rfind(top)
        if k >= 0 and os.path.exists(_REPO + path[k:]):
            return _REPO + path[k:]
    return path


def _text(path: str, line: int) -> str:
    return linecache.getline(source_path(path), line).rstrip("\n")


def _site(i: Instr) -> Optional[LoopSite]:
    if not i.loc:
        return None
    (f, ln), outer = i.loc[0], i.loc[1:]
    return LoopSite(f, ln, _text(f, ln), tuple((of, ol, _text(of, ol)) for of, ol in outer))


_LOOP_HEAD = re.compile(r"^\s*(?:\}\s*)?(?:for|while|do)\b")


def _code(line: str, python: bool) -> str:
    """``line`` without its comment and string literals (brace and indent scanning only)."""
    line = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', line)
    k = line.find("#" if python else "//")
    return line if k < 0 else line[:k]


def enclosing_loop(site: Optional[LoopSite], reach: int = 400) -> Optional[LoopSite]:
    """The loop statement a back edge belongs to, found from the source's structure when the compiler
    put the back edge on another line of the loop (its closing brace, the body's last statement).

    C/C++: a line starting with ``}`` resolves to the statement its brace closes; any other line to the
    innermost enclosing ``{`` block whose statement is a ``for``/``while``/``do``. Python (Triton):
    the innermost less-indented ``for``/``while`` above the line. None when ``site`` already is a loop
    statement or no loop encloses it. The inlining chain is kept."""
    if site is None or _LOOP_HEAD.match(site.text):
        return None
    path = source_path(site.file)
    python = path.endswith(".py")
    lines = [_text(path, n) for n in range(max(1, site.line - reach), site.line + 1)]
    first = site.line - len(lines) + 1
    if python:
        cur = _code(site.text, True)
        indent = len(cur) - len(cur.lstrip()) if cur.strip() else 1 << 30
        for n in range(len(lines) - 2, -1, -1):
            code = _code(lines[n], True)
            if not code.strip():
                continue
            ind = len(code) - len(code.lstrip())
            if ind < indent:
                if re.match(r"\s*(for|while)\b", code):
                    return LoopSite(site.file, first + n, lines[n], site.chain)
                indent = ind
        return None
    closing = _code(site.text, False).strip().startswith("}") and "{" not in _code(site.text, False)
    depth = 0
    for n in range(len(lines) - 1, -1, -1):
        code = _code(lines[n], False)
        for ch in reversed(code):
            if ch == "}":
                depth += 1
            elif ch == "{":
                depth -= 1
                target = 0 if closing else -1
                if depth == target:
                    # the statement owning this brace: its line, or the line above for a lone `{`
                    m = n if code.strip() != "{" or n == 0 else n - 1
                    if _LOOP_HEAD.match(lines[m]):
                        return LoopSite(site.file, first + m, lines[m], site.chain)
                    if closing:
                        return None
                    depth = 0  # not a loop: look further out
    return None


def _site_of_block(b: Block) -> Optional[LoopSite]:
    for i in b.instrs:
        s = _site(i)
        if s:
            return s
    return None


# ----------------------------------------------------------------------------- weighting


def outer_sites(fn: Function, lp: Loop) -> List[Optional[LoopSite]]:
    """The sites of the loops enclosing ``lp``, innermost first."""
    out, j = [], lp.parent
    while j is not None:
        out.append(fn.loops[j].site)
        j = fn.loops[j].parent
    return out


def weigh(fn: Function, trips: Callable[[Loop], Tuple[Optional[float], str]]) -> Dict[str, float]:
    """Set each loop's trip count from ``trips(loop) -> (iterations per entry or None, why)`` and
    return the instructions a warp executes: ``total`` and per class (see :func:`classify`).

    Counted along the heaviest path: each loop (innermost first) becomes one node costing
    trips x its heaviest header-to-latch path, then the heaviest entry-to-anywhere path of the
    function. An if/else counts its heavier side; an if without else counts its body (upper bound);
    loop copies on exclusive paths (versioning) count once, copies in sequence (unrolling) each.
    """
    for lp in fn.loops:
        t, why = trips(lp)
        lp.matched = t is not None
        lp.trips, lp.why = (float(t), why) if t is not None else (1.0, why or "unmatched: counted once")
    _split_unrolled(fn)
    block_cost = {b.index: _cost(b) for b in fn.blocks if b.index in fn.reachable}
    depth = {}
    for i, lp in enumerate(fn.loops):
        d, j = 0, lp.parent
        while j is not None:
            d, j = d + 1, fn.loops[j].parent
        depth[i] = d
    owner: Dict[int, int] = {}  # block -> innermost loop index
    for i in sorted(range(len(fn.loops)), key=lambda i: depth[i]):
        for b in fn.loops[i].body:
            owner[b] = i
    loop_cost: Dict[int, Dict[str, float]] = {}
    for i in sorted(range(len(fn.loops)), key=lambda i: -depth[i]):  # innermost first
        lp = fn.loops[i]
        path = _heaviest(fn, lp.body, lp.header, i, owner, block_cost, loop_cost)
        loop_cost[i] = {k: v * lp.trips for k, v in path.items()}
    top = _heaviest(fn, fn.reachable, 0, None, owner, block_cost, loop_cost) if fn.blocks else {}
    out = {"total": 0.0}
    out.update(top)
    return out


def _cost(b: Block) -> Dict[str, float]:
    c: Dict[str, float] = {}
    if _padding(b):
        return c
    for ins in b.instrs:
        c["total"] = c.get("total", 0.0) + 1
        for k in classify(ins):
            c[k] = c.get(k, 0.0) + 1
        if ins.base in ("HMMA", "HGMMA"):
            c["mma_flops"] = c.get("mma_flops", 0.0) + hmma_flops(ins.op)
            if ins.base == "HMMA":
                c["mma_sync"] = c.get("mma_sync", 0.0) + 1
                c["mma_sync_flops"] = c.get("mma_sync_flops", 0.0) + hmma_flops(ins.op)
        if ins.base in ("LDG", "STG", "ATOMG", "RED", "REDG", "LDGSTS"):  # bytes requested, all lanes on
            c["global_bytes"] = c.get("global_bytes", 0.0) + 32 * access_bytes(ins)
    return c


def _heaviest(fn: Function, region, entry: int, loop: Optional[int], owner, block_cost, loop_cost):
    """Heaviest path from ``entry`` through ``region`` (blocks of a loop body, or the function), with
    the loops directly inside the region collapsed into single nodes."""

    def node(b):  # the region-level node of block b: itself, or the outermost loop inside the region
        i = owner.get(b)
        top = None
        while i is not None and i != loop:
            top, i = i, fn.loops[i].parent
        return ("L", top) if top is not None else ("B", b)

    nodes, succ = set(), {}
    for b in region:
        if b not in fn.reachable:
            continue
        u = node(b)
        nodes.add(u)
        for s in fn.blocks[b].succ:
            if s not in region or s not in fn.reachable or s == entry:
                continue  # leaves the region, or the back edge to this region's header
            v = node(s)
            if v != u:
                succ.setdefault(u, set()).add(v)
    indeg = {n: 0 for n in nodes}
    for u in succ:
        for v in succ[u]:
            indeg[v] += 1
    cost = {n: (loop_cost.get(n[1], {}) if n[0] == "L" else block_cost.get(n[1], {})) for n in nodes}
    start = node(entry)
    best = {start: dict(cost[start])}
    order, ready = [], [n for n in nodes if indeg[n] == 0]
    while ready:  # Kahn; nodes left over sit on an irreducible cycle and are ignored
        u = ready.pop()
        order.append(u)
        for v in succ.get(u, ()):
            indeg[v] -= 1
            if indeg[v] == 0:
                ready.append(v)
    for u in order:
        if u not in best:
            continue
        for v in succ.get(u, ()):
            cand = best[u].get("total", 0.0) + cost[v].get("total", 0.0)
            if v not in best or cand > best[v].get("total", 0.0):
                merged = dict(best[u])
                for k, x in cost[v].items():
                    merged[k] = merged.get(k, 0.0) + x
                best[v] = merged
    return max(best.values(), key=lambda c: c.get("total", 0.0)) if best else {}


def _split_unrolled(fn: Function) -> None:
    """ptxas unrolls a runtime-count loop into copies (e.g. x4 body + x1 remainder), each a SASS loop
    with the same source line. Give each copy its share of the source trip count: unroll factor ~
    body size / smallest copy's body size, the largest factor takes as many whole steps as fit."""
    groups: Dict[tuple, List[Loop]] = {}
    for lp in fn.loops:
        if lp.site is not None and lp.matched:
            key = (lp.site.file, lp.site.line, lp.site.chain, lp.parent)
            groups.setdefault(key, []).append(lp)
    for lps in groups.values():
        if len(lps) < 2:
            continue
        size = {id(lp): sum(len(fn.blocks[b].instrs) for b in lp.body) for lp in lps}
        small = max(1, min(size.values()) - 2)  # ~2 instructions of loop control per copy
        if max(round((v - 2) / small) for v in size.values()) <= 1:
            continue  # same-size copies: inlined instances or versions, each runs the full count
        left = lps[0].trips
        for lp in sorted(lps, key=lambda x: -size[id(x)]):
            u = max(1, round((size[id(lp)] - 2) / small))
            it = left if u == 1 else float(int(left // u))
            left -= it * u
            lp.trips, lp.why = it, f"{lp.why}; unrolled copy x{u}: {it:g} iterations"


_CLASSES = {
    "MUFU": "mufu", "HMMA": "mma", "HGMMA": "mma", "LDG": "ldg", "STG": "stg", "LDS": "lds", "LDSM": "lds",
    "STS": "sts", "STSM": "sts", "LDL": "ldl", "STL": "stl", "ATOMG": "atomic", "RED": "atomic", "REDG": "atomic",
    "ATOM": "atomic", "ATOMS": "atomic_smem", "MEMBAR": "membar", "CCTL": "cctl", "BAR": "bar", "SHFL": "shfl",
    "FFMA": "fp32", "FADD": "fp32", "FMUL": "fp32", "FMNMX": "fp32", "FSEL": "fp32", "FSETP": "fp32",
    "F2FP": "convert", "F2F": "convert", "I2F": "convert", "F2I": "convert", "I2FP": "convert",
    "LDGSTS": "ldg", "UTMALDG": "ldg", "UBLKCP": "ldg",
}


def classify(ins: Instr) -> List[str]:
    """Instruction classes counted in the report (an instruction may be in none)."""
    c = _CLASSES.get(ins.base)
    out = [c] if c else []
    if ins.base in ("IMAD", "IADD3", "LEA", "LOP3", "SHF", "ISETP", "IABS", "SEL", "VIADD", "IMNMX", "PRMT",
                    "MOV", "IMAD.WIDE", "SHL", "SHR", "UIADD3", "UIMAD", "ULOP3", "USHF", "ULEA", "UMOV", "P2R",
                    "R2P", "SGXT", "USGXT", "POPC", "FLO", "BMSK"):
        out.append("int")
    if c == "mufu":
        out.append("mufu." + ins.op.split(".")[1].lower() if "." in ins.op else "mufu.other")
    if c == "membar" and (".GPU" in ins.op or ".SYS" in ins.op):
        out.append("membar_gpu")
    return out


def hmma_flops(op: str) -> float:
    """FLOPs per warp of one MMA instruction: HMMA.MNK (one warp) or HGMMA.MxNxK (a warpgroup of 4), in
    16-bit-rate FLOPs: TF32 products run at half the fp16/bf16 tensor rate on sm_80/sm_90 (H100 SXM dense:
    494 against 989 TFLOP/s), so they count twice."""
    parts = op.split(".")
    rate = 2.0 if "TF32" in parts else 1.0
    if parts[0] == "HGMMA":
        m = re.match(r"(\d+)x(\d+)x(\d+)", parts[1])
        return rate * 2.0 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) / 4 if m else 0.0
    shape = parts[1] if len(parts) > 1 else ""
    table = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32), "8832": (8, 8, 32)}
    if shape in table:
        m_, n_, k_ = table[shape]
        return rate * 2.0 * m_ * n_ * k_
    return 0.0


_REG = re.compile(r"\bR(\d+)\b")
_GLOBAL_LOADS = ("LDG", "LDGSTS")


def access_bytes(ins: Instr) -> int:
    """Bytes per lane of a memory instruction, from its width modifier (default 32 bit)."""
    mods = ins.op.split(".")[1:]
    for m, b in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if m in mods:
            return b
    return 4


def inflight_bytes(fn: Function) -> float:
    """Largest number of global-load bytes one warp has in flight: within a basic block, loads issued
    before any instruction reads one of their destination registers (or a barrier / cp.async wait).
    The memory term of the model uses it for Little's law (bytes in flight per SM)."""
    best = 0.0
    for b in fn.blocks:
        if b.index not in fn.reachable:
            continue
        pending: Dict[int, int] = {}  # register -> bytes
        total = 0
        for ins in b.instrs:
            if ins.base in ("BAR", "DEPBAR", "WARPSYNC", "MEMBAR"):
                best, pending, total = max(best, total), {}, 0
                continue
            ops = [o.strip() for o in ins.args.split(",")]
            srcs = " ".join(ops[1:]) if ops else ""
            if pending and any(int(r) in pending for r in _REG.findall(srcs + " " + ins.pred)):
                best, pending, total = max(best, total), {}, 0
            if ins.base in _GLOBAL_LOADS:
                nb = access_bytes(ins) * 32
                total += nb
                m = _REG.match(ops[0]) if ops and ins.base == "LDG" else None
                if m:
                    first = int(m.group(1))
                    for r in range(first, first + max(1, access_bytes(ins) // 4)):
                        pending[r] = nb
        best = max(best, total)
    return best
