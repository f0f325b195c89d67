"""Host model of the fused CUDA window-attention kernels: launch plan and pack prologue.

The model behind the static report's trip-count rules for ``csrc/cuda/window_attention*.cu``
(``static_rules.py``). It mirrors, in Python:

* the launch plan: ``pick_pack`` / ``make_layout`` (``window_attention_index.cuh``), ``heads_per_cta``
  (``bwd_heads_per_cta`` in ``window_attention_bwd.cu``) and ``plan_forward`` / ``plan_backward`` (windows per pack, packs, heads per CTA, buffers, slots);
* the pack prologue (``window_attention_common.cuh``): segment ids (first token of the window with
  the same shift region and group label), the stable counting sort by segment, the 16-row tiles'
  key ranges, the key blocks each tile walks (masked or not), and ``assign_items``' insertion sort;

on the real masks (MixMIM's 7x7 group mask upsampled, batch-shared; Swin's shift regions). ``seg_walk``
models the Triton by-segment forward's walk (``mixkernels/triton/_wattn_seg.py``) on the same masks.
numpy only (no torch, no package-relative imports).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["THREADS", "WARPS", "pick_pack", "heads_per_cta", "items_per_cta", "range_packs", "fwd_box_tmax",
           "bwd_heads_per_cta", "layout_bytes", "plan_bytes", "plan",
           "bwd_box_bytes", "bwd_box_tmax", "box_packs_per_cta",
           "mixmim_mask", "attention_workload", "seg_walk"]

THREADS = 256  # kThreads: threads per CTA of the fused kernels
WARPS = THREADS // 32
MAX_TILES = THREADS // 16
PACK_SLOTS = 208  # kPackSlots
DET_SLOTS = 256  # kDetSlots (deterministic backward)
SMEM_OPTIN = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (the capture stub answers the same)
SMEM_PER_SM = 233472  # cudaDevAttrMaxSharedMemoryPerMultiprocessor on sm_90 (likewise)
N_SM = 132


def _round16(v: int) -> int:
    return (v + 15) & ~15


def pick_pack(N: int, nwin: int) -> int:
    """Windows per pack: P * N <= 208 slots with the fewest padded rows (ties: more windows)."""
    best, best_fill, P = 1, 0.0, 1
    while P * N <= PACK_SLOTS and P <= nwin:
        fill = np.float32(P * N) / np.float32(_round16(P * N))  # float arithmetic as the kernel's
        if fill >= best_fill - np.float32(1e-6):
            best, best_fill = P, fill
        P += 1
    return best


def heads_per_cta(packs: int, nH: int, slots: int) -> int:
    """Forward: the divisor of nH with the fewest CTAs per SM (``slots`` = SMs) x (4 hg + 3) (a CTA's hg
    heads plus its pack prologue; the first on ties), among those that leave two CTAs on at least 3/4 of
    the SMs when any does."""
    for pass_ in (0, 1):
        best, best_t = 1, None
        for hg in range(1, nH + 1):
            ctas = packs * (nH // hg)
            if nH % hg or (pass_ == 0 and 2 * ctas < 3 * slots):
                continue
            t = -(-ctas // slots) * (4 * hg + 3)
            if best_t is None or t < best_t:
                best, best_t = hg, t
        if best_t is not None:
            return best
    return 1


def range_packs(ipc: int, nH: int) -> int:
    """The most packs a range of ipc consecutive (pack, head) items, pack-major, can touch."""
    return (nH - math.gcd(ipc, nH) + ipc - 1) // nH + 1


def items_per_cta(packs: int, nH: int, slots: int) -> int:
    """Forward, coords calls: items (pack, head) per CTA, a contiguous range each: the fewest CTAs per SM x
    (8 ipc + 9 range_packs), the first (smallest) on ties; no two-CTA filter (window_attention_index.cuh)."""
    items = packs * nH
    best, best_t = 1, None
    for ipc in range(1, -(-items // slots) + 1):
        t = -(-(-(-items // ipc)) // slots) * (8 * ipc + 9 * range_packs(ipc, nH))
        if best_t is None or t < best_t:
            best, best_t = ipc, t
    return best


def fwd_box_tmax(cap: int, d: int, es: int, nbuf: int, wh: int, ww: int, smem_limit: int = SMEM_OPTIN,
                 smem_per_sm: int = SMEM_PER_SM) -> int:
    """plan_forward's coords box budget (fwd_box_tmax): the most entries keeping two CTAs per SM when
    that holds the box of uniform-sampled windows ((4w+1)^2), else the most that fit the limit."""
    def most(cap_bytes: int) -> int:
        lo, hi = 0, 1 << 20
        while lo < hi:
            mid = hi - (hi - lo) // 2
            lo, hi = (mid, hi) if layout_bytes(cap, mid, d, es, 3, nbuf, False, 0) <= cap_bytes else (lo, mid - 1)
        return lo
    two = smem_per_sm // 2 - 1024
    t2 = most(min(two, smem_limit)) if two > 0 else 0
    return t2 if t2 >= (4 * wh + 1) * (4 * ww + 1) else most(smem_limit)


def bwd_heads_per_cta(packs: int, nH: int, slots: int) -> int:
    """Backward: the divisor of nH with the least waves x (4 hg + 3) (a CTA's hg heads plus ~0.75 head of
    per-pack work); the first (smallest) on ties."""
    best, best_t = 1, None
    for hg in range(1, nH + 1):
        if nH % hg == 0:
            t = -(-(packs * (nH // hg)) // slots) * (4 * hg + 3)
            if best_t is None or t < best_t:
                best, best_t = hg, t
    return best


def _a16(v: int) -> int:
    return (v + 15) & ~15


def _pack_arrays(cap: int, stage: bool) -> int:
    """``Layout::tab``: the pack arrays at the start of a fused kernel's shared memory (slots, the
    backward's staging nld, tiles and info)."""
    o = 0
    for per in (4, 8, 8, 4, 4, 8, 8):  # tok qi ki lidx lrow cxy seg
        o = _a16(o + cap * per)
    o = _a16(o + (cap * 8 if stage else 0))  # nld
    return _a16(o + 4 * (3 * MAX_TILES + 2 * MAX_TILES + WARPS + 1 + 4))  # tiles


