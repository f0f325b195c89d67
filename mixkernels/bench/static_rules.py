"""Loop trip counts: the per-kernel knowledge of the static report, in one place.

The SASS of a kernel tells which loops exist (back edges) and where they are in the source (line
info), not how often they run. A :class:`Rule` matches loops by their source line (regex on the
back-edge branch's line; ``via``: on the line of the call site an inlined helper was called from)
and computes iterations per entry from a :class:`Ctx` (the case geometry and the captured launch:
grid, threads, arguments). Rules are searched in order; the first match wins. A loop that no rule
matches is counted once and listed under ``unmatched_loops`` in the report: when a kernel changes,
add or fix a rule here (the report says which loop, file and line).

Triton ``for x in range(a, b[, step])`` loops whose bounds are plain kernel arguments or constants
need no rule: :func:`triton_range` evaluates them from the launch's arguments. The Triton kernels'
rules are in ``static_rules_triton.py``, the CUDA kernels' here.

The fused CUDA window-attention kernels' loops depend on the data (windows per pack, segments,
key blocks per tile): their rules take them from ``wattn_workload.py``, which emulates the
launch plan and the pack prologue on the case's masks. ``tests/test_static.py`` checks that every loop of the attention sources has a rule.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["Rule", "Ctx", "TRITON_RULES", "CUDA_RULES", "trips_for", "lane_strided", "triton_range"]


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
    after: str = ""  # regex on the next 3 source lines: tells loops with the same header apart
    # stands in for ``via`` when the line info has no inlining call sites (Triton 3.6, the GPU machine's):
    # a regex on the enclosing loops' source lines, innermost first, joined by " | "; TOP for none
    inside: str = ""


TOP = "<top>"  # ``Rule.inside`` for a loop no other loop encloses


def _after(site) -> str:
    import linecache

    from .static_sass import source_path

    return "\n".join(linecache.getline(source_path(site.file), site.line + k).rstrip("\n") for k in (1, 2, 3))


def lane_strided(total: float, threads: int, start_lane_of_warp: Optional[Sequence[int]] = None) -> float:
    """Average iterations per warp of ``for (i = threadIdx.x; i < total; i += threads)``: a warp runs
    until its last active lane is done (warps whose first lane is past ``total`` run 0 times)."""
    warps = max(1, threads // 32)
    starts = start_lane_of_warp or [32 * w for w in range(warps)]
    return sum(math.ceil((total - s) / threads) if total > s else 0 for s in starts) / len(starts)


# Legacy CUDA kernels (window_attention_legacy*.cu: float32, attn_bias gradients, head_dim 128
# backward, shapes the fused kernels do not fit), arguments by position:
#   wattn_fwd_kernel(G, qkv, out, lse, nrb, kc, ncols, cap)
#   wattn_bwd_dq_kernel(G, qkv, dout, lse, delta, dqkv, drpb, dbias, dls, scale, nrb, kc, ncols, cap, nslots)
#   wattn_bwd_dkdv_kernel(G, qkv, dout, lse, delta, dqkv, scale, nrb, kc, ncols, cap)
_LEGACY = r"legacy::"
_FUSED = r"^wattn_(fwd|bwd|fwd_plan)_kernel$"  # the plan kernel runs the forward's prologue per pack position
_LEGACY_NARGS = {"wattn_fwd_kernel": 8, "wattn_bwd_dq_kernel": 15, "wattn_bwd_dkdv_kernel": 11}


def _legacy_arg(c: Ctx, pos: Dict[str, int]) -> int:
    name = c.kernel.split("::")[-1]
    if len(c.args) != _LEGACY_NARGS[name]:  # a changed signature must not shift positions silently
        raise IndexError(f"{name} has {len(c.args)} arguments, the rules expect {_LEGACY_NARGS[name]}")
    return c.args[pos[name]]


def _kc(c: Ctx) -> int:
    return _legacy_arg(c, {"wattn_fwd_kernel": 5, "wattn_bwd_dq_kernel": 11, "wattn_bwd_dkdv_kernel": 8})


def _ncols(c: Ctx) -> int:
    return _legacy_arg(c, {"wattn_fwd_kernel": 6, "wattn_bwd_dq_kernel": 12, "wattn_bwd_dkdv_kernel": 9})


def _vec(c: Ctx) -> int:
    return c.p["d"] * c.p["es"] // 16


def _rows_loop(rows: Callable[[Ctx], float]) -> Callable[[Ctx], float]:
    return lambda c: lane_strided(rows(c) * _vec(c), c.threads)


def _utx(c: Ctx) -> int:
    """uniform_backward_kernel's channel vectors per CTA row: min(C/VEC, threads)."""
    return int(min(c.p["C"] // _tvec(c), c.threads))


_UNMIX = r"^unmix_(backward|reduce)_kernel$"


def _uslices(c: Ctx) -> int:
    """Row slices of unmix backward: ceil(C/VEC / tx)."""
    return math.ceil(c.p["C"] // _uvec(c) / c.block[0])


def _uchunks(c: Ctx) -> int:
    """Image chunks of unmix backward: gridDim.y of the main kernel, else mixing.cu's unmix_chunks."""
    if c.kernel == "unmix_backward_kernel":
        return c.grid[1]
    B, L, ty = c.p["B"], c.p["L"], c.block[1]
    n = min(math.ceil(264 / (L * _uslices(c))), math.ceil(B / ty))
    return math.ceil(B / math.ceil(B / n)) if n > 1 else 1


def _ulanes(c: Ctx) -> int:
    return max(1, c.threads // (c.block[0] * _uvec(c)))


def _uvec(c: Ctx) -> int:
    """VEC of unmix_backward_kernel<T, VEC> / unmix_reduce_kernel<VEC>."""
    return _tvec(c) if c.kernel == "unmix_backward_kernel" else int(c.tparams[0])


_UNIFORM = r"^uniform_(backward|reduce)_kernel$"


def _usegs(c: Ctx) -> int:
    """Token segments of uniform backward: gridDim.x of the main kernel, argument segs of the reduce."""
    return c.grid[0] if c.kernel == "uniform_backward_kernel" else int(c.args[4])


def _tvec(c: Ctx) -> int:
    return int(c.tparams[1]) if len(c.tparams) > 1 and c.tparams[1].isdigit() else 1


# ---- fused CUDA window attention (window_attention_fwd.cuh / _bwd.cu / _common.cuh): the trip counts come
# from the launch plan and the pack prologue emulated on the case's masks (wattn_workload.py).
# Nested loops get per-entry averages (totals over all
# packs divided by the enclosing loop's total), so the weighted counts are the totals' averages per
# warp; thread-0 loops (tile ranges, assign_items) count 1/8 per warp.
def _fused(c: Ctx) -> Dict[str, Any]:
    """Plan + workload of the call, checked against the captured launch (grid = CTAs)."""
    from . import wattn_workload as ww

    p = c.p
    kind = "fwd" if "fwd" in c.kernel else "bwd"
    pl = ww.plan(kind, p["B"], p["H"], p["W"], p["heads"], p["d"], p["window"], p["window"], p["r"], p["r"],
                 p["es"], True, bool(p.get("deterministic", False)), cosine=bool(p.get("cosine", False)),
                 coords=bool(p.get("coords", False)))
    if c.kernel == "wattn_fwd_plan_kernel":  # one CTA per pack position (image 0's packs)
        if pl["ppi"] != c.grid[0]:
            raise ValueError(f"plan positions {pl['ppi']} != captured grid {c.grid[0]}")
    elif pl["nslots"] * pl["nhg"] != c.grid[0]:
        raise ValueError(f"plan {pl['nslots']} x {pl['nhg']} CTAs != captured grid {c.grid[0]}")
    if c.kernel == "wattn_fwd_kernel" and len(c.tparams) > 5 and (c.tparams[5] == "true") != (pl["ppi"] > 0):
        raise ValueError(f"captured PLAN={c.tparams[5]}, modelled packs per image {pl['ppi']}")
    wl = ww.attention_workload(p["B"], p["H"], p["W"], p["window"], p["shift"], bool(p["group"]))
    items = wl["tiles"]  # work items per call: 16-row tiles (the backward runs both passes of a tile in one item)
    return dict(pl, **wl, kind=kind, items=items, per_pack=lambda f: sum(f(n) * k for n, k in wl["nvalid"].items())
                / wl["packs"])


def _one(c: Ctx) -> bool:
    """wattn_fwd_kernel's ONE (one-window packs) template argument."""
    return len(c.tparams) > 4 and c.tparams[4] == "true"


def _eight(c: Ctx) -> bool:
    """Whether wattn_fwd_kernel has its 8-key tail loop (window_attention_fwd.cuh, kEight on sm_90): a
    one-window (one CTA per SM, fwd_two_ctas), non-cosine kernel (T, D, BIAS, ABIAS, ONE, PLAN, COS);
    elsewhere the masked 16-key loop takes those tails (at end - 8)."""
    t = c.tparams
    return len(t) >= 7 and _one(c) and t[6] != "true"


def _pairs(c: Ctx) -> bool:
    """Whether wattn_fwd_kernel walks pair units (window_attention_fwd.cuh, fwd_pack's kPairs): one-window
    kernels (T, D, BIAS, ABIAS, ONE, ...) at head_dim <= 32 without attn_bias."""
    return _one(c) and int(c.tparams[1]) <= 32 and c.tparams[3] != "true"


def _units(w: Dict[str, Any], c: Ctx, which: str) -> Tuple[Counter, int]:
    """(blocks walked, units) of fwd_unit's pair ("p") or single ("s") units (wattn_workload's u32p /
    u32s); without pairs every tile is a single unit."""
    if not _pairs(c):
        return (w["c32"], w["ftiles"]) if which == "s" else (Counter(), 0)
    u = w["u32" + which]
    return u, u["n"]


# fwd_unit's walk (one-window packs): one loop per block kind; (loop header, blocks per walk from a
# Counter of (width, masked) blocks, what)
_WALK: List[Tuple[str, Callable[[Counter, Ctx], float], str]] = [
    (r"for \(int i = 0; i < nm32; \+\+i\)", lambda k, c: k[(32, True)], "masked 32-key blocks"),
    (r"for \(int i = 0; i < nm16; \+\+i\)", lambda k, c: k[(16, True)] + (0 if _eight(c) else k[(8, True)]),
     "masked 16-key blocks (without the 8-key loop also the segments' last 1..8 keys, at end - 8)"),
    (r"for \(int i = 0; i < nm8; \+\+i\)", lambda k, c: k[(8, True)] if _eight(c) else 0.0,
     "masked 8-key blocks: a segment's last 1..8 keys"),
    (r"for \(; kb \+ 64 <= m1; kb \+= 64\)", lambda k, c: k[(64, False)], "unmasked 64-key blocks"),
    (r"for \(; kb \+ 32 <= m1; kb \+= 32\)", lambda k, c: k[(32, False)],
     "unmasked 32-key blocks (0 or 1, after the 64-key ones)"),
    (r"for \(; kb < m1; kb \+= 16\)", lambda k, c: k[(16, False)], "unmasked 16-key blocks (0 or 1)"),
]


def _unit_walk_rules() -> List[Rule]:
    """The walk's loops per unit kind, told apart by the walk's call line (fwd_unit: '... pair units' /
    '... single units'): the unit kind's emulated blocks / its units."""
    def per_unit(f: Callable[[Counter, Ctx], float], which: str) -> Callable[[Ctx], float]:
        def trips(w: Dict[str, Any], c: Ctx) -> float:
            k, n = _units(w, c, which)
            return f(k, c) / n if n else 0.0
        return _fz(trips)
    return [Rule(where, per_unit(f, which), f"{what} per {tag} unit (segment ranges, emulated)",
                 via=rf"fixed reference, {tag} units", kernel=_FUSED)
            for which, tag in (("p", "pair"), ("s", "single")) for where, f, what in _WALK]


def _bwd_one(c: Ctx) -> bool:
    """wattn_bwd_kernel's ONE (the one-pass plan) template argument."""
    return len(c.tparams) > 5 and c.tparams[5] == "true"


def ww_retry(c: Ctx) -> float:
    from . import wattn_workload as ww

    p = c.p
    return ww.drpb_retry_rounds(p["B"], p["H"], p["W"], p["window"], p["shift"], bool(p["group"]), p["r"])


def _fz(f: Callable[[Dict[str, Any], Ctx], float]) -> Callable[[Ctx], float]:
    return lambda c: f(_fused(c), c)


def _chunks(c: Ctx) -> int:
    return c.p["d"] * c.p["es"] // 16  # 16-byte chunks per row (TL::kCPR)


THREADS_FUSED = 256  # kThreads


def _box(c: Ctx) -> int:
    """Half-width of the coords table box a backward pack loads per head (window_attention_bwd_box.cuh): the
    coordinate span of a pack's tokens relative to their window's first token, capped at r-1.
    UM-MAE coordinates (one unit of each 2x2 cell kept, so a window of w compact tokens spans 2w
    original positions, offsets -1..2w-1): span 2w."""
    return min(c.p["r"] - 1, 2 * c.p["window"])


def _fbox(c: Ctx) -> int:
    """Half-width of the forward's coords box (window_attention_box.cuh): the pack's coordinate span,
    uncapped (entries out of the table's range hold 0): 2w at UM-MAE (see _box)."""
    return 2 * c.p["window"]


def _ROWS(w: Dict[str, Any], c: Ctx) -> float:
    return w["per_pack"](lambda n: lane_strided(n * _chunks(c), THREADS_FUSED))


def _store_steps(w: Dict[str, Any], c: Ctx) -> float:
    """store_rows_bwd's 32-lane steps per tile: ceil(valid rows x chunks / 32), averaged over the tiles."""
    def steps(n: int) -> float:
        return sum(math.ceil(min(16, n - r0) * _chunks(c) / 32) for r0 in range(0, n, 16))
    return w["per_pack"](steps) / w["per_pack"](lambda n: -(-n // 16))


CUDA_RULES: List[Rule] = [
    # ---- SwinV2 cosine mode (window_attention_cosine.cuh): a runtime branch of the fused and legacy
    # kernels, taken only in cosine launches (the capture harness has none yet: 0 elsewhere).
    Rule(r"for \(int r = threadIdx\.x; r < nrows; r \+= blockDim\.x\)",
         lambda c: lane_strided(c.p["N"], c.threads) if c.p.get("cosine") else 0.0,
         "normalize_rows: the tile's rows over the CTA's threads (cosine launches only)"),
    Rule(r"for \(int e = 0; e < D; \+\+e\)", lambda c: c.p["d"] / 8 if c.p.get("cosine") else 0.0,
         "normalize_rows: d elements, #pragma unroll 8 (cosine launches only)"),
    # ---- fused window attention: prologue (window_attention_common.cuh)
    Rule(r"for \(int i = tid; i < kWarps \* kThreads; i \+= kThreads\)", lambda c: 8.0,
         "zero the per-warp segment counts: kWarps*kThreads / kThreads", kernel=_FUSED),
    Rule(r"for \(int n = threadIdx\.x; n < count; n \+= blockDim\.x\)", lambda c: 0.0,
         "window_coords' gap-compression passes: only when a window spans >= coord_limit (2^28/2R); "
         "never at these shapes (coordinates within one image)", after=r"bool fy = true|int y = 0, x = 0;",
         kernel=_FUSED),
    Rule(r"for \(int n = threadIdx\.x; n < count; n \+= blockDim\.x\)",
         _fz(lambda w, c: w["per_pack"](lambda n: lane_strided(n, THREADS_FUSED))),
         "segment ids / window coordinates: the pack's valid tokens over 256 threads", kernel=_FUSED),
    Rule(r"for \(int i = at\[win \* N\]; i < idx; \+\+i\)", _fz(lambda w, c: w["lscan"] / w["scan_warps"]),
         "pack_segment_id: a key's warp leader scans the window's earlier leaders (emulated per warp, longest "
         "lane, averaged)", kernel=_FUSED),
    Rule(r"for \(int m = n / N \* N; m < n; \+\+m\)", _fz(lambda w, c: w["scan"] / w["scan_warps"]),
         "segment_ids' scan to the segment's first token: emulated per warp (longest lane), averaged",
         kernel=_FUSED),
    Rule(r"for \(int m = b; m < b \+ N; \+\+m\)", lambda c: c.p["N"], "window_coords: the window's N tokens"),
    Rule(r"for \(int v = 0; v < kWarps; \+\+v\) \{", lambda c: 8.0, "counting sort: kWarps warp counts",
         after=r"tot \+= wcnt", kernel=_FUSED),
    Rule(r"for \(int v = 0; v < warp; \+\+v\) excl", lambda c: 3.5, "earlier warps' sums: warp index, mean 3.5",
         kernel=_FUSED),
    Rule(r"for \(int t = 0; t < ntiles; \+\+t\)", _fz(lambda w, c: w["tiles"] / w["packs"] / 8),
         "tile ranges (thread 0): tiles per pack, over 8 warps", kernel=_FUSED),
    # assign_items (thread 0): items = 16-row tiles per pack (forward and backward)
    Rule(r"for \(int i = 0; i < nitems; \+\+i\)", _fz(lambda w, c: w["items"] / w["packs"] / 8),
         "assign_items' insertion sort (thread 0): items per pack, over 8 warps", kernel=_FUSED),
    Rule(r"while \(k > 0 && cost\[order\[k - 1\]\] < cost\[i\]\)",
         _fz(lambda w, c: w["shifts_fwd"] / w["items"]),
         "insertion-sort shifts per item, emulated on the tiles' block counts", kernel=_FUSED),
    Rule(r"for \(int k = 0; k < nitems; \+\+k\) \{", _fz(lambda w, c: w["items"] / w["packs"] / 8),
         "assign_items' least-loaded warp choice (thread 0): items per pack, over 8 warps", kernel=_FUSED),
    Rule(r"for \(int v = 0; v < kWarps; \+\+v\) \{", lambda c: 1.0, "work lists (thread 0): kWarps over 8 warps",
         after=r"S\.wbeg\[v\] = fill", kernel=_FUSED),
    Rule(r"for \(int k = 0; k < nitems; \+\+k\)$", _fz(lambda w, c: w["items"] / w["packs"]),
         "work lists: items per pack", kernel=_FUSED),
    # rows and tables
    Rule(r"for \(int r = threadIdx\.x / TL::kCPR; r < nrows; r \+= kStep",
         _fz(_ROWS), "row loads / non-finite check: valid rows x 16-byte chunks over 256 threads", kernel=_FUSED),
    Rule(r"for \(int c = threadIdx\.x; c < \(r1 - r0\) \* TL::kCPR; c \+= kThreads\)",
         _fz(lambda w, c: w["per_pack"](lambda n: lane_strided((w["cap"] - n) * _chunks(c), THREADS_FUSED))),
         "zero the padding rows (cap - valid) x chunks over 256 threads", kernel=_FUSED),
    Rule(r"for \(int i = lane; i < 16 \* TL::kCPR; i \+= 32\)", lambda c: math.ceil(16 * _chunks(c) / 32),
         "store_rows_warp: 16 rows x chunks over 32 lanes", kernel=_FUSED),
    Rule(r"for \(int i = threadIdx\.x; i < T; i \+= kThreads\)", lambda c: lane_strided(c.p["T"], THREADS_FUSED),
         "the head's table slice: T entries over 256 threads", kernel=_FUSED),
    # forward (window_attention_fwd.cuh)
    # fwd_tile's walk (packs of several windows): one loop, the first block peeled; fwd_unit's (one-window
    # packs, ONE): one loop per block kind, iterations per unit = the emulated totals of its kind / units
    Rule(r"for \(kb \+= 32; kb < end; kb \+= 32\)", _fz(lambda w, c: sum(w["c32"].values()) / w["ftiles"] - 1),
         "key blocks (32, or a last 16) per query tile after the peeled first one (segment ranges, emulated)",
         kernel=_FUSED),
    # the online walk after a failed fixed reference (fwd_unit): never at the model's inputs
    Rule(r"for \(int pass = 0; pass < 2; \+\+pass\)", lambda c: 1.0,
         "one-window unit's passes: the fixed reference; the online walk again only after the probe's "
         "reference fails a row (never at the model's inputs)", kernel=_FUSED),
    *[Rule(w, lambda c: 0.0, "one-window unit's online walk: only after the probe's reference fails a row "
           "(never at the model's inputs)", via=r"online fallback walk", kernel=_FUSED) for w, _, _ in _WALK],
    *_unit_walk_rules(),
    # a walk loop seen without its call site (no inlining chain in the line info): one tile's share
    *[Rule(where, _fz(lambda w, c, f=f: f(w["c32"], c) / w["ftiles"]),
           f"{what} per query tile (segment ranges, emulated; no call site: a tile's share)", kernel=_FUSED)
      for where, f, what in _WALK],
    Rule(r"for \(; u < npairs; u \+= kWarps\)", _fz(lambda w, c: _units(w, c, "p")[1] / w["packs"] / 8),
         "forward pair units (align_segments' pairs), round-robin over the 8 warps: per pack / 8", kernel=_FUSED),
    Rule(r"for \(; u < nunits; u \+= kWarps\)", _fz(lambda w, c: _units(w, c, "s")[1] / w["packs"] / 8),
         "forward single units (a segment's odd last tile; every tile without pairs), after the pairs in the "
         "same round-robin: per pack / 8", kernel=_FUSED),
    Rule(r"for \(int q = threadIdx\.x; q < rows; q \+= kThreads\)", lambda c: 0.0,
         "fwd_exact: only for a head whose V holds NaN/Inf", kernel=_FUSED),
    Rule(r"for \(int d = 0; d < D; \+\+d\)", lambda c: c.p["d"], "fwd_exact dot: D", kernel=_FUSED),
    Rule(r"for \(int k = wb; k < we; \+\+k\)", lambda c: c.p["N"], "fwd_exact: the window's N keys", kernel=_FUSED),
    Rule(r"for \(int dc = 0; dc < D; dc \+= 8\)", lambda c: c.p["d"] / 8, "fwd_exact: D/8 column groups",
         kernel=_FUSED),
    Rule(r"for \(int e = 0; e < 8; \+\+e\)", lambda c: 8.0, "fwd_exact: 8 columns", kernel=_FUSED),
    Rule(r"for \(int b = 0; b < A\.nbuf; \+\+b\)", _fz(lambda w, c: w["nbuf"]), "operand buffers: nbuf (plan)",
         kernel=_FUSED),
    Rule(r"for \(int r = first \+ threadIdx\.x / TL::kCPR; r < cap; r \+= kThreads / TL::kCPR\)",
         _fz(lambda w, c: w["per_pack"](lambda n: lane_strided((w["cap"] - (0 if _one(c) else n)) * _chunks(c),
                                                                THREADS_FUSED))),
         "forward zero_padding: slots [first, cap) x chunks over 256 threads (ONE: all cap, else the padding)",
         kernel=_FUSED),
    Rule(r"for \(int k = 0; k < ntiles; \+\+k\)",
         _fz(lambda w, c: 3 * w["nbuf"] * w["per_pack"](lambda n: (w["cap"] - n) / w["cap"] if _one(c) else 1.0)),
         "forward zero_padding: the 3 x nbuf operand tiles of padding slots (ONE: cap - valid of cap)", kernel=_FUSED),
    # pack plans (window_attention_fwd_pack.cuh): the plan kernel stores a position's pack arrays, the
    # forward's CTAs copy them (load_plan): L.tab / 16 chunks over 256 threads either way
    Rule(r"for \(int c = threadIdx\.x; c < n; c \+= kThreads\)",
         _fz(lambda w, c: lane_strided(w["plan_bytes"] / 16, THREADS_FUSED)),
         "pack plan store / copy: L.tab / 16 chunks over 256 threads", kernel=_FUSED),
    Rule(r"for \(int e0 = threadIdx\.x; e0 < T; e0 \+= 4 \* kThreads\)",
         lambda c: lane_strided(c.p["T"], 4 * THREADS_FUSED, [32 * w for w in range(THREADS_FUSED // 32)]),
         "forward table (scaled on the way in): T over 256 threads x 4 unrolled", kernel=_FUSED),
    Rule(r"for \(int t = u?warp; t < ntiles; t \+= kWarps\)", _fz(lambda w, c: w["ftiles"] / w["packs"] / 8),
         "forward tiles (after align_segments) round-robin over the 8 warps: tiles per pack / 8", kernel=_FUSED),
    # the forward's coords box tables (window_attention_box.cuh): spans uncapped (out-of-range entries 0)
    Rule(r"for \(int e = threadIdx\.x; e < x\.nb; e \+= kThreads\)",
         lambda c: lane_strided((2 * _fbox(c) + 1) ** 2, THREADS_FUSED),
         "forward coords box: (2e+1)^2 entries over 256 threads, loaded and scaled per head (e = the pack "
         "coordinate span 2w, see _box, uncapped)", via=r"fwd box (load|scale)", kernel=_FUSED),
    Rule(r"for \(\+\+pack; pack \* A\.g\.nH < it1; \+\+pack\)", _fz(lambda w, c: w["ppc"] - 1),
         "forward packs per CTA after the peeled first: the most a range of ipc items touches, less 1 (plan: "
         "range_packs)", kernel=_FUSED),
    Rule(r"for \(int op = 0; op < 3; \+\+op\)", lambda c: 3.0, "q, k, v tiles", kernel=_FUSED),
    Rule(r"for \(int i = 0; i < nh; \+\+i\)", lambda c: 0.0,
         "box fallback's heads (a pack's box over the plan's tmax entries): never at these shapes",
         via=r"bwd box fallback", kernel=_FUSED),
    Rule(r"for \(int i = 0; i < nh; \+\+i\)", _fz(lambda w, c: w["hg"]),
         "heads per CTA (plan; forward: per pack of the costliest range, ipc / its packs)", kernel=_FUSED),
    Rule(r"for \(int it = it0; it < it1; \+\+it\)", _fz(lambda w, c: w["items"] / w["packs"] / 8),
         "work items per warp: tiles per pack over 8 warps", kernel=_FUSED),
    # backward (window_attention_bwd.cu)
    Rule(r"for \(int b = lo & ~15; b < end; b \+= 16\)", _fz(lambda w, c: sum(w["c16"].values()) / w["tiles"]),
         "16-key (or query) blocks per tile (segment ranges, emulated)", kernel=_FUSED),
    Rule(r"for \(int b = p0; b < p1; b \+= 16\)", _fz(lambda w, c: w["c16"][(16, False)] / w["tiles"]),
         "walk_blocks: plain 16-key (or query) blocks per tile (segment ranges, emulated)", kernel=_FUSED),
    Rule(r"for \(int b = \(lo & ~15\) == p0 \? p1 : lo & ~15; b < end;", _fz(lambda w, c: w["c16"][(16, True)] / w["tiles"]),
         "walk_blocks: masked 16-key (or query) blocks per tile (segment ranges, emulated)", kernel=_FUSED),
    Rule(r"for \(int e = threadIdx\.x; e < ntab; e \+= kThreads\)",
         _fz(lambda w, c: lane_strided((8 if c.p.get("deterministic") or _bwd_one(c) else 1)
                                       * ((w.get("tmax") or c.p["T"]) + 1), THREADS_FUSED)),
         "zero the bias-gradient table(s): T+1 entries (coords box plan: tmax+1; x8 deterministic, x8 one-pass: "
         "4 tables of {gradient, bias}) over 256 threads", kernel=_FUSED),
    # the coords box plan (window_attention_bwd_box.cuh): per head the box's entries are loaded, copied
    # into the interleaved tables and flushed; packs whose box exceeds tmax run the whole-table two-pass
    # code (its head loop and zeroing: never at these shapes, UM-MAE boxes are 33 x 33 of tmax ~1900)
    # persistent box tables (plan "pers"): loaded once per CTA (one box per call), folded per pack, flushed last
    Rule(r"for \(int i = 0; i < n; \+\+i\) \{  // bwd box loads",
         _fz(lambda w, c: w["hg"] * w["nslots"] / w["npacks"] if w.get("pers") else 0.0),
         "persistent box tables: hg heads loaded once per CTA (per pack: hg x nslots / npacks)", kernel=_FUSED),
    Rule(r"for \(int i = 0; i < n; \+\+i\) \{  // bwd box flushes", lambda c: 0.0,
         "persistent box tables flushed on a box change: never at these shapes (one box per call)",
         via=r"bwd box change", kernel=_FUSED),
    Rule(r"for \(int i = 0; i < n; \+\+i\) \{  // bwd box flushes",
         _fz(lambda w, c: w["hg"] if w.get("pers") else 0.0),
         "persistent box tables: hg heads flushed after the CTA's last pack (call site: bwd box last flush)",
         kernel=_FUSED),
    Rule(r"for \(int e = threadIdx\.x; e < x\.nb; e \+= kThreads\)",
         _fz(lambda w, c: 0.0 if w.get("pers") else lane_strided((2 * _box(c) + 1) ** 2, THREADS_FUSED)),
         "box entries loaded and flushed per pack and head: not with persistent box tables",
         via=r"bwd box per-pack (load|flush)", kernel=_FUSED),
    Rule(r"for \(int e = threadIdx\.x; e < x\.nb; e \+= kThreads\)",
         _fz(lambda w, c: lane_strided((2 * _box(c) + 1) ** 2, THREADS_FUSED) if w.get("pers") else 0.0),
         "box entries summed into the persistent tables per pack and head: only with them",
         via=r"bwd box fold", kernel=_FUSED),
    Rule(r"for \(int e = threadIdx\.x; e < x\.nb; e \+= kThreads\)",
         lambda c: lane_strided((2 * _box(c) + 1) ** 2, THREADS_FUSED),
         "backward coords box: (2e+1)^2 entries over 256 threads (e = min(r-1, pack coordinate span), see _box)",
         kernel=_FUSED),
    Rule(r"bwd det partials zeroing", _fz(lambda w, c: lane_strided(w["hg"] * c.p["T"], THREADS_FUSED)),
         "deterministic: the CTA's own bias-gradient partials (hg heads x T) zeroed once, over 256 threads",
         kernel=_FUSED),
    # finish_sums: one CTA of the grid (the last to finish) runs these loops; like the pack loops' weights,
    # the count is the per-warp average over the grid's CTAs (its straight-line code counts for every CTA)
    Rule(r"bwd sums out", lambda c: lane_strided(c.p["T"] * c.p["heads"], THREADS_FUSED) / c.grid[0],
         "fast mode, persistent sums: the last CTA copies out and zeroes T x nH entries over 256 threads "
         "(one CTA of the grid: per-CTA average)", kernel=_FUSED),
    Rule(r"bwd dls sums out",
         lambda c: lane_strided(c.p["heads"], THREADS_FUSED) / c.grid[0] if c.p.get("cosine") else 0.0,
         "fast mode, persistent sums, cosine: the last CTA copies out the nH logit-scale sums (one CTA of the "
         "grid: per-CTA average)", kernel=_FUSED),
    Rule(r"bwd box fallback zeroing", lambda c: 0.0,
         "box fallback only (a pack's box over the plan's tmax entries): never at these shapes", kernel=_FUSED),
    Rule(r"for \(int e = threadIdx\.x; e <= G\.T; e \+= kThreads\)", lambda c: lane_strided(c.p["T"] + 1, THREADS_FUSED),
         "one-pass: the head's bias entries (T+1) into the 4 interleaved tables, over 256 threads", kernel=_FUSED),
    Rule(r"while \(__any_sync\(kFull, miss != 0\)\)",
         lambda c: ww_retry(c), "table_add_batch's retry rounds per key block: lanes of one step meeting on one "
         "entry of their table (emulated on the case's masks: wattn_workload.drpb_retry_rounds)", kernel=_FUSED),
    Rule(r"for \(int pack = slot; pack < G\.npacks; pack \+= A\.nslots\)",
         _fz(lambda w, c: w["npacks"] / w["nslots"]), "packs per CTA slot: npacks / nslots (plan)", kernel=_FUSED),
    Rule(r"for \(int i = 0; i < 5; \+\+i\) zero_rows", lambda c: 5.0, "q, k, v, dO, O tiles", kernel=_FUSED),
    Rule(r"for \(int u = 0; u < ntiles; \+\+u\)", _fz(lambda w, c: w["tiles"] / w["packs"] / 8),
         "assign_tiles' ranks (warp 0, one thread per tile): tiles per pack, over 8 warps", kernel=_FUSED),
    Rule(r"for \(int e = threadIdx\.x; e < G\.T; e \+= kThreads\)", lambda c: lane_strided(c.p["T"], THREADS_FUSED),
         "flush the bias-gradient table: T entries over 256 threads", kernel=_FUSED),
    Rule(r"for \(int i = lane; i < rows \* TL::kCPR; i \+= 32\)", _fz(_store_steps),
         "store_rows_bwd: the tile's valid rows x chunks over 32 lanes (tiles of the packs' valid slots)",
         kernel=_FUSED),
    Rule(r"for \(int w = 0; w < kWarps; \+\+w\)", lambda c: 8.0, "deterministic: per-warp tables summed",
         kernel=_FUSED),
    Rule(r"__[fd]AtomicAdd", lambda c: 1.0, "shared float atomicAdd compiles to a CAS loop: 1 try (no contention)"),
    Rule(r"for \(unsigned m = (same|grp); m; m &= m - 1\)", lambda c: 1.0, "lanes of one table entry: ~1"),
    # ---- legacy window attention (window_attention_legacy*.cu): load_tokens runs the common
    # segment_ids / window_coords on one window (count = N) with the CTA's threads
    Rule(r"for \(int n = threadIdx\.x; n < count; n \+= blockDim\.x\)", lambda c: 0.0,
         "window_coords' gap-compression passes: only when a window spans >= coord_limit (2^28/2R); "
         "never at these shapes (coordinates within one image)", after=r"bool fy = true|int y = 0, x = 0;",
         kernel=_LEGACY),
    Rule(r"for \(int n = threadIdx\.x; n < count; n \+= blockDim\.x\)", lambda c: lane_strided(c.p["N"], c.threads),
         "segment ids / window coordinates of one window: N tokens over the CTA's threads", kernel=_LEGACY),
    Rule(r"for \(int m = n / N \* N; m < n; \+\+m\)", lambda c: _legacy_scan(c),
         "segment_ids' scan to the segment's first token: emulated per warp of a window (longest lane)",
         kernel=_LEGACY),
    Rule(r"for \(int n = threadIdx\.x; n < G\.N;", lambda c: lane_strided(c.p["N"], c.threads),
         "load_tokens: N tokens over the CTA's threads", kernel=_LEGACY),
    Rule(r"for \(int n = threadIdx\.x; n < cap;", lambda c: lane_strided(_ncols(c), c.threads),
         "lse/delta of cap = ncols rows over the CTA's threads", kernel=_LEGACY),
    Rule(r"for \(int i = threadIdx\.x; i < rows \* V;", _rows_loop(lambda c: c.warps * 16),
         "load_rows of the CTA's 16*warps row operand, d*es/16 vectors per row", via=r"row0, nwarps \* 16",
         kernel=_LEGACY),
    Rule(r"for \(int i = threadIdx\.x; i < rows \* V;", _rows_loop(_kc),
         "load_rows of a kc-row column chunk, d*es/16 vectors per row", via=r"c0, kcn", kernel=_LEGACY),
    Rule(r"for \(int c0 = 0; c0 < ncols; c0 \+= kc\)", lambda c: math.ceil(_ncols(c) / _kc(c)),
         "column chunks: ceil(ncols/kc) (kernel arguments)", kernel=_LEGACY),
    Rule(r"for \(int (kb|qb) = 0; (kb|qb) < kcn; (kb|qb) \+= kKB\)", lambda c: _kc(c) / 32,
         "32-column blocks of a chunk: kc/32", kernel=_LEGACY),
    Rule(r"for \(int kk = 0; kk < D; kk \+= 4\)", lambda c: c.p["d"] / 16,
         "fp32 FMA dot: d/4 steps, #pragma unroll 4: d/16 iterations", kernel=_LEGACY),
    Rule(r"for \(int i = lane; i < 16 \* V; i \+= 32\)", lambda c: math.ceil(16 * _vec(c) / 32),
         "store_rows_warp: 16 rows x d*es/16 vectors over 32 lanes", kernel=_LEGACY),
    Rule(r"for \(int win = slot; win < G\.nwin; win \+= nslots\)",
         lambda c: c.p["B"] * c.p["nW"] / _legacy_arg(c, {"wattn_bwd_dq_kernel": 14}),
         "windows per window slot: nwin / nslots", kernel=_LEGACY),
    Rule(r"\(DET \? nwarps : 1\) \* G\.T", lambda c: lane_strided(c.p["T"], c.threads),
         "zero the shared rpb-gradient table (T entries)", kernel=_LEGACY),
    Rule(r"for \(int i = threadIdx\.x; i < G\.T; i \+= blockDim\.x\)", lambda c: lane_strided(c.p["T"], c.threads),
         "flush the rpb-gradient table (T entries)", kernel=_LEGACY),
    Rule(r"for \(int w = 0; w < nwarps; \+\+w\)", lambda c: c.warps, "per-warp tables summed: warps", kernel=_LEGACY),
    Rule(r"for \(int p = 0; p < nparts; \+\+p\)", lambda c: c.args[2], "partial sums: nparts (argument)"),
    # ---- token ops (tokens_kernels.cuh: one row gather; mixing.cu)
    Rule(r"while \(r0 < w\.rows\)", lambda c: _gather_steps(c) / (c.grid[0] * c.threads / 32),
         "warp steps of 32*U vectors: ceil(rows*vpr / (32*U)) over all warps (Walk argument)",
         kernel="gather_rows_kernel"),
    # unmix_backward_kernel (mixing.cu): grid (L*slices, chunks), block (tx vectors, ty image lanes)
    Rule(r"for \(int b = b0 \+ y; b < b1; b \+= 2 \* ty\)",
         lambda c: max(1.0, math.ceil(math.ceil(c.p["B"] / c.grid[1]) / (2 * c.block[1]))),
         "image pairs of a lane: ceil(chunk / (2*ty)), chunk = ceil(B / gridDim.y)", kernel="unmix_backward_kernel"),
    Rule(r"for \(int j = tid; j < 2 \* cols; j \+= tx \* ty\)",
         lambda c: max(1.0, math.ceil(2 * c.block[0] * _tvec(c) / c.threads)),
         "tok+pos columns of the slice over the CTA: ceil(2*tx*VEC / threads)", kernel="unmix_backward_kernel"),
    Rule(r"for \(int l = 0; l < ty; \+\+l\)", lambda c: c.block[1], "fixed-order sum over the ty lanes",
         kernel="unmix_backward_kernel"),
    # unmix_reduce_slice (mixing.cu), inlined in unmix_backward_kernel (the slice group's last CTA;
    # counted for every CTA: the heaviest path) and in unmix_reduce_kernel (no tickets: grid = groups)
    Rule(r"for \(int s2 = (grp|blockIdx\.x); s2 < a\.slices; s2 \+= a\.groups\)",
         lambda c: math.ceil(_uslices(c) / min(_uslices(c), 256)), "slices of a group: ceil(slices / groups)",
         kernel=_UNMIX),
    Rule(r"for \(int64_t r = lane; r < R; r \+= lanes\)", lambda c: math.ceil(_uchunks(c) * c.p["L"] / _ulanes(c)),
         "tok partial rows of a column: ceil(chunks*L / lanes), lanes = threads / (tx*VEC)", kernel=_UNMIX),
    Rule(r"for \(int l = 0; l < lanes; \+\+l\)", lambda c: _ulanes(c), "fixed-order sum over the row lanes",
         kernel=_UNMIX),
    Rule(r"for \(int j = tid; j < a\.L \* cols; j \+= threads\)",
         lambda c: lane_strided(c.p["L"] * c.block[0] * _uvec(c), c.threads) if _uchunks(c) > 1 else 0.0,
         "dpos columns of a slice (several chunks only): L*tx*VEC over the CTA", kernel=_UNMIX),
    Rule(r"for \(int k = 0; k < a\.chunks; \+\+k\)", lambda c: _uchunks(c), "pos partials of a column: chunks",
         kernel=_UNMIX),
    # uniform_backward_kernel (uniform.cu): grid = token segments, 256 threads = tx channel vectors x
    # ty = 256/tx token lanes, tx = min(C/VEC, 256)
    Rule(r"for \(int64_t cv0 = 0; cv0 < cvec; cv0 \+= tx\)",
         lambda c: max(1.0, math.ceil(c.p["C"] / _tvec(c) / _utx(c))), "channel chunks: ceil(C/VEC / tx)",
         kernel="uniform_backward_kernel"),
    Rule(r"for \(int r = r0 \+ y; r < r1 && y < ty; r \+= UT \* ty\)",
         lambda c: max(1.0, math.ceil(math.ceil(c.p["full_rows"] / c.grid[0]) / (int(c.tparams[2]) * (c.threads // _utx(c))))),
         "token iterations of a lane: ceil(seg / (UT*ty)), seg = ceil(B*H*W / gridDim.x)",
         kernel="uniform_backward_kernel"),
    Rule(r"for \(int c = threadIdx\.x; c < cols; c \+= tokens::kThreads\)",
         lambda c: max(1.0, math.ceil(_utx(c) * _tvec(c) / c.threads)), "columns of a chunk over the CTA",
         kernel="uniform_backward_kernel"),
    Rule(r"for \(int l = 0; l < ty; \+\+l\)", lambda c: c.threads // _utx(c), "fixed-order sum over the ty lanes",
         kernel="uniform_backward_kernel"),
    # uniform_rows_sum (uniform.cu): dtoken's two levels, inlined in uniform_backward_kernel (the last
    # CTAs; counted for every CTA: the heaviest path) and in uniform_reduce_kernel (no tickets)
    Rule(r"for \(int64_t c = threadIdx\.x; c < C; c \+= tokens::kThreads\)",
         lambda c: lane_strided(c.p["C"], c.threads), "dtoken columns over the CTA", kernel=_UNIFORM),
    Rule(r"for \(int r = r0; r < r1; \+\+r\)", lambda c: min(16, _usegs(c)),
         "rows of a level: a group's <= 16 segments, or the <= 16 groups", kernel=_UNIFORM),
    Rule(r"for \(int g = 0; g < groups; \+\+g\)", lambda c: math.ceil(_usegs(c) / 16),
         "groups of 16 segments (argument segs)", kernel=_UNIFORM),
    # ---- losses (losses.cu): no loops (units and CTA sums unrolled)
]


def _legacy_scan(c: Ctx) -> float:
    from . import wattn_workload as ww

    p = c.p
    wl = ww.attention_workload(p["B"], p["H"], p["W"], p["window"], p["shift"], bool(p["group"]))
    return wl["scan_win"] / wl["scan_win_warps"]


def _gather_steps(c: Ctx) -> int:
    """Warp steps of gather_rows_kernel<V, T, U, ...>(A, fill, B, out, Walk w, map): Walk = {rows, vpr,
    FastDiv, dq, dr} (ints), decoded from the captured struct argument (little-endian)."""
    w = c.args[4]
    rows, vpr = w & 0xFFFFFFFF, (w >> 32) & 0xFFFFFFFF
    u = int(c.tparams[2])
    return math.ceil(rows * vpr / (32 * u))


def trips_for(rules: Sequence[Rule], ctx: Ctx, site, triton: bool,
              outer: Sequence[Any] = ()) -> Tuple[Optional[float], str]:
    """(iterations per entry, how it was derived) for a loop at ``site`` (a static_sass.LoopSite);
    ``outer``: the sites of the loops enclosing it, innermost first (for ``Rule.inside``)."""
    if site is None:
        return None, "unmatched: no line info"
    t, why = _trips_at(rules, ctx, site, triton, outer)
    if t is None and not why.startswith("rule"):
        # ptxas may give the back edge another line of the loop (its closing brace, the last statement):
        # match the loop statement found from the source's structure
        from .static_sass import enclosing_loop

        head = enclosing_loop(site)
        if head is not None:
            t, why2 = _trips_at(rules, ctx, head, triton, outer)
            if t is not None or why2.startswith("rule"):
                return t, f"{why2} (back edge at line {site.line}, loop at {head.line})"
    return t, why


def _trips_at(rules: Sequence[Rule], ctx: Ctx, site, triton: bool,
              outer: Sequence[Any] = ()) -> Tuple[Optional[float], str]:
    via = site.chain[0][2] if site.chain else ""
    enclosing = " | ".join(o.text.strip() if o is not None else "?" for o in outer) or TOP
    for r in rules:
        if r.kernel and not re.search(r.kernel, ctx.kernel):
            continue
        if not r.via:
            called = True
        elif site.chain or not r.inside:
            called = bool(re.search(r.via, via))
        else:  # no inlining call sites in the line info: the enclosing loops tell the copies apart
            called = bool(re.search(r.inside, enclosing))
        if re.search(r.where, site.text) and called and \
                (not r.after or re.search(r.after, _after(site))):
            try:
                return float(r.trips(ctx)), r.why
            except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
                return None, f"rule '{r.why}' failed: {type(e).__name__}: {e}"
    if triton and isinstance(ctx.args, dict):
        got = triton_range(site.text, ctx.args)
        if got:
            return got
    return None, "unmatched: counted once"


# the Triton kernels' rules live in their own module (it imports Rule, Ctx and TOP from this one)
from .static_rules_triton import TRITON_RULES, triton_range  # noqa: E402
