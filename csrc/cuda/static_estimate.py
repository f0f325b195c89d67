"""Static estimate of the fused CUDA window-attention kernels at the headline shapes (no GPU).

    python csrc/cuda/static_estimate.py [--json out.json]

1. Compiles one instance per kernel (bf16, head_dim 32, relative-position table; sm_90, -O3 -lineinfo)
   with nvcc, reads registers / spills from ptxas and the SASS with nvdisasm (Triton's copy).
2. Per block of keys (16 x 32 forward, 16 x 16 backward, masked and unmasked paths) counts the SASS
   of the inner loop's two paths; per tile and per (CTA, head) the rest of the kernel, attributed
   through -lineinfo inline chains (loops there counted at their estimated trip counts).
3. Emulates the pack prologue (segments, sort, tile ranges) on the real masks (MixMIM's 7x7 mask
   upsampled, Swin's shift regions) to count the blocks of each kind the kernels walk.
4. Bottleneck model with the static report's constants (mixkernels/bench static model): issue
   (4 warp-instructions / clock / SM, efficiency from resident warps), MUFU (16 / clock / SM),
   mma.sync (half the wgmma rate: 2048 FLOP / clock / SM), HBM 4.3 TB/s, 2 us launch; shared memory
   (128 B / clock / SM) is reported beside it, not in the estimate.
What it cannot see: latencies, bank conflicts beyond the stated assumption, L2 behaviour, tails.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # this checkout's mixkernels, not an installed one

# The static report's helpers: tool lookup (Triton's nvdisasm, the real toolkit behind a wrapper nvcc),
# SASS parsing with CFG and natural loops, and the launch-plan / pack-prologue emulation.
from mixkernels.bench import wattn_workload as WW  # noqa: E402
from mixkernels.bench.aot import tool  # noqa: E402
from mixkernels.bench.static_cuda import cuda_home  # noqa: E402
from mixkernels.bench.static_sass import Function, disassemble  # noqa: E402
from mixkernels.bench.static_sass import parse as parse_sass  # noqa: E402
MODEL = dict(n_sm=132, clock_hz=1.98e9, ipc=4, warps_to_hide=2.0, mufu_per_clk=16, mma_flop_per_clk=2048,
             hbm=4.3e12, smem_bytes_per_clk=128, launch_us=2.0, regs_per_sm=65536, smem_per_sm=233472)
SHAPES = {  # B, HW, C, heads, window, shift, MixMIM group
    "mixmim-s1": (128, 56, 128, 4, 14, 0, True),
    "mixmim-s4": (128, 7, 1024, 32, 7, 0, True),
    "swin-s1-shift": (128, 56, 128, 4, 7, 3, False),
}


# ---------------------------------------------------------------------------------------- tools
def _nvcc():
    home = cuda_home()
    if home is None:
        raise SystemExit("no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) found")
    return os.path.join(home, "bin", "nvcc")


def compile_instance(src, marker, inst, work):
    """Kernels of `src` (text before `marker`) plus an explicit instantiation -> (ptxas info, its SASS)."""
    text = open(os.path.join(HERE, src)).read()
    body = text[: text.index(marker)]
    opens = len(re.findall(r"^namespace [\w:]+ \{", body, re.M)) - len(re.findall(r"^\}  // namespace", body, re.M))
    path = os.path.join(work, os.path.basename(src) + ".inst.cu")
    with open(path, "w") as f:
        f.write(body.replace('#include "window_attention_', f'#include "{HERE}/window_attention_') + "\n" + inst + "\n" +
                "}\n" * opens)
    cubin = path + ".cubin"
    r = subprocess.run([_nvcc(), "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                        "-I", os.path.join(ROOT, "csrc", "include"), "-Xptxas", "-v", path, "-o", cubin],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-4000:])
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill", r.stderr))
    return dict(registers=regs, spill_bytes=spills), only_function(disassemble(cubin, tool("nvdisasm"), keep=False))


# ------------------------------------------------------------------------------------ SASS / CFG
def only_function(sass: str, pick=None) -> Function:
    """The kernel of a listing (static_sass: basic blocks, successors, natural loops): the one whose
    mangled name satisfies `pick`, else the largest."""
    fns = [f for name, f in parse_sass(sass).items() if pick is None or pick(name)]
    return max(fns, key=lambda f: sum(len(b.instrs) for b in f.blocks))


def loops(fn: Function):
    """Natural loops: {header block: body block set}."""
    return {lp.header: set(lp.body) for lp in fn.loops}


def block_paths(fn: Function, body):
    """Instructions per iteration of a loop whose body splits into two paths (masked / unmasked)
    that rejoin: (prefix + common + path) for each path; nested retry loops count once."""
    blocks = fn.blocks
    h = min(body)
    reach = lambda starts, stop: _reach(fn, starts, stop | {h}, body)
    ops = lambda bs, op: sum(1 for x in bs for i in blocks[x].instrs if i.op.startswith(op))
    for b in sorted(body):
        ss = [s for s in blocks[b].succ if s in body and s != h]
        if len(ss) != 2:
            continue
        r1, r2 = reach([ss[0]], set()), reach([ss[1]], set())
        p1, p2 = r1 - r2, r2 - r1
        if ops(p1, "HMMA") and ops(p2, "HMMA"):
            pre = reach([h], {b} | p1 | p2 | (r1 & r2)) | {b}
            n = lambda bs: sum(len(blocks[x].instrs) for x in bs)
            base = n(pre) + n(r1 & r2)
            return sorted([(base + n(p), ops(p, "HMMA"), ops(p, "MUFU") + ops(pre, "MUFU")) for p in (p1, p2)])
    raise RuntimeError("no two-path block loop found")


def _reach(fn, starts, stop, body):
    seen, st = set(), list(starts)
    while st:
        b = st.pop()
        if b in seen or b in stop or b not in body:
            continue
        seen.add(b)
        st.extend(fn.blocks[b].succ)
    return seen


# ------------------------------------------------------------------------- workload (prologue)
# The launch plan and the pack prologue (segments, sort, tile ranges) are emulated by
# mixkernels/bench/wattn_workload.py: one model with the static report's trip-count rules.
pick_pack, mixmim_mask, workload = WW.pick_pack, WW.mixmim_mask, WW.workload


# ------------------------------------------------------------------------------------ estimate
def estimate(kind, shape, cost):
    B, HW, C, nH, w, shift, g = SHAPES[shape]
    wl = workload(B, HW, w, shift, mixmim_mask(HW, HW) if g else None, 32 if kind == "fwd" else 16)
    m = MODEL
    pl = WW.plan(kind, B, HW, HW, nH, C // nH, w, w, w, w, 2, True, False, m["n_sm"], m["smem_per_sm"] - 1024)
    hg = pl["hg"]
    cost = dict(cost, smem=pl["smem"])
    per_warp = math.ceil(cost["registers"] * 32 / 256) * 256
    ctas_sm = min(m["regs_per_sm"] // per_warp // 8, m["smem_per_sm"] // (math.ceil(cost["smem"] / 128) * 128 + 1024), 8)
    ctas = wl["packs"] * math.ceil(nH / hg)
    instr = mufu = flops = wav = elems = 0.0
    for (wd, masked), n in wl["counts"].items():
        c = cost["block"][(wd, masked)]
        instr += n * nH * c["instr"]
        mufu += n * nH * c["mufu"] * 32
        flops += n * nH * c["hmma"] * 4096
        wav += n * nH * c["smem_wavefronts"]
        elems += n * nH * 16 * wd
    instr += wl["tiles"] * nH * cost["tile"] * (1 if kind == "fwd" else 2)
    instr += ctas * (cost["prologue"] + hg * cost["head"])
    io = B * HW * HW * C * 2
    floor = (4 if kind == "fwd" else 8) * io + B * HW * HW * nH * 4
    resident = min(ctas / m["n_sm"], ctas_sm) * 8
    eff = min(1.0, resident / 4 / m["warps_to_hide"])
    clk = m["n_sm"] * m["clock_hz"]
    t = dict(issue=instr / (clk * m["ipc"] * eff), mufu=mufu / (clk * m["mufu_per_clk"]),
             mma=flops / (clk * m["mma_flop_per_clk"]), memory=floor / m["hbm"])
    smem_us = wav * 128 / (clk * m["smem_bytes_per_clk"]) * 1e6
    est = max(t.values()) * 1e6 + m["launch_us"]
    return dict(kernel=f"window_attention_{kind}", shape=shape, registers=cost["registers"],
                spill_bytes=cost["spill_bytes"], smem_bytes=cost["smem"], ctas_per_sm=ctas_sm, heads_per_cta=hg,
                windows_per_cta=wl["P"], ctas=ctas, floor_bytes=floor, floor_us=round(t["memory"] * 1e6, 1),
                issue_us=round(t["issue"] * 1e6, 1), mufu_us=round(t["mufu"] * 1e6, 1), mma_us=round(t["mma"] * 1e6, 1),
                smem_us=round(smem_us, 1), est_us=round(est, 1), est_fraction_of_floor=round(t["memory"] * 1e6 / est, 3),
                bound=max(t, key=t.get), instructions_per_element=round(instr * 32 / elems, 1),
                computed_pairs_vs_dense=round(elems / (B * (HW // w) ** 2 * nH * (((w * w + 15) // 16 * 16) ** 2)), 3))


def loop_lines(src, header):
    """(first, last) source lines of the loop whose header line contains `header` (brace matching)."""
    lines = open(os.path.join(HERE, src)).read().split("\n")
    i = next(k for k, l in enumerate(lines) if header in l)
    depth, j = 0, i
    while True:
        depth += lines[j].count("{") - lines[j].count("}")
        if depth == 0 and j > i:
            return i + 1, j + 1
        j += 1


def count_lines(fn: Function, src, first, last):
    """Instructions whose innermost frame in `src` lies in [first, last] (not inside other frames)."""
    path = os.path.realpath(os.path.join(HERE, src))
    n = 0
    for b in fn.blocks:
        for loc in (i.loc for i in b.instrs):
            if loc and os.path.realpath(loc[0][0]).endswith(os.path.basename(src) + ".inst.cu") and first <= loc[0][1] <= last:
                n += 1
            elif loc and os.path.realpath(loc[0][0]) == path and first <= loc[0][1] <= last:
                n += 1
    return n


def attribute(fn: Function, fns):
    """Instructions per innermost listed function found in each instruction's inline chain."""
    ranges = {}
    for path in glob.glob(os.path.join(HERE, "window_attention*.cu*")):
        lines = open(path).read().split("\n")
        i = 0
        while i < len(lines):
            l = lines[i]
            if l.startswith("__device__") or l.startswith("__global__"):
                name = re.findall(r"\b(\w+)\s*\(", l)
                name = [x for x in name if x not in ("__launch_bounds__",)]
                j = i
                while j < len(lines) and not lines[j].startswith("}"):
                    j += 1
                if name and name[0] in fns:
                    ranges.setdefault(os.path.realpath(path), []).append((i + 1, j + 1, name[0]))
                i = j
            i += 1
    out = Counter()
    for b in fn.blocks:
        for loc in (i.loc for i in b.instrs):
            key = "<kernel>"
            for f, ln in loc:
                hit = [n for s, e, n in ranges.get(os.path.realpath(f), []) if s <= ln <= e]
                if hit:
                    key = hit[0]
                    break
            out[key] += 1
    return out


