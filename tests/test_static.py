"""The static performance report itself (mixkernels/bench/static*.py): SASS CFG and loop weighting,
occupancy, floor bytes, trip-count rules, the CI gate's logic, and the report's JSON (one tiny
end-to-end run: two token-op kernels compiled for sm_90). CPU only."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mixkernels.bench import static_cases, static_model, static_rules, static_sass

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SRC = """x = 0
y = 1
if y:
    y = 2
for i in range(0, n):
    y += 1
    for j in range(0, m):
        y += 2
"""


def _listing(src):
    f = f'"{src}"'
    return f"""
	.target	sm_90a
//--------------------- .text.k         --------------------------
	.section	.text.k,"ax",@progbits
k:
.text.k:
	//## File {f}, line 1
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
	//## File {f}, line 4
        /*0030*/                   MUFU.EX2 R2, R2 ;
.L_x_1:
	//## File {f}, line 3
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_2:
	//## File {f}, line 6
        /*0050*/                   FADD R5, R4, R5 ;
.L_x_3:
	//## File {f}, line 8
        /*0060*/                   FFMA R6, R5, R5, R6 ;
        /*0070*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
	//## File {f}, line 7
        /*0080*/               @P1 BRA `(.L_x_3) ;
	//## File {f}, line 5
        /*0090*/               @P2 BRA `(.L_x_2) ;
        /*00a0*/                   EXIT ;
.L_x_4:
        /*00b0*/                   BRA `(.L_x_4);
        /*00c0*/                   NOP;
//--------------------- SYMBOLS --------------------------
"""


@pytest.fixture
def kernel(tmp_path):
    src = tmp_path / "k.py"
    src.write_text(_SRC)
    return static_sass.parse(_listing(str(src)))["k"]


def test_sass_cfg_finds_nested_loops_by_back_edges(kernel):
    assert kernel.static_count() == 11  # the unreachable self-loop after EXIT (and padding) excluded
    assert len(kernel.loops) == 2
    outer, inner = sorted(kernel.loops, key=lambda lp: len(lp.body), reverse=True)
    assert inner.parent == kernel.loops.index(outer)
    assert outer.site.line == 5 and "for i in range" in outer.site.text
    assert inner.site.line == 7 and "for j in range" in inner.site.text


def test_sass_weighting_multiplies_trip_counts(kernel):
    trips = {5: 3.0, 7: 4.0}
    c = static_sass.weigh(kernel, lambda lp: (trips[lp.site.line], "test"))
    # 3 (entry) + 1 (if body) + 1 (LDG) + 3 x (1 + 4 x 3 + 1) (loops) + 1 (EXIT)
    assert c["total"] == 48
    assert c["mma"] == 12 and c["mma_flops"] == 12 * 4096 and c["mma_sync"] == 12
    assert c["mma_sync_flops"] == c["mma_flops"]
    assert c["mufu"] == 1 and c["mufu.ex2"] == 1
    assert c["global_bytes"] == 16 * 32
    # No rule: each loop counted once, and marked unmatched
    c1 = static_sass.weigh(kernel, lambda lp: (None, ""))
    assert c1["total"] == 3 + 1 + 1 + (1 + 3 + 1) + 1
    assert not any(lp.matched for lp in kernel.loops)


def test_sass_heaviest_path_and_unrolled_copies(tmp_path):
    src = tmp_path / "u.cu"
    src.write_text("a\nfor (i = 0; i < n; ++i) s += x[i];\nb\n")
    f = f'"{src}"'
    body4 = "".join(f"        /*{0x40 + 16 * k:04x}*/                   FADD R{k}, R{k}, R9 ;\n" for k in range(4))
    text = f"""
//--------------------- .text.u         --------------------------
u:
	//## File {f}, line 1
        /*0000*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0010*/               @P0 BRA `(.L_x_9) ;
        /*0020*/                   FADD R1, R1, R2 ;
        /*0030*/                   BRA `(.L_x_8) ;
.L_x_9:
        /*0038*/                   FADD R1, R1, R3 ;
.L_x_8:
	//## File {f}, line 2
.L_x_1:
{body4}        /*0080*/                   IADD3 R0, R0, 0x4, RZ ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*00e0*/                   FADD R1, R1, R9 ;
        /*00f0*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0100*/               @P2 BRA `(.L_x_2) ;
        /*0110*/                   EXIT ;