def layout_bytes(cap: int, T: int, D: int, es: int, ops: int, nbuf: int, stage: bool, dtab_floats: int) -> int:
    """``make_layout(...).total``: dynamic shared memory of a fused kernel's CTA."""
    o = _pack_arrays(cap, stage)
    o += _a16((T + 1) * 4) * nbuf
    o = _a16(o + dtab_floats * 4)
    tile = cap * (D + 16 // es) * es
    o += _a16(max(tile * ops * nbuf, THREADS * (8 * 3 + 4 * 10) + WARPS * THREADS * 4))
    if stage and cap < WARPS * 16:
        o += WARPS * 16 * (D + 16 // es) * es
    return _a16(o)


def plan_bytes(cap: int) -> int:
    """``Layout::tab`` of the forward's layout: the pack arrays (slots, tiles, info) that a pack plan holds
    (``window_attention_fwd_pack.cuh``: wattn_fwd_plan_kernel stores them, load_plan copies them)."""
    return _pack_arrays(cap, False)  # no nld in the forward


def plan(kind: str, B: int, H: int, W: int, nH: int, d: int, wh: int, ww: int, rh: int, rw: int, es: int = 2,
         rpb: bool = True, det: bool = False, n_sm: int = N_SM, smem_limit: int = SMEM_OPTIN,
         cosine: bool = False, coords: bool = False) -> Dict[str, Any]:
    """The launcher's plan (``plan_forward`` / ``plan_backward``) of a fused-kernel call (backward:
    ``one`` = the one-pass plan, dS^T kept in shared memory; ``tmax`` > 0: the coords box plan's
    box-local tables of tmax entries, see :func:`bwd_box_tmax`). Forward: ``ppi`` > 0 when the pack
    plans run (packs per image = plan positions; labels batch-shared as the cases', coordinates per
    image as UM-MAE's: none with coords; enough CTAs on the busiest SM), ``plan_bytes`` per position."""
    N = wh * ww
    nwin = B * (H // wh) * (W // ww)
    P = pick_pack(N, nwin)
    npacks, cap, T = -(-nwin // P), _round16(P * N), (2 * rh - 1) * (2 * rw - 1)
    out = dict(N=N, nwin=nwin, P=P, npacks=npacks, cap=cap, T=T)
    if kind == "fwd":
        # forward: CTAs per SM x (4 ipc + 3 packs); ranges over several packs for coords calls only
        ipc = items_per_cta(npacks, nH, n_sm) if coords and rpb else heads_per_cta(npacks, nH, n_sm)
        nctas, ppc = -(-npacks * nH // ipc), range_packs(ipc, nH)
        nbuf, smem, tmax = 1, 0, 0
        for nb in ((2, 1) if ipc > 1 else (1,)):
            if coords and rpb:  # box tables of tmax entries (window_attention_box.cuh)
                tmax = fwd_box_tmax(cap, d, es, nb, wh, ww, smem_limit)
                if tmax < 1:
                    continue
            smem = layout_bytes(cap, tmax if coords and rpb else T, d, es, 3, nb, False, 0)
            if smem <= smem_limit:
                nbuf = nb
                break
        nW = (H // wh) * (W // ww)
        per_sm = -(-nctas // n_sm)  # plan_forward's cost rule (busiest SM's CTAs)
        ppi = nW // P if not coords and nW % P == 0 and B > 1 and per_sm * (19 if P == 1 else 13) > 60 else 0
        # hg: heads per pack of the costliest CTA (ipc items over ppc packs); nslots x nhg = the grid
        return dict(out, ipc=ipc, ppc=ppc, hg=ipc / ppc, nhg=1, nbuf=nbuf, nslots=nctas, smem=smem,
                    tmax=tmax, fits=smem <= smem_limit, ppi=ppi, plan_bytes=plan_bytes(cap))
    def tabf(one: bool) -> int:  # bwd_tab_floats
        return 0 if not rpb else (WARPS * (T + 1 + 32) if det else (8 if one else 1) * (T + 1))
    nslots = min(npacks, DET_SLOTS) if det else npacks
    if coords and rpb and not det and not cosine:  # the coords box plan (window_attention_bwd_box.cuh)
        tmax, smem = bwd_box_tmax(cap, T, d, es, smem_limit)
        if tmax:
            hg = bwd_heads_per_cta(nslots, nH, n_sm)
            nhg = -(-nH // hg)
            k = box_packs_per_cta(npacks, nhg, n_sm)
            want = min(T, (2 * min(rh - 1, 2 * wh) + 1) * (2 * min(rw - 1, 2 * ww) + 1))
            lp, lsmem = bwd_box_tmax(cap, T, d, es, smem_limit, hg) if k > 1 else (0, 0)
            pers = lp >= want
            if pers:  # persistent box tables: k packs per CTA
                tmax, smem, nslots = lp, lsmem, -(-npacks // k)
            return dict(out, hg=hg, nhg=nhg, nbuf=1, nslots=nslots, smem=smem, one=True, tmax=tmax, pers=pers,
                        fits=True)
    # one-pass plan: the cap x cap dS^T matrix (pitch cap + 8) after the layout, one CTA per SM
    smem = layout_bytes(cap, T, d, es, 5, 1, True, tabf(True))
    one = not cosine and smem + cap * (cap + 8) * es <= smem_limit
    smem = smem + cap * (cap + 8) * es if one else layout_bytes(cap, T, d, es, 5, 1, True, tabf(False))
    hg = bwd_heads_per_cta(nslots, nH, (1 if one else 2) * n_sm)
    return dict(out, hg=hg, nhg=-(-nH // hg), nbuf=1, nslots=nslots, smem=smem, one=one, tmax=0, pers=False,
                fits=smem <= smem_limit)


def bwd_box_bytes(cap: int, tmax: int, d: int, es: int, ph: int = 0) -> int:
    """Shared memory of the coords box plan at a budget of tmax table entries: the one-pass layout with
    tables of tmax entries (and ph heads' persistent box bias and gradient sum, tmax floats each), plus
    the dS^T matrix."""
    return layout_bytes(cap, tmax, d, es, 5, 1, True, 8 * (tmax + 1) + 2 * ph * tmax) + cap * (cap + 8) * es


def box_packs_per_cta(packs: int, nhg: int, slots: int) -> int:
    """plan_backward's packs per CTA of the coords box plan with persistent tables: the most, up to 8, whose
    busiest SM (waves x packs per CTA, one CTA per SM) runs no more packs than with one pack per CTA."""
    busiest = lambda k: -(-(-(-packs // k) * nhg) // slots) * k  # noqa: E731
    return max([1] + [k for k in range(2, 9) if busiest(k) <= busiest(1)])


def bwd_box_tmax(cap: int, T: int, d: int, es: int, smem_limit: int = SMEM_OPTIN, ph: int = 0) -> Tuple[int, int]:
    """plan_backward's coords box budget: (tmax, dynamic shared memory), tmax the most entries <= T
    whose box layout (ph heads' persistent tables included) fits; (0, 0) when none does, or when tmax < T
    and the whole-table two-pass layout (for packs whose box is larger) does not fit either."""
    full = layout_bytes(cap, T, d, es, 5, 1, True, T + 1)
    lo, hi = 0, T
    while lo < hi:
        mid = hi - (hi - lo) // 2
        lo, hi = (mid, hi) if bwd_box_bytes(cap, mid, d, es, ph) <= smem_limit else (lo, mid - 1)
    if lo < 1 or (lo < T and full > smem_limit):
        return 0, 0
    return lo, max(bwd_box_bytes(cap, lo, d, es, ph), full if lo < T else 0)


def mixmim_mask(H: int, W: int, seed: int = 0) -> np.ndarray:
    """MixMIM's group labels: 24 of the 7x7 stage-4 tokens from the other image, upsampled to H x W."""
    rng = np.random.default_rng(seed)
    m = np.zeros(49, np.int64)
    m[rng.permutation(49)[:24]] = 1
    return np.repeat(np.repeat(m.reshape(7, 7), H // 7, 0), W // 7, 1)


def _bands(n: int, w: int, shift: int) -> np.ndarray:
    ids = np.zeros(n, np.int64)
    if shift:
        ids[n - w:n - shift], ids[n - shift:] = 1, 2
    return ids


def _assign_shifts(costs) -> int:
    """Iterations of assign_items' insertion-sort ``while`` (stable, cost descending)."""
    order, shifts = [], 0
    for i, c in enumerate(costs):
        k = i
        order.append(i)
        while k > 0 and costs[order[k - 1]] < c:
            order[k] = order[k - 1]
            k -= 1
            shifts += 1
        order[k] = i
    return shifts


def _pack_stats(kp: Tuple[Tuple[int, ...], ...], N: int) -> Dict[str, Any]:
    """Prologue of one pack (windows' (region, label) keys): tiles, blocks walked, loop counts."""
    segs, scan, sizes = [], [], []
    off = 0
    for k in kp:
        first: Dict[int, int] = {}
        ids = [first.setdefault(v, j) for j, v in enumerate(k)]
        # segment_ids' scan of token j: up to and including its segment's first token (break), or j
        scan += [fid + 1 if fid < j else j for j, fid in enumerate(ids)]
        for fid in sorted(set(ids)):
            c = ids.count(fid)
            sizes.append(c)
            segs += [(off, off + c)] * c
            off += c
    nvalid = len(segs)
    nt = (nvalid + 15) // 16
    c32, c16, tb = Counter(), Counter(), []
    for t in range(nt):
        last = min(16 * t + 15, nvalid - 1)
        lo, hi = segs[16 * t][0], segs[last][1]
        uni = last == 16 * t + 15 and segs[16 * t][0] == segs[last][0]
        b0, end = lo & ~15, _round16(hi)
        tb.append((end - b0) // 16)
        for b in range(b0, end, 16):  # the backward: 16-key blocks
            c16[(16, not (uni and b >= lo and b + 16 <= hi))] += 1
    # the forward's tiles: align_segments (window_attention_fwd.cuh) starts every segment of a one-window
    # pack at a multiple of 16 slots when they still fit in the pack's cap slots; then each tile is
    # one segment's (its padding rows included) and walks that segment's keys
    # kinds: fwd_unit's units of a one-window pack's aligned layout: a segment's tiles in pairs ("p": the
    # pair's first tile, "t": its second) and its odd last tile single ("s"); every other tile "s"
    ftiles = []
    if len(kp) == 1 and sum(_round16(c) for c in sizes) <= _round16(N):
        off = 0
        for c in sizes:
            n = _round16(c) // 16
            ftiles += [(off, off + c, True, "t" if k & 1 else "p" if k + 1 < n else "s") for k in range(n)]
            off += _round16(c)
    else:
        for t in range(nt):
            last = min(16 * t + 15, nvalid - 1)
            ftiles.append((segs[16 * t][0], segs[last][1],
                           last == 16 * t + 15 and segs[16 * t][0] == segs[last][0], "s"))
    # u32p / u32s: the blocks walked by the pair / single units (each unit walks its segment once) and
    # their number ("n")
    u32p, u32s = Counter(), Counter()
    for lo, hi, uni, kind in ftiles:
        if len(kp) > 1:  # fwd_tile (packs of several windows): 32-key blocks from lo & ~15, a last one of 16
            b, end = lo & ~15, _round16(hi)
            while b < end:
                wd = 32 if b + 32 <= end else 16
                c32[(wd, not (uni and b >= lo and b + wd <= hi))] += 1
                b += wd
            continue
        # fwd_unit (one-window packs): masked prefix [b0, b0 + P) and suffix [end - Q, end), unmasked middle; 32-key blocks,
        # 16 where 32 do not fit
        # (one_walk: a last 16 keys holding 1..8 of the segment take an 8-key block, Q = 8 or 24)
        b0, end = lo & ~15, _round16(hi)
        P, Q = end - b0, 0
        if uni:
            L = _round16(lo)
            R = max(L, hi & ~15)
            u = (R - L) >> 4
            eight = 1 <= (hi & 15) <= 8
            P, Q = L - b0, end - R
            if u & 1:
                if P:
                    P += 16
                elif Q and not eight:
                    Q += 16
            elif P and Q:
                P, Q = (P + 16, Q + 16) if u else (32, 0)
            if eight and Q:
                Q, end = Q - 8, end - 8
        mid = end - Q - b0 - P
        walk = Counter({(32, True): (P >> 5) + (Q == 32), (16, True): ((P >> 4) & 1) + ((Q >> 4) & 1),
                        (8, True): (Q >> 3) & 1, (64, False): mid // 64, (32, False): mid % 64 // 32,
                        (16, False): mid % 32 // 16})
        c32.update(walk)
        if kind != "t":
            unit = u32p if kind == "p" else u32s
            unit.update(walk)
            unit["n"] += 1
    warps = [max(scan[w:w + 32]) for w in range(0, nvalid, 32)]
    # pack_segment_id (the fused prologue): the first lane of each (window, key) in a warp leads and
    # scans the earlier leaders of its window in token order, up to and including the first match
    flat = [(i, j, v) for i, k in enumerate(kp) for j, v in enumerate(k)]
    lead, seen = [], set()
    for n, (i, j, v) in enumerate(flat):
        if (n // 32, i, v) not in seen:
            seen.add((n // 32, i, v))
            lead.append(n)
    lscan = [0] * len(warps)
    for e, n in enumerate(lead):
        i, _, v = flat[n]
        e0 = next(x for x, m in enumerate(lead) if flat[m][0] == i)  # the window's first token's entry
        hit = next((x for x in range(e0, e) if flat[lead[x]][2] == v), None)
        lscan[n // 32] = max(lscan[n // 32], e - e0 if hit is None else hit - e0 + 1)
    # the legacy kernels run segment_ids on one window at a time: warps of 32 tokens of a window
    wwarps = [max(scan[i + w:i + min(w + 32, N)]) for i in range(0, nvalid, N) for w in range(0, N, 32)]
    return dict(nvalid=nvalid, tiles=nt, ftiles=len(ftiles), c32=c32, c16=c16, u32p=u32p, u32s=u32s, scan=sum(warps), scan_warps=len(warps),
                lscan=sum(lscan),
                scan_win=sum(wwarps), scan_win_warps=len(wwarps),
                shifts_fwd=_assign_shifts([b + 1 for b in tb]),
                shifts_bwd=_assign_shifts([(b + 1) * 5 for b in tb] + [(b + 1) * 4 for b in tb]))


def _keys(B: int, H: int, W: int, w: int, shift: int, group: Optional[np.ndarray]) -> np.ndarray:
    """(windows, N) segment keys (region << 32 | label) of the rolled grid, batch-major."""
    reg = _bands(H, w, shift)[:, None] * 3 + _bands(W, w, shift)[None, :]
    lab = np.zeros((H, W), np.int64) if group is None else np.roll(group, (-shift, -shift), (0, 1))
    part = lambda a: a.reshape(H // w, w, W // w, w).transpose(0, 2, 1, 3).reshape(-1, w * w)  # noqa: E731
    return np.tile(part(reg) * (1 << 32) + part(lab), (B, 1))


def _aggregate(keys: np.ndarray) -> Dict[str, Any]:
    nwin, N = keys.shape
    P = pick_pack(N, nwin)
    tot: Dict[str, Any] = dict(c32=Counter(), c16=Counter(), u32p=Counter(), u32s=Counter(), nvalid=Counter())
    cache: Dict[Any, Dict[str, Any]] = {}
    for p0 in range(0, nwin, P):
        kp = tuple(tuple(int(x) for x in k) for k in keys[p0:p0 + P])
        if kp not in cache:
            cache[kp] = _pack_stats(kp, N)
        s = cache[kp]
        tot["c32"].update(s["c32"])
        tot["c16"].update(s["c16"])
        tot["u32p"].update(s["u32p"])
        tot["u32s"].update(s["u32s"])
        tot["nvalid"][s["nvalid"]] += 1
        for k in ("tiles", "ftiles", "scan", "scan_warps", "lscan", "scan_win", "scan_win_warps", "shifts_fwd", "shifts_bwd"):
            tot[k] = tot.get(k, 0) + s[k]
    return dict(tot, packs=math.ceil(nwin / P), P=P, N=N, nwin=nwin, cap=_round16(P * N))


_MEMO: Dict[Tuple, Dict[str, Any]] = {}


def attention_workload(B: int, H: int, W: int, w: int, shift: int, group: bool, seed: int = 0) -> Dict[str, Any]:
    """Totals over all packs of a call (memoized): ``tiles`` (16-row tiles of the prologue's
    layout; ``ftiles``: the forward's, after align_segments); ``c32`` / ``c16`` Counters of
    (width, masked) key blocks of the forward / backward walks (each key of each 16-row tile's range
    in one block of each; the forward's tiles are ``ftiles``); ``u32p`` / ``u32s``: the forward's
    one-window walks by unit (fwd_unit's pairs / single tiles: blocks walked, as ``c32``, and ``n`` units;
    packs of several windows: all single, ``u32s`` empty there); ``nvalid`` Counter of valid slots per
    pack; ``scan`` / ``scan_warps``: segment_ids' inner-loop iterations summed over the warps that run
    it (a warp runs until its longest lane is done) and their number (``lscan``: the same for the fused
    prologue's pack_segment_id, whose leaders scan the earlier leaders; ``scan_win`` / ``scan_win_warps``:
    the same for one window per call, as the legacy kernels run it); ``shifts_fwd`` / ``shifts_bwd``:
    assign_items' insertion-sort iterations; ``packs``, ``P``, ``N``, ``nwin``, ``cap``."""
    key = (B, H, W, w, shift, group, seed)
    if key not in _MEMO:
        _MEMO[key] = _aggregate(_keys(B, H, W, w, shift, mixmim_mask(H, W, seed) if group else None))
    return _MEMO[key]


def seg_walk(H: int, W: int, w: int, shift: int, group: bool, bm: int, bn: int, seed: int = 0,
             tail: bool = False, wide: bool = False, quarter: bool = False) -> Dict[str, float]:
    """The Triton by-segment forward's walk (``mixkernels/triton/_wattn_seg.py``) on the case's masks,
    averaged over the windows (every image has the same windows): a segment of s tokens is cut into
    query tiles of bm rows, its last rows in a tile of bm/2 when they fit one; every tile walks
    floor(s/bn) unmasked key blocks and one masked block when bn does not divide s. Per window:
    ``big`` / ``small`` tiles (``tiles`` both); per tile of each kind: ``full_big``, ``masked_big``,
    ``full_small``, ``masked_small`` blocks (``full``, ``masked``: over all tiles); ``pairs``: computed
    (row, key) pairs per window, ``live``: attending pairs per window. ``tail`` (the kernel's TAIL): the
    last s % bn keys take a masked bn/2 block when they fit one (``tail_big``, ``tail_small`` per tile;
    ``masked_*`` then counts only the masked bn blocks). ``wide`` (the kernel's WIDE): unmasked blocks
    two at a time (``wide_big``, ``wide_small``: double blocks per tile; ``full_*``: the single ones).
    ``quarter`` (the kernel's QUARTER, with ``tail``): the last s % bn <= bn/4 keys take a masked bn/4 block
    (``quarter_big``, ``quarter_small`` per tile; ``tail_*`` then counts only the bn/2 blocks)."""
    keys = _keys(1, H, W, w, shift, mixmim_mask(H, W, seed) if group else None)
    c: Counter = Counter()
    for k in keys:
        for s in np.unique(k, return_counts=True)[1].tolist():
            nt = -(-s // bm)
            small = int(s - bm * (nt - 1) <= bm // 2)
            for kind, n in (("big", nt - small), ("small", small)):
                c[kind] += n
                r = s % bn
                quart = tail and quarter and 0 < r <= bn // 4
                half = tail and 0 < r <= bn // 2 and not quart
                c["full_" + kind] += n * (s // bn % 2 if wide else s // bn)
                c["wide_" + kind] += n * (s // (2 * bn) if wide else 0)
                c["masked_" + kind] += n * (r != 0 and not half and not quart)
                c["tail_" + kind] += n * half
                c["quarter_" + kind] += n * quart
            r = s % bn
            last = bn // 4 if tail and quarter and 0 < r <= bn // 4 else bn // 2 if tail and 0 < r <= bn // 2 \
                else -(-r // bn) * bn
            keys_walked = (s // bn) * bn + last
            c["pairs"] += ((nt - small) * bm + small * (bm // 2)) * keys_walked
            c["live"] += s * s
    n, t = len(keys), c["big"] + c["small"]
    div = lambda a, b: a / b if b else 0.0  # noqa: E731
    return dict(tiles=t / n, big=c["big"] / n, small=c["small"] / n,
                full=(c["full_big"] + c["full_small"]) / t, masked=(c["masked_big"] + c["masked_small"]) / t,
                full_big=div(c["full_big"], c["big"]), masked_big=div(c["masked_big"], c["big"]),
                full_small=div(c["full_small"], c["small"]), masked_small=div(c["masked_small"], c["small"]),
                tail_big=div(c["tail_big"], c["big"]), tail_small=div(c["tail_small"], c["small"]),
                quarter_big=div(c["quarter_big"], c["big"]), quarter_small=div(c["quarter_small"], c["small"]),
                wide_big=div(c["wide_big"], c["big"]), wide_small=div(c["wide_small"], c["small"]),
                pairs=c["pairs"] / n, live=c["live"] / n)


def _retry_rounds(kp: Tuple[Tuple[int, ...], ...], N: int, w: int, r: int, per_t: bool) -> Tuple[int, int]:
    """The fused backward's key blocks of one pack (the one-pass plan's key pass) and their bias-gradient
    retry rounds (table_add_batch): in each of a block's 8 steps the warp's 32 lanes (g, t) try one CAS
    each, key slot 16 tile + g + 8 rr, query slot block + 8 j + 2 t + e, into the table of their t
    (per_t) or one shared table; of the lanes of one step that hit one entry only one lands per round,
    so a block takes max(multiplicity) - 1 rounds (other warps in between are not modelled). Masked and
    padding pairs try their exact 0 too."""
    segs, pos = [], []
    off = 0
    for wi, k in enumerate(kp):
        first: Dict[int, int] = {}
        ids = [first.setdefault(v, j) for j, v in enumerate(k)]
        for fid in sorted(set(ids)):
            js = [j for j, f in enumerate(ids) if f == fid]
            segs += [(off, off + len(js))] * len(js)
            pos += [wi * N + j for j in js]
            off += len(js)
    nvalid = len(segs)
    cap = _round16(nvalid)
    pos += list(range(nvalid, cap))  # padding slots: their own index (positions in a later window)
    j = np.array(pos) % N
    P = (j // w) * (2 * r - 1) + j % w
    g, t = np.arange(32) >> 2, np.arange(32) & 3
    blocks = rounds = 0
    for kt in range(cap // 16):
        last = min(16 * kt + 15, nvalid - 1)
        lo, hi = segs[16 * kt][0], segs[last][1]
        for b in range(lo & ~15, _round16(hi), 16):
            worst = 1
            for jj in range(2):
                for e in range(2):
                    for rr in range(2):
                        ent = (P[b + 8 * jj + 2 * t + e] - P[16 * kt + g + 8 * rr]) * 4 + (t if per_t else 0)
                        worst = max(worst, int(np.unique(ent, return_counts=True)[1].max()))
            blocks += 1
            rounds += worst - 1
    return blocks, rounds


def drpb_retry_rounds(B: int, H: int, W: int, w: int, shift: int, group: bool, r: int, per_t: bool = True,
                      seed: int = 0) -> float:
    """Bias-gradient retry rounds per key block of the fused backward's one-pass key pass (see
    _retry_rounds), averaged over the call's blocks (memoized)."""
    key = ("retry", B, H, W, w, shift, group, r, per_t, seed)
    if key not in _MEMO:
        keys = _keys(B, H, W, w, shift, mixmim_mask(H, W, seed) if group else None)
        nwin, N = keys.shape
        P = pick_pack(N, nwin)
        cache: Dict[Any, Tuple[int, int]] = {}
        blocks = rounds = 0
        for p0 in range(0, nwin, P):
            kp = tuple(tuple(int(x) for x in k) for k in keys[p0:p0 + P])
            if kp not in cache:
                cache[kp] = _retry_rounds(kp, N, w, r, per_t)
            blocks += cache[kp][0]
            rounds += cache[kp][1]
        _MEMO[key] = rounds / max(1, blocks)
    return _MEMO[key]
