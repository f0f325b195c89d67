"""Loop trip counts: the per-kernel knowledge of the static report, in one place.

The SASS of a kernel tells which loops exist (back edges) and where they are in the source (line
info), not how often they run. A :class:`Rule` matches loops by their source line (regex on the
back-edge branch's line; ``via``: on the line of the call site an inlined helper was called from)
and computes iterations per entry from a :class:`Ctx` (the case geometry and the captured launch:
grid, threads, arguments). Rules are searched in order; the first match wins. A loop that no rule
matches is counted once and listed under ``unmatched_loops`` in the report: when a kernel changes,
add or fix a rule here (the report says which loop, file and line).

Triton ``for x in range(a, b[, step])`` loops whose bounds are plain kernel arguments or constants
need no rule: :func:`triton_range` evaluates them from the launch's arguments.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["Rule", "Ctx", "TRITON_RULES", "CUDA_RULES", "trips_for", "lane_strided"]


@dataclass
class Ctx:
    """What a rule sees: the case parameters and the launch."""

    p: Dict[str, Any]  # case geometry (static_cases.Case.params)
    grid: Tuple[int, ...]
    threads: int
    args: Any  # Triton: dict name -> value; CUDA: list of ints (struct arguments are meaningless)
    kernel: str  # Triton function name or CUDA kernel name (no namespace, no template arguments)
    tparams: Tuple[str, ...] = ()  # CUDA template arguments
    block: Tuple[int, int, int] = (0, 0, 0)

    @property
    def warps(self) -> int:
        return max(1, self.threads // 32)

    def a(self, key):
        return self.args[key]


@dataclass
class Rule:
    where: str
    trips: Callable[[Ctx], float]
    why: str
    via: str = ""
    kernel: str = ""


def lane_strided(total: float, threads: int, start_lane_of_warp: Optional[Sequence[int]] = None) -> float:
    """Average iterations per warp of ``for (i = threadIdx.x; i < total; i += threads)``: a warp runs
    until its last active lane is done (warps whose first lane is past ``total`` run 0 times)."""
    warps = max(1, threads // 32)
    starts = start_lane_of_warp or [32 * w for w in range(warps)]
    return sum(math.ceil((total - s) / threads) if total > s else 0 for s in starts) / len(starts)


# CUDA kernel arguments by position (see the kernels' signatures in csrc/cuda):
#   wattn_fwd_kernel(G, qkv, out, lse, nrb, kc, ncols, cap)
#   wattn_bwd_dq_kernel(G, qkv, dout, lse, delta, dqkv, drpb, dbias, scale, nrb, kc, ncols, cap, nslots)
#   wattn_bwd_dkdv_kernel(G, qkv, dout, lse, delta, dqkv, scale, nrb, kc, ncols, cap)
def _kc(c: Ctx) -> int:
    return c.args[{"wattn_fwd_kernel": 5, "wattn_bwd_dq_kernel": 10, "wattn_bwd_dkdv_kernel": 8}[c.kernel]]


def _ncols(c: Ctx) -> int:
    return c.args[{"wattn_fwd_kernel": 6, "wattn_bwd_dq_kernel": 11, "wattn_bwd_dkdv_kernel": 9}[c.kernel]]


def _vec(c: Ctx) -> int:
    return c.p["d"] * c.p["es"] // 16


def _rows_loop(rows: Callable[[Ctx], float]) -> Callable[[Ctx], float]:
    return lambda c: lane_strided(rows(c) * _vec(c), c.threads)


def _grid_stride_rows(rows_arg: int) -> Callable[[Ctx], float]:
    # for (r = blockIdx.x*blockDim.y + threadIdx.y; r < rows; r += gridDim.x*blockDim.y)
    return lambda c: max(1.0, c.args[rows_arg] / (c.grid[0] * c.block[1]))


def _vpr_loop(vpr: Callable[[Ctx], float]) -> Callable[[Ctx], float]:
    # for (v = threadIdx.x; v < vpr; v += blockDim.x): one x-row of the block covers vpr
    return lambda c: max(1.0, math.ceil(vpr(c) / c.block[0]))


def _tvec(c: Ctx) -> int:
    return int(c.tparams[1]) if len(c.tparams) > 1 and c.tparams[1].isdigit() else 1


CUDA_RULES: List[Rule] = [
    # ---- window attention (window_attention.cu, window_attention_bwd.cu, window_attention_common.cuh)
    Rule(r"for \(int n = threadIdx\.x; n < G\.N;", lambda c: lane_strided(c.p["N"], c.threads),
         "load_tokens: N tokens over the CTA's threads"),
    Rule(r"for \(int n = threadIdx\.x; n < cap;", lambda c: lane_strided(_ncols(c), c.threads),
         "lse/delta of cap = ncols rows over the CTA's threads"),
    Rule(r"for \(int i = threadIdx\.x; i < rows \* V;", _rows_loop(lambda c: c.warps * 16),
         "load_rows of the CTA's 16*warps row operand, d*es/16 vectors per row", via=r"row0, nwarps \* 16"),
    Rule(r"for \(int i = threadIdx\.x; i < rows \* V;", _rows_loop(_kc),
         "load_rows of a kc-row column chunk, d*es/16 vectors per row", via=r"c0, kcn"),
    Rule(r"for \(int c0 = 0; c0 < ncols; c0 \+= kc\)", lambda c: math.ceil(_ncols(c) / _kc(c)),
         "column chunks: ceil(ncols/kc) (kernel arguments)"),
    Rule(r"for \(int (kb|qb) = 0; (kb|qb) < kcn; (kb|qb) \+= kKB\)", lambda c: _kc(c) / 32,
         "32-column blocks of a chunk: kc/32"),
    Rule(r"for \(int kk = 0; kk < D; kk \+= 4\)", lambda c: c.p["d"] / 16,
         "fp32 FMA dot: d/4 steps, #pragma unroll 4: d/16 iterations"),
    Rule(r"for \(int i = lane; i < 16 \* V; i \+= 32\)", lambda c: math.ceil(16 * _vec(c) / 32),
         "store_rows_warp: 16 rows x d*es/16 vectors over 32 lanes"),
    Rule(r"for \(int win = slot; win < G\.nwin; win \+= nslots\)", lambda c: c.p["B"] * c.p["nW"] / c.args[13],
         "windows per window slot: nwin / nslots"),
    Rule(r"\(DET \? nwarps : 1\) \* G\.T", lambda c: lane_strided(c.p["T"], c.threads),
         "zero the shared rpb-gradient table (T entries)"),
    Rule(r"for \(int i = threadIdx\.x; i < G\.T; i \+= blockDim\.x\)", lambda c: lane_strided(c.p["T"], c.threads),
         "flush the rpb-gradient table (T entries)"),
    Rule(r"for \(int w = 0; w < nwarps; \+\+w\)", lambda c: c.warps, "per-warp tables summed: warps"),
    Rule(r"__fAtomicAdd", lambda c: 1.0, "shared fp32 atomicAdd compiles to a CAS loop: 1 try (no contention)"),
    Rule(r"for \(unsigned m = grp; m; m &= m - 1\)", lambda c: 1.0, "lanes of one table entry: ~1"),
    Rule(r"for \(int p = 0; p < nparts; \+\+p\)", lambda c: c.args[2], "partial sums: nparts (argument)"),
    # ---- token ops (tokens_cuda_kernels.cuh, mixing.cu)
    Rule(r"for \(int64_t r = int64_t\(blockIdx\.x\) \* blockDim\.y \+ threadIdx\.y; r < rows",
         _grid_stride_rows(3), "grid-stride rows: rows / (gridDim.x * blockDim.y)", kernel="gather_rows"),
    Rule(r"for \(int64_t v = threadIdx\.x; v < vpr; v \+= blockDim\.x\)", _vpr_loop(lambda c: c.args[4]),
         "vectors per row over blockDim.x", kernel="gather_rows"),
    Rule(r"for \(int64_t r = int64_t\(blockIdx\.x\) \* blockDim\.y \+ threadIdx\.y; r < rows",
         lambda c: max(1.0, c.p["rows"] / (c.grid[0] * c.block[1])),
         "grid-stride rows: rows / (gridDim.x * blockDim.y)"),
    Rule(r"for \(int64_t t = int64_t\(blockIdx\.x\) \* blockDim\.y \+ threadIdx\.y; t < tasks",
         lambda c: max(1.0, c.args[-1] * c.p["L"] / (c.grid[0] * c.block[1])),
         "grid-stride tasks: n_chunks*L / (gridDim.x * blockDim.y)"),
    Rule(r"for \(int64_t v = threadIdx\.x; v < vpr; v \+= blockDim\.x\)",
         _vpr_loop(lambda c: c.p["C"] / _tvec(c)), "C/VEC vectors per row over blockDim.x"),
    Rule(r"for \(int64_t b = b0; b < b1; \+\+b\)", lambda c: c.args[-2], "images per chunk (argument chunk)"),
    Rule(r"for \(int64_t r = r0 \+ threadIdx\.y; r < r1; r \+= kColY\)",
         lambda c: max(1.0, min(c.args[3], c.args[1]) / 8), "rows of a segment over 8 row lanes: seg/8"),
    # ---- losses (losses.cu)
    Rule(r"for \(int w = 0; w < warps; \+\+w\) s \+= smem\[w\]", lambda c: c.warps, "block_sum over warps"),
]


def _rng(*a):
    return range(*[int(x) for x in a])


def triton_range(site_text: str, args: Dict[str, Any]) -> Optional[Tuple[float, str]]:
    """Trip count of ``for x in range(...)`` when its bounds are kernel arguments/constants only."""
    m = re.search(r"\bin\s+(?:tl\.)?range\((.*)\)\s*:", site_text)
    if not m:
        return None
    expr = "range(" + m.group(1) + ")"
    env = {k: v for k, v in args.items() if isinstance(v, (int, bool))}
    try:
        tree = ast.parse(expr, mode="eval")
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - {"range", "tl"}
        if not names <= set(env):
            return None
        code = compile(expr.replace("tl.range(", "range("), "<loop>", "eval")
        r = eval(code, {"__builtins__": {}, "range": _rng, "tl": _TL}, env)  # noqa: S307 - names checked above
        return float(len(r)), f"range evaluated from the launch arguments: len({expr}) = {len(r)}"
    except Exception:  # noqa: BLE001 - not evaluable: left to the rules
        return None


class _TL:
    minimum = staticmethod(min)
    maximum = staticmethod(max)
    cdiv = staticmethod(lambda a, b: -(-a // b))


TRITON_RULES: List[Rule] = [
    # window_attention.py backward: program (chunk, head) loops over its windows
    Rule(r"for w in range\(c \* WPP", lambda c: c.a("BNW") / c.grid[0], "windows per program: BNW / chunks"),
    # deterministic coords path: the box of table rows / cols a tile touches (upper bound)
    Rule(r"for y in range\(tl\.min\(tl\.where\(live, ty", lambda c: 2 * c.a("WH") - 1, "table rows: <= 2*WH-1"),
    Rule(r"for x in range\(tl\.min\(tl\.where\(row, tx", lambda c: 2 * c.a("WW") - 1, "table cols: <= 2*WW-1"),
    # mixing.py unmix backward: images per chunk
    Rule(r"for b in range\(b0, b1\)", lambda c: c.a("B_CHUNK"), "images per chunk: B_CHUNK"),
]


def trips_for(rules: Sequence[Rule], ctx: Ctx, site, triton: bool) -> Tuple[Optional[float], str]:
    """(iterations per entry, how it was derived) for a loop at ``site`` (a static_sass.LoopSite)."""
    if site is None:
        return None, "unmatched: no line info"
    via = site.chain[0][2] if site.chain else ""
    for r in rules:
        if r.kernel and not re.search(r.kernel, ctx.kernel):
            continue
        if re.search(r.where, site.text) and (not r.via or re.search(r.via, via)):
            try:
                return float(r.trips(ctx)), r.why
            except (KeyError, IndexError, TypeError, ZeroDivisionError) as e:
                return None, f"rule '{r.why}' failed: {type(e).__name__}: {e}"
    if triton and isinstance(ctx.args, dict):
        got = triton_range(site.text, ctx.args)
        if got:
            return got
    return None, "unmatched: counted once"