"""
    fn = static_sass.parse(text)["u"]
    assert len(fn.loops) == 2
    c = static_sass.weigh(fn, lambda lp: (10.0, "n = 10"))
    trips = sorted(lp.trips for lp in fn.loops)
    assert trips == [2.0, 2.0]  # x4 copy: 2 iterations (8 elements), x1 copy: the remaining 2
    # entry (2) + the heavier side of the if/else (FADD + BRA) + 2 x 6 + 2 x 3 + EXIT
    assert c["total"] == 2 + 2 + 2 * 6 + 2 * 3 + 1


def test_inflight_bytes_batches_loads_until_first_use(kernel):
    assert static_sass.inflight_bytes(kernel) == 16 * 32


@pytest.mark.parametrize("regs,smem,threads,ctas,limit", [
    (255, 0, 256, 1, "registers"),  # window-14 attention today
    (128, 20480, 128, 4, "registers"),
    (32, 0, 256, 8, "threads"),
    (64, 0, 1024, 1, "registers"),
    (16, 0, 32, 32, "blocks"),
    (40, 100 * 1024, 128, 2, "shared memory"),  # (102400 + 1 KB reserved) x 2 <= 228 KB
    (40, 227 * 1024, 128, 1, "shared memory"),
])
def test_occupancy_h100(regs, smem, threads, ctas, limit):
    occ = static_model.occupancy(regs, smem, threads)
    assert occ["ctas"] == ctas and occ["limit"] == limit


def test_occupancy_rejects_what_cannot_launch():
    assert static_model.occupancy(256, 0, 128)["ctas"] == 0
    assert static_model.occupancy(32, 228 * 1024, 128)["ctas"] == 0


def test_estimate_terms():
    m = static_model.MODEL
    # A copy-like launch: memory-bound at full bandwidth when enough bytes are in flight.
    e = static_model.estimate(programs=132 * 64, warps=4, ctas_per_sm=16, instr_per_warp=50, mufu_per_warp=0,
                              mma_flops_per_warp=0, mma_sync_flops_per_warp=0, hbm_bytes=1e9, inflight_bytes_per_warp=4096)
    assert e["bound"] == "memory" and e["mem_eff"] == 1.0
    assert e["us"] == pytest.approx(1e9 / m["hbm_bytes_per_s"] * 1e6 + m["launch_us"])
    # Issue-bound: one program per SM, 8 warps -> 2 per scheduler: full issue efficiency.
    e = static_model.estimate(programs=132, warps=8, ctas_per_sm=1, instr_per_warp=1e6, mufu_per_warp=0,
                              mma_flops_per_warp=0, mma_sync_flops_per_warp=0, hbm_bytes=0, inflight_bytes_per_warp=0)
    assert e["bound"] == "issue" and e["issue_eff"] == 1.0
    assert e["issue_us"] == pytest.approx(8 * 1e6 / (4 * m["clock_ghz"] * 1e9) * 1e6)
    # A GPU-scope barrier per instruction makes the warp's latency the bound.
    e = static_model.estimate(programs=132, warps=8, ctas_per_sm=1, instr_per_warp=1000, mufu_per_warp=0,
                              mma_flops_per_warp=0, mma_sync_flops_per_warp=0, hbm_bytes=0, inflight_bytes_per_warp=0,
                              membar_per_warp=1000)
    assert e["bound"] == "latency"
    # MMA time: wgmma FLOPs at the full rate, mma.sync FLOPs at mma_sync_fraction of it, each by its share
    # (a launch with a few mma.sync tail tiles is not charged at the mma.sync rate for all of its MMA).
    kw = dict(programs=132, warps=4, ctas_per_sm=1, instr_per_warp=0, mufu_per_warp=0, mma_flops_per_warp=4e6,
              hbm_bytes=0, inflight_bytes_per_warp=0)
    t = [static_model.estimate(mma_sync_flops_per_warp=s, **kw)["mma_us"] for s in (0, 1e6, 4e6)]
    assert t[0] == pytest.approx(4 * 4e6 / (m["mma_flop_per_sm_clk"] * m["clock_ghz"] * 1e9) * 1e6)
    assert t[2] == pytest.approx(t[0] / m["mma_sync_fraction"])
    assert t[1] == pytest.approx(t[0] * (0.75 + 0.25 / m["mma_sync_fraction"]))


def test_floor_bytes_match_design_section_7():
    cases = {(c.op, c.shape): c for c in static_cases.build_cases(("bf16",))}
    bw = static_model.MODEL["hbm_bytes_per_s"]
    fwd = cases[("window_attention_fwd", "mixmim-b-s1")]
    assert 4 * 128 * 56 * 56 * 128 * 2 == 411_041_792  # Q/K/V/O: 411 MB
    assert 411e6 <= fwd.floor_bytes <= 418e6  # + lse (6.4 MB), rpb table and group labels
    assert fwd.floor_bytes / bw * 1e6 == pytest.approx(97, abs=1)
    bwd = cases[("window_attention_bwd", "mixmim-b-s1")]
    assert bwd.floor_bytes == pytest.approx(829e6, rel=0.01)
    assert bwd.floor_bytes / bw * 1e6 == pytest.approx(193, abs=1)
    s4 = cases[("window_attention_fwd", "mixmim-b-s4")]
    assert s4.floor_bytes == pytest.approx(52e6, rel=0.02) and s4.floor_bytes / bw * 1e6 == pytest.approx(12, abs=0.5)
    assert fwd.elements == 128 * 16 * 4 * 196 * 196  # 315 M score elements
    mix = cases[("mix_tokens", "mixmim-b-s1")]
    assert mix.elements == mix.floor_bytes / 16


def test_rules_lane_strided_and_triton_range():
    assert static_rules.lane_strided(196, 256) == pytest.approx(7 / 8)  # warps 0..6 once, warp 7 not at all
    assert static_rules.lane_strided(1024, 128) == 8
    got = static_rules.triton_range("    for c in range(0, n_chunks):", {"n_chunks": 12})
    assert got[0] == 12
    assert static_rules.triton_range("    for b in range(b0, b1):", {"B": 4}) is None  # locals: needs a rule
    got = static_rules.triton_range("for s in range(0, N, BLOCK_N):", {"N": 2048, "BLOCK_N": 64})
    assert got[0] == 32


def test_rules_match_by_line_and_call_site():
    site = static_sass.LoopSite("c.cuh", 275, "  for (int i = threadIdx.x; i < rows * V; i += blockDim.x) {",
                                (("a.cu", 56, "    load_rows<T, D>(s_k, qkv + G.C + h * D, C3, ts.tok, c0, kcn, N);"),))
    ctx = static_rules.Ctx(dict(d=32, es=2, N=196), (4096, 4), 224, [0, 0, 0, 0, 2, 224, 224, 224],
                           "legacy::wattn_fwd_kernel")
    t, why = static_rules.trips_for(static_rules.CUDA_RULES, ctx, site, triton=False)
    assert t == pytest.approx(static_rules.lane_strided(224 * 4, 224)) and "column chunk" in why
    t, why = static_rules.trips_for(static_rules.CUDA_RULES, ctx,
                                    static_sass.LoopSite("x.cu", 1, "while (spin) {"), triton=False)
    assert t is None and why.startswith("unmatched")


def test_rules_tell_inlined_copies_apart_without_call_sites():
    # Triton 3.6's line info has no inlining call sites: a helper's loop inlined at two call sites is told
    # apart by its enclosing loops (Rule.inside); with call sites (3.9) ``via`` decides, as before
    rules = [static_rules.Rule(r"while n0 < a1", lambda c: 2.0, "half", via=r"tile\(M // 2", inside=r"while t < b \+ s"),
             static_rules.Rule(r"while n0 < a1", lambda c: 5.0, "full", via=r"tile\(M,", inside=r"while t < b:"),
             static_rules.Rule(r"return w \+ 1", lambda c: 7.0, "windows", via=r"next\(", inside=static_rules.TOP)]
    ctx = static_rules.Ctx({}, (1, 1, 1), 32, {}, "kernel")
    key = static_sass.LoopSite("k.py", 9, "        while n0 < a1:")
    go = static_sass.LoopSite("k.py", 5, "    while go:")
    small, big = static_sass.LoopSite("k.py", 30, "    while t < b + s:"), static_sass.LoopSite("k.py", 20, "    while t < b:")
    assert static_rules.trips_for(rules, ctx, key, True, [go, small])[0] == 2.0
    assert static_rules.trips_for(rules, ctx, key, True, [go, big])[0] == 5.0
    assert static_rules.trips_for(rules, ctx, key, True, [go])[0] is None          # neither: unmatched
    called = static_sass.LoopSite("k.py", 9, key.text, (("k.py", 21, "    tile(M, q)"),))
    assert static_rules.trips_for(rules, ctx, called, True, [go, small])[0] == 5.0  # call site wins
    ret = static_sass.LoopSite("c.py", 3, "    return w + 1, b")
    assert static_rules.trips_for(rules, ctx, ret, True, [])[0] == 7.0             # outermost loop
    assert static_rules.trips_for(rules, ctx, ret, True, [big])[0] is None


def test_mma_flops_count_tf32_at_half_the_16_bit_rate():
    assert static_sass.hmma_flops("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16
    assert static_sass.hmma_flops("HMMA.1688.F32.TF32") == 2 * (2 * 16 * 8 * 8)
    assert static_sass.hmma_flops("HGMMA.64x64x16.F32.BF16") == 2 * 64 * 64 * 16 / 4
    assert static_sass.hmma_flops("HGMMA.64x64x8.F32.TF32") == 2 * (2 * 64 * 64 * 8 / 4)


def test_loop_found_from_source_structure_when_the_back_edge_has_another_line(tmp_path):
    """ptxas may give a loop's back edge its closing brace or the body's last statement: the rule must
    still match (it once read the backward's CAS retry loop as run once: 533 us for 459)."""
    cu = tmp_path / "k.cuh"
    cu.write_text("void f() {\n"                                  # 1
                  "  while (__any_sync(m, miss != 0)) {  // {\n"  # 2
                  "    if (x) {\n"                                # 3
                  "      y = \"}\";\n"                          # 4
                  "    }\n"                                       # 5
                  "    z += 1;\n"                                 # 6
                  "  }\n"                                         # 7
                  "  for (int i = 0; i < n; ++i)\n"               # 8
                  "  {\n"                                         # 9
                  "    w(i);\n"                                   # 10
                  "  }\n"                                         # 11
                  "}\n")                                          # 12
    at = lambda ln: static_sass.LoopSite(str(cu), ln, cu.read_text().split("\n")[ln - 1])
    assert static_sass.enclosing_loop(at(7)).line == 2      # closing brace -> its loop statement
    assert static_sass.enclosing_loop(at(6)).line == 2      # last statement, past an if block
    assert static_sass.enclosing_loop(at(5)) is None        # an if's brace is no loop
    assert static_sass.enclosing_loop(at(11)).line == 8     # lone `{` on the line below the for
    assert static_sass.enclosing_loop(at(2)) is None        # already the loop statement
    py = tmp_path / "k.py"
    py.write_text("def k(n):\n    i = 0\n    while i < n:\n        if i:\n            pass\n        i += 1\n    return i\n")
    site = static_sass.LoopSite(str(py), 6, "        i += 1")
    assert static_sass.enclosing_loop(site).line == 3
    assert static_sass.enclosing_loop(static_sass.LoopSite(str(py), 7, "    return i")) is None

    # the real retry loop of the CUDA backward, by its closing brace
    path = os.path.join(_ROOT, "csrc", "cuda", "window_attention_bwd_tiles.cuh")
    src = open(path).read().split("\n")
    head = next(i for i, ln in enumerate(src) if "while (__any_sync(kFull, miss != 0))" in ln)
    depth, end = 0, None
    for i in range(head, len(src)):
        depth += src[i].count("{") - src[i].count("}")
        if depth == 0:
            end = i
            break
    ctx = static_rules.Ctx({}, (1, 1, 1), 256, [], "wattn_bwd_kernel", (), (256, 1, 1))
    t, why = static_rules.trips_for(static_rules.CUDA_RULES, ctx,
                                    static_sass.LoopSite(path, end + 1, src[end]), triton=False)
    assert "retry rounds" in why and f"loop at {head + 1}" in why, why


# ---- the rules describe the current attention kernels: every loop of their sources gets a trip count
_CUDA_ATTN = {"window_attention_fwd.cuh": None, "window_attention_bwd.cu": "struct BwdPlan {",
              "window_attention_common.cuh": None,  # file: where its device code ends (launch plans follow)
              "window_attention_bwd_tiles.cuh": None, "window_attention_bwd_items.cuh": None,
              "window_attention_bwd_box.cuh": None, "window_attention_fwd_pack.cuh": None,
              "window_attention_box.cuh": None}
# (_wattn_seg.py's loops need a case's segment model: the committed-report test below covers them)
_TRITON_ATTN = ("window_attention.py", "window_attention_bwd.py", "_wattn_bwd_tiles.py", "_wattn_bwd_sp.py")


def _loop_lines(path, marker=None, triton=False):
    """(line, text) of the loops a kernel compiles from ``path``: device code only, fully unrolled loops
    (``#pragma unroll`` but not ``#pragma unroll 1``, ``tl.static_range``) and host code left out."""
    lines = open(path).read().split("\n")
    if marker:
        lines = lines[:next(i for i, ln in enumerate(lines) if ln.startswith(marker))]
    out, jit = [], False
    for i, ln in enumerate(lines):
        if triton:
            if ln.startswith("@triton.jit"):
                jit = True
            elif ln and not ln[0].isspace() and not ln.startswith(("def ", ")")):
                jit = False
            if jit and re.match(r"\s*(for .* in .*range\(|while )", ln) and "static_range" not in ln:
                out.append((i + 1, ln))
        elif re.match(r"\s*(for|while) \(", ln) and (not lines[i - 1].strip().startswith("#pragma unroll")
                                                       or lines[i - 1].strip() == "#pragma unroll 1"):
            out.append((i + 1, ln))
    return out


def _n_units(wl):
    return wl["u32p"]["n"] + wl["u32s"]["n"]


def test_rules_count_the_forward_walk_per_unit_kind():
    """fwd_unit's walk loops are counted per unit (a pair walks its segment once for two tiles), told apart
    by the walk's call line; without pairs (head_dim 64) every tile is a single unit."""
    from mixkernels.bench import wattn_workload as ww

    wl = ww.attention_workload(128, 56, 56, 14, 0, True)
    path = os.path.join(_ROOT, "csrc", "cuda", "window_attention_fwd.cuh")
    src = open(path).read().splitlines()
    loop = next(i for i, t in enumerate(src) if "for (; kb + 64 <= m1; kb += 64)" in t)
    calls = {tag: next(i for i, t in enumerate(src) if f"fixed reference, {tag} units" in t) for tag in ("pair", "single")}
    units = next(i for i, t in enumerate(src) if "for (; u < npairs; u += kWarps)" in t)

    def trips(d, tag=None, text=None, line=loop):
        p = dict(B=128, H=56, W=56, heads=4, d=d, window=14, shift=0, r=14, es=2, group=True, N=196, T=729)
        pl = ww.plan("fwd", 128, 56, 56, 4, d, 14, 14, 14, 14)
        ctx = static_rules.Ctx(p, (pl["nslots"] * pl["nhg"], 1, 1), 256, [], "wattn_fwd_kernel",
                               ("__nv_bfloat16", str(d), "1", "false", "true", "true", "false"), (256, 1, 1))
        chain = ((path, calls[tag] + 1, src[calls[tag]]),) if tag else ()
        site = static_sass.LoopSite(path, line + 1, text or src[line], chain)
        return static_rules.trips_for(static_rules.CUDA_RULES, ctx, site, triton=False)

    assert trips(32, "pair")[0] == pytest.approx(wl["u32p"][(64, False)] / wl["u32p"]["n"])
    assert trips(32, "single")[0] == pytest.approx(wl["u32s"][(64, False)] / wl["u32s"]["n"])
    assert trips(32)[0] == pytest.approx(wl["c32"][(64, False)] / wl["ftiles"])  # no call site: a tile's share
    assert trips(64, "single")[0] == pytest.approx(wl["c32"][(64, False)] / wl["ftiles"])  # no pairs at d 64
    assert trips(32, line=units)[0] == pytest.approx(6 / 8)  # 6 pairs per pack over 8 warps
    assert trips(64, line=units)[0] == 0


def test_wattn_workload_plan_and_segments():
    from mixkernels.bench import wattn_workload as ww

    pl = ww.plan("fwd", 128, 56, 56, 4, 32, 14, 14, 14, 14)  # MixMIM-B stage 1 (csrc/cuda/NOTES.md)
    assert (pl["P"], pl["cap"], pl["npacks"], pl["hg"], pl["nbuf"], pl["smem"]) == (1, 208, 2048, 4, 2, 115232)
    # pack plans (batch-shared labels): 16 positions of 9536 B (208 slots x 44 B + tiles)
    assert (pl["ppi"], pl["plan_bytes"]) == (16, 9536)
    assert ww.plan("fwd", 1, 56, 56, 4, 32, 14, 14, 14, 14)["ppi"] == 0  # one image: no position shared
    assert ww.plan("fwd", 128, 7, 7, 32, 32, 7, 7, 7, 7)["ppi"] == 0  # stage 4: 1 window per image, 4 per pack
    assert ww.plan("fwd", 128, 14, 14, 16, 32, 14, 14, 14, 14)["ppi"] == 0  # stage 3: 2 CTAs per SM do not pay
    # backward: the one-pass layout (the two-pass one, 100256 B, with 4 interleaved {gradient, bias}
    # tables instead of one gradient table: + 20432 B) plus the 208 x 216 bf16 dS^T matrix
    assert (lambda pl: (pl["one"], pl["smem"]))(ww.plan("bwd", 128, 56, 56, 4, 32, 14, 14, 14, 14)) == (True, 210544)
    assert not ww.plan("bwd", 128, 56, 56, 4, 64, 14, 14, 14, 14)["one"]  # head_dim 64: two passes
    # backward heads per CTA: fewest waves x (4 hg + 3); MixMIM-B stage 4 (one-pass plan, one CTA per SM):
    # 8 heads x 128 CTAs, one wave
    assert (lambda pl: (pl["hg"], pl["nslots"] * pl["nhg"]))(ww.plan("bwd", 128, 7, 7, 32, 32, 7, 7, 7, 7)) == (8, 128)
    # coords box plan, UM-MAE-T stage 1 (683 packs of 3 windows): persistent box tables, 6 packs x 114 CTAs
    # (the busiest SM's 6 packs of one pack per CTA), hg 3, tables of 1140 >= 33 x 33 entries
    um = ww.plan("bwd", 128, 32, 32, 3, 32, 8, 8, 64, 64, coords=True)
    assert (um["pers"], um["hg"], um["nslots"], um["tmax"]) == (True, 3, 114, 1140)
    assert ww.box_packs_per_cta(171, 3, 132) == 4  # UM-MAE-T stage 2: 43 x 3 CTAs, one wave of 4 packs
    assert ww.plan("fwd", 128, 56, 56, 4, 32, 7, 7, 7, 7)["P"] == 4  # four 7x7 windows: 196 of 208 slots
    wl = ww.attention_workload(128, 56, 56, 14, 0, True)
    assert wl["tiles"] == 13 * 2048 and wl["nvalid"] == {196: 2048}
    pairs = lambda cnt: sum(16 * wd * n for (wd, _), n in cnt.items())  # noqa: E731
    assert pairs(wl["c16"]) / (2048 * 208 * 208) == pytest.approx(0.66, abs=0.01)  # two groups: ~2/3 of dense
    # the forward's aligned packs (every segment at a 16-slot start; they all fit at this shape): each
    # tile walks only its segment's keys, fewer than the backward's tiles that span two segments
    # (0.92 with 16-key tails; a last 16 keys holding 1..8 of the segment takes an 8-key block: 0.88, in the
    # kernels with the 8-key loop: static_rules._eight; the cosine ones take it as a 16-key block)
    assert wl["ftiles"] == wl["tiles"] and pairs(wl["c32"]) / pairs(wl["c16"]) == pytest.approx(0.88, abs=0.01)
    # masked blocks: only at a segment's padded end (8 keys, 16, or 32 to leave an even unmasked middle)
    assert wl["c32"][(32, True)] + wl["c32"][(16, True)] + wl["c32"][(8, True)] <= wl["ftiles"]
    assert wl["c32"][(8, True)] > wl["ftiles"] / 2  # most MixMIM segments end 4 or 8 keys into a block
    live = sum(int(n) ** 2 for k in ww._keys(128, 56, 56, 14, 0, ww.mixmim_mask(56, 56))
               for n in np.unique(k, return_counts=True)[1])
    assert live < pairs(wl["c32"]) < 1.15 * live
    # fwd_unit's units (align_segments' flags): a segment's tiles in pairs, an odd last tile single; a pair
    # walks its segment once for both tiles. MixMIM-B stage 1: 6 pairs + 1 single per pack
    assert (wl["u32p"]["n"], wl["u32s"]["n"]) == (6 * 2048, 2048)
    assert all(wl["c32"][k] == 2 * wl["u32p"][k] + wl["u32s"][k] for k in wl["c32"])
    assert not _n_units(ww.attention_workload(128, 7, 7, 7, 0, False))  # several windows per pack: no units
    plain7 = ww.attention_workload(128, 7, 7, 7, 0, False)
    assert pairs(plain7["c32"]) == pairs(plain7["c16"])  # several windows per pack: the same layout
    plain = ww.attention_workload(128, 7, 7, 7, 0, False)  # Swin stage 4: no mask, windows never meet
    # tile t (rows 16t..16t+15 of 196) walks the 16-key blocks from its first row's window start to its
    # last row's window end
    blocks = sum((-(-49 * (min(16 * t + 15, 195) // 49 + 1) // 16)) - 49 * (16 * t // 49) // 16 for t in range(13))
    assert pairs(plain["c16"]) == 32 * 256 * blocks
    # segment_ids' scan: without labels or shift every token's segment starts at its window's first
    assert plain["scan"] == plain["scan_warps"]


def test_wattn_workload_forward_coords_plan():
    from mixkernels.bench import static_model
    from mixkernels.bench import wattn_workload as ww

    # UM-MAE-T stage 1 (683 packs of 3 windows, 3 heads): box tables of 1,839 entries keep the CTA at
    # two per SM; 129 CTAs of 16 (pack, head) items, at most 6 packs each
    pl = ww.plan("fwd", 128, 32, 32, 3, 32, 8, 8, 64, 64, coords=True)
    assert (pl["P"], pl["npacks"], pl["ipc"], pl["ppc"], pl["nslots"], pl["nbuf"], pl["tmax"]) == \
        (3, 683, 16, 6, 129, 2, 1839)
    assert static_model.occupancy(128, pl["smem"], 256)["ctas"] == 2
    # range_packs: the most packs a range of ipc items touches, against every range of a long grid
    for nH in (1, 2, 3, 4, 6):
        for ipc in range(1, 20):
            most = max((b * ipc + ipc - 1) // nH - b * ipc // nH + 1 for b in range(200))
            assert ww.range_packs(ipc, nH) == most, (ipc, nH)
    # without coords the forward keeps heads_per_cta's plan (one pack per CTA)
    pl = ww.plan("fwd", 128, 32, 32, 3, 32, 8, 8, 8, 8)
    assert (pl["ipc"], pl["ppc"], pl["tmax"]) == (ww.heads_per_cta(pl["npacks"], 3, 132), 1, 0)


@pytest.mark.parametrize("shape", static_cases.HEADLINE)
def test_rules_match_every_fused_cuda_attention_loop(shape):
    from mixkernels.bench import wattn_workload as ww

    cases = {c.op: c for c in static_cases.build_cases(("bf16",), [shape])}
    bad = []
    for f, marker in _CUDA_ATTN.items():
        path = os.path.join(_ROOT, "csrc", "cuda", f)
        loops = _loop_lines(path, marker)
        assert loops, f
        for kind in ("fwd", "bwd"):
            if f != "window_attention_common.cuh" and ("bwd" in f) != (kind == "bwd"):
                continue
            p = cases[f"window_attention_{kind}"].params
            pl = ww.plan(kind, p["B"], p["H"], p["W"], p["heads"], p["d"], p["window"], p["window"], p["r"], p["r"],
                         p["es"], coords=bool(p.get("coords", False)))
            assert pl["fits"]
            ctx = static_rules.Ctx(p, (pl["nslots"] * pl["nhg"], 1, 1), 256, [], f"wattn_{kind}_kernel",
                                   ("__nv_bfloat16", "32", "1", "false"), (256, 1, 1))
            for line, text in loops:
                t, why = static_rules.trips_for(static_rules.CUDA_RULES, ctx, static_sass.LoopSite(path, line, text),
                                                triton=False)
                if t is None or not t >= 0:
                    bad.append(f"{kind} {f}:{line} `{text.strip()}`: {why}")
    assert not bad, "\n".join(bad)


def test_rules_match_every_triton_attention_loop():
    import ast

    bad = []
    paths = [os.path.join(_ROOT, "mixkernels", "triton", f) for f in _TRITON_ATTN]
    # the kernels' parameters (helper modules hold no kernels: their loops see the kernels' launches)
    params = {a.arg for path in paths for fn in ast.walk(ast.parse(open(path).read()))
              if isinstance(fn, ast.FunctionDef) and fn.name.endswith("_kernel") for a in fn.args.args}
    args = {k: 2 for k in params}  # any launch: names only (range() bounds must be kernel arguments)
    ctx = static_rules.Ctx({}, (1, 1, 1), 128, args, "kernel")
    for f, path in zip(_TRITON_ATTN, paths):
        loops = _loop_lines(path, triton=True)
        assert loops, f
        for line, text in loops:
            t, why = static_rules.trips_for(static_rules.TRITON_RULES, ctx, static_sass.LoopSite(path, line, text),
                                            triton=True)
            if t is None:
                bad.append(f"{f}:{line} `{text.strip()}`: {why}")
    assert not bad, "\n".join(bad)


def test_committed_report_counts_every_headline_attention_loop():
    """The committed static report (benchmarks/results/static) has no unmatched loops in its bf16
    headline attention records, CUDA and Triton, forward and backward."""
    with open(os.path.join(_ROOT, "benchmarks", "results", "static", "static.json")) as f:
        recs = json.load(f)["records"]
    head = [r for r in recs if r["kernel"].startswith("window_attention") and r["dtype"] == "bf16"
            and r["shape"] in static_cases.HEADLINE]
    assert {(r["backend"], r["kernel"]) for r in head} == {
        (b, f"window_attention_{k}") for b in ("cuda", "triton") for k in ("fwd", "bwd")}
    bad = [f"{r['backend']} {r['kernel']} {r['shape']}: {r['unmatched_loops'][:3]}" for r in head
           if r["unmatched_loops"] or r["error"]]
    assert not bad, "\n".join(bad)


def _rec(**kw):
    r = dict(backend="triton", kernel="window_attention_fwd", shape="mixmim-b-s1", dtype="bf16", spill_bytes=0,
             error=None, dominant_kernel="_fwd_kernel", registers=200)
    r.update(kw)
    return r


def test_gate_fails_on_spills_outside_the_allow_list(monkeypatch):
    from mixkernels.bench import static

    monkeypatch.setattr(static, "ALLOWED_SPILLS", {("triton", "window_attention_fwd", "mixmim-b-s1")})
    assert static.gate_failures([_rec(spill_bytes=100)]) == []  # allow-listed
    assert static.gate_failures([_rec(spill_bytes=100, dtype="fp32")]) == []  # fp32 is not gated
    bad = static.gate_failures([_rec(spill_bytes=8, shape="swin-b-s1-shift"), _rec(dtype="fp16", shape="x"),
                                _rec(error="boom", shape="y")])
    assert len(bad) == 2 and "spills 8 B" in bad[0] and "ERROR boom" in bad[1]


def test_gate_warns_about_stale_allowances(monkeypatch):
    from mixkernels.bench import static

    monkeypatch.setattr(static, "ALLOWED_SPILLS", {("triton", "window_attention_fwd", "mixmim-b-s1")})
    assert static.stale_allowances([_rec(spill_bytes=0), _rec(spill_bytes=0, dtype="fp16")]) == [
        "triton window_attention_fwd mixmim-b-s1"]
    assert static.stale_allowances([_rec(spill_bytes=0), _rec(spill_bytes=4, dtype="fp16")]) == []


def test_ptxas_log_parsing():
    from mixkernels.bench import aot

    log = ("ptxas info    : Compiling entry function 'a' for 'sm_90'\nptxas info    : Function properties for a\n"
           "    48 bytes stack frame, 48 bytes spill stores, 52 bytes spill loads\n"
           "ptxas info    : Used 255 registers\nptxas info    : Compiling entry function 'b' for 'sm_90'\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem\n")
    assert aot.ptxas_stats(log, "a") == dict(regs=255, spill_st=48, spill_ld=52, stack=48, smem=-1)
    assert aot.ptxas_stats(log, "b")["regs"] == 40
    assert aot.ptxas_stats(log, "b")["smem"] == 4096  # static arrays (inline asm's), on top of Triton's dynamic


def test_launcher_side_work_is_recorded_and_priced(monkeypatch):
    # a launcher's own torch ops (tables, masks, memsets) run beside its kernels: each is one more launch
    import torch

    from mixkernels.bench import aot, static

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ops = []

    def launcher():
        x = torch.empty(1000, dtype=torch.float32)   # allocation and views move nothing
        t = x.view(10, 100).t()
        z = torch.zeros(4096, dtype=torch.int32)      # a memset: 16 KB written
        (t * 2.0).contiguous()                        # two launches: mul, then clone of the transposed result
        return z

    aot.capture(launcher, torch_ops=ops)
    assert [o["op"] for o in ops] == ["zeros", "mul", "clone"], ops
    assert ops[0] == dict(op="zeros", read_bytes=0, write_bytes=16384)
    assert ops[1]["read_bytes"] == 4000 and ops[1]["write_bytes"] == 4000
    side = static._side(ops)
    launch = static_model.MODEL["launch_us"]
    assert side[0]["us"] == pytest.approx(16384 / static._BW * 1e6 + launch, abs=1e-3)
    assert sum(o["us"] for o in side) > 3 * launch


def test_side_work_counts_an_overwritten_destination_as_written_only(monkeypatch):
    # ``out=`` buffers and write-only in-place destinations were also counted as read (their bytes twice)
    import torch

    from mixkernels.bench import aot

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ops = []

    def launcher():
        a = torch.empty(100, 10)                       # 4000 bytes
        torch.mul(a.t(), 2.0, out=a.new_empty((10, 100)))
        a.zero_()
        a.copy_(torch.empty(100, 10))
        a.add_(1.0)                                    # in place, read-modify-write: read as well

    aot.capture(launcher, torch_ops=ops)
    assert [(o["op"], o["read_bytes"], o["write_bytes"]) for o in ops] == [
        ("mul", 4000, 4000), ("zero_", 0, 4000), ("copy_", 4000, 4000), ("add_", 4000, 4000)], ops


REQUIRED = ("backend", "kernel", "shape", "dtype", "arch", "config", "registers", "spill_bytes", "smem_bytes",
            "threads", "ctas_per_sm", "instructions", "instructions_per_element", "floor_bytes", "floor_us", "est_us",
            "est_fraction_of_floor", "est_fraction_of_copy")


def test_report_end_to_end_json_and_compare(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    from mixkernels.bench.aot import clean_env

    out1, out2, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    cmd = [sys.executable, "-m", "mixkernels.bench", "--static", "--backend", "triton", "--dtype", "bf16",
           "--ops", "mix_tokens,window_merge", "--shapes", "mixmim-b-s1", "--no-calibration", "--cache", str(cache),
           "--jobs", "1"]
    r = subprocess.run(cmd + ["--out", str(out1), "--check"], cwd=_ROOT, env=clean_env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out1 / "static.json").read_text())
    assert set(doc) >= {"model", "records", "env"} and doc["model"]["n_sm"] == 132
    assert len(doc["records"]) == 2
    for rec in doc["records"]:
        assert all(k in rec for k in REQUIRED), sorted(set(REQUIRED) - set(rec))
        assert rec["error"] is None and rec["arch"] == "sm_90" and rec["spill_bytes"] == 0
        assert 0 < rec["est_fraction_of_floor"] <= 1 and rec["est_us"] >= rec["floor_us"]
        # a copy of the floor bytes costs floor + one launch: never below % floor
        assert rec["est_fraction_of_floor"] <= rec["est_fraction_of_copy"] <= 1
        assert rec["instructions"] > 0 and rec["registers"] > 0 and rec["ctas_per_sm"] >= 1
        assert not rec["unmatched_loops"]
    assert "Static estimate, no GPU" in (out1 / "static.md").read_text()
    r = subprocess.run(cmd + ["--out", str(out2), "--compare", str(out1 / "static.json")], cwd=_ROOT,
                       env=clean_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out2 / "static.md").read_text()
    assert "before -> after" in md and " -> " in md and "| % copy |" in md


def test_cuda_static_smem_leaves_out_the_system_reserve():
    """cuobjdump's SHARED on sm_90 carries the 1 KB per-CTA reserve (ptxas: 32 B smem, cuobjdump
    1056); the occupancy model adds the reserve itself, so it must be counted once."""
    from mixkernels.bench.static import _static_smem

    assert _static_smem({"SHARED": 1056}) == 32
    assert _static_smem({"SHARED": 1024}) == 0
    assert _static_smem({"SHARED": 0}) == 0 and _static_smem({}) == 0


def test_line_info_of_a_deleted_checkout_maps_to_this_one():
    """A compile-cache hit may carry line info from another checkout of the same sources (the cache
    is keyed by content); loop rules read the source text, so that path maps to this checkout."""
    here = static_sass.__file__
    gone = "/nonexistent/wt/old" + here[here.rfind("/mixkernels/"):]
    assert static_sass.source_path(gone) == os.path.abspath(here)
    assert static_sass._text(gone, 1) == static_sass._text(here, 1) != ""
    assert static_sass.source_path("/nonexistent/elsewhere.py") == "/nonexistent/elsewhere.py"