def _has(fn: Function, body, op):
    return any(i.op.startswith(op) for x in body for i in fn.blocks[x].instrs)


def costs(work):
    """Per-unit warp-instruction costs of the bf16 / d32 / rpb kernels from their SASS."""
    res = {}
    info, fn = compile_instance("window_attention.cu", "int smem_limit() {",
                                  "template __global__ void wattn_fwd_kernel<__nv_bfloat16, 32, 1, false>(const FwdArgs);", work)
    lp = [b for b in loops(fn).values() if _has(fn, b, "HMMA")]
    inner = max((b for b in lp if not any(o < b for o in lp)), key=len)  # the 32-key block loop
    (u, uh, um), (mk, mh, mm) = block_paths(fn, inner)
    # lazy rescale: the 16+2 FMUL / 2 MUFU branch runs in about half the blocks at these shapes
    rescale = 20
    fwd_block = {(32, False): dict(instr=u - rescale / 2, hmma=uh, mufu=um - 1, smem_wavefronts=16 + 16 + 24 + 4),
                 (32, True): dict(instr=mk - rescale / 2, hmma=mh, mufu=mm - 1, smem_wavefronts=16 + 16 + 24 + 4)}
    fwd_block[(16, False)] = {k: v / 2 + (10 if k == "instr" else 0) for k, v in fwd_block[(32, False)].items()}
    fwd_block[(16, True)] = {k: v / 2 + (10 if k == "instr" else 0) for k, v in fwd_block[(32, True)].items()}
    att = attribute(fn, {"fwd_tile", "store_rows_warp", "prologue", "segment_ids", "assign_items",
                             "load_rows_async", "load_table_async", "rows_nonfinite", "zero_rows", "fwd_block", "fwd_exact"})
    res["fwd"] = dict(block=fwd_block, registers=info["registers"], spill_bytes=info["spill_bytes"],
                      tile=att["fwd_tile"] + att["store_rows_warp"],
                      # per CTA: every warp runs the prologue (its scan loops about once); thread 0 the assignment
                      prologue=8 * (att["prologue"] + att["segment_ids"] + att["zero_rows"]) + att["assign_items"],
                      # per (CTA, head): the load loops (two inlined copies, ~1 pass of the 4x-unrolled body
                      # at 208 rows) and the non-finite check, every warp
                      head=8 * (att["load_rows_async"] / 2 + att["load_table_async"] / 2 + att["rows_nonfinite"]))
    info, fn = compile_instance("window_attention_bwd.cu", "struct BwdPlan {",
                                  "template __global__ void wattn_bwd_kernel<__nv_bfloat16, 32, 1, false, false>(const BwdArgs);", work)
    hm = [b for b in loops(fn).values() if _has(fn, b, "HMMA")]
    innermost = [b for b in hm if not any(o < b for o in hm)]  # no other HMMA loop strictly inside
    paths = [block_paths(fn, b) for b in innermost]
    key_p = max(paths, key=lambda p: p[0][1])  # the key loop has 16 HMMA per 16x16 block
    qry_p = max((p for p in paths if p[0][1] < key_p[0][1]), key=lambda p: p[0][0])  # with the bias-gradient adds
    bwd_block = {}
    for masked in (False, True):
        k, q = key_p[int(masked)], qry_p[int(masked)]
        bwd_block[(16, masked)] = dict(instr=k[0] + q[0], hmma=k[1] + q[1], mufu=k[2] + q[2],
                                       smem_wavefronts=32 + 24 + 24 + 24 + 4)
    att = attribute(fn, {"key_item", "query_item", "store_rows_warp", "prologue", "segment_ids", "assign_items",
                             "load_rows_async", "load_table_async", "zero_rows", "key_block", "query_block"})
    res["bwd"] = dict(block=bwd_block, registers=info["registers"], spill_bytes=info["spill_bytes"],
                      tile=(att["key_item"] + att["query_item"] + att["store_rows_warp"]) / 2,
                      prologue=8 * (att["prologue"] + att["segment_ids"] + att["zero_rows"]) + att["assign_items"],
                      # per (CTA, head): loads (q/k/v, dO, O, table), delta and the bias-gradient flush: the
                      # head loop's own lines (loops there about once per pass), every warp
                      head=8 * (att["load_rows_async"] + att["load_table_async"] +
                                count_lines(fn, "window_attention_bwd.cu",
                                            *loop_lines("window_attention_bwd.cu", "for (int i = 0; i < nh; ++i)"))))
    return res


TOKEN_OPS = {  # op: (source, map name, rows, row bytes, bytes moved) at the headline shapes, bf16
    "mix_tokens:mixmim-s1": ("mixing.cu", "MixMap", 128 * 3136, 256),
    "window_partition:swin-s1-w7-shift": ("windows.cu", "PartitionMap", 128 * 3136, 256),
    "window_merge:swin-s1-w7-shift": ("windows.cu", "MergeMap", 128 * 3136, 256),
    "uniform_sample:ummae-s1": ("uniform.cu", "SampleMap", 128 * 784, 256),
    "uniform_scatter:ummae-s1": ("uniform.cu", "ScatterMap", 128 * 3136, 256),
}


def token_ops(work):
    """Row-gather loop per warp step (32 lanes x 4 vectors of 16 bytes) -> time vs copy bandwidth."""
    m, out = MODEL, []
    for name, (src, mp, rows, rb) in TOKEN_OPS.items():
        cubin = os.path.join(work, src + ".cubin")
        if not os.path.exists(cubin):
            r = subprocess.run([_nvcc(), "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                                "-I", os.path.join(ROOT, "csrc", "include"), "-Xptxas", "-v", os.path.join(HERE, src),
                                "-o", cubin], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
        fn = only_function(disassemble(cubin, tool("nvdisasm"), keep=False),
                           lambda n: "gather_rows_kernelI5uint4" in n and "Li4ELb0E" in n and mp in n)
        body = max(loops(fn).values(), key=len)
        per_step = sum(len(fn.blocks[x].instrs) for x in body)
        vectors = rows * rb // 16
        instr = vectors / 128 * per_step
        moved = 2 * rows * rb
        t_issue = instr / (m["n_sm"] * m["clock_hz"] * m["ipc"])
        t_mem = moved / m["hbm"]
        est = max(t_issue, t_mem) * 1e6 + m["launch_us"]
        out.append(dict(kernel=name.split(":")[0], shape=name.split(":")[1], instructions_per_warp_step=per_step,
                        instructions_per_16B=round(per_step / 4, 1), bytes=moved, floor_us=round(t_mem * 1e6, 1),
                        issue_us=round(t_issue * 1e6, 1), est_us=round(est, 1),
                        est_fraction_of_copy=round(t_mem * 1e6 / est, 3),
                        bytes_in_flight_per_sm=64 * 32 * 4 * 16))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        cs = costs(work)
        toks = token_ops(work)
    recs = [estimate(kind, s, cs[kind]) for kind in ("fwd", "bwd") for s in SHAPES] + toks
    for r in recs:
        print(json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(model=MODEL, costs={k: {**v, "block": {f"{w}x{'masked' if m else 'plain'}": c
                                                                  for (w, m), c in v["block"].items()}}
                                               for k, v in cs.items()}, records=recs), f, indent=1)


if __name__ == "__main__":
    main()
