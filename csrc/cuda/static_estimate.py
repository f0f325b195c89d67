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
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODEL = dict(n_sm=132, clock_hz=1.98e9, ipc=4, warps_to_hide=2.0, mufu_per_clk=16, mma_flop_per_clk=2048,
             hbm=4.3e12, smem_bytes_per_clk=128, launch_us=2.0, regs_per_sm=65536, smem_per_sm=233472)
SHAPES = {  # B, HW, C, heads, window, shift, MixMIM group
    "mixmim-s1": (128, 56, 128, 4, 14, 0, True),
    "mixmim-s4": (128, 7, 1024, 32, 7, 0, True),
    "swin-s1-shift": (128, 56, 128, 4, 7, 3, False),
}


# ---------------------------------------------------------------------------------------- tools
def _tool(name):
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return shutil.which(name)


def _nvcc():
    for c in [os.environ.get("CUDA_HOME"), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return os.path.join(c, "bin", "nvcc")
    raise SystemExit("no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) found")


def compile_instance(src, marker, inst, work):
    """Kernels of `src` (text before `marker`) plus an explicit instantiation -> (ptxas info, SASS)."""
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
    sass = subprocess.run([_tool("nvdisasm"), "-c", "-gi", cubin], capture_output=True, text=True, check=True).stdout
    return dict(registers=regs, spill_bytes=spills), sass


# ------------------------------------------------------------------------------------ SASS / CFG
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_\w+):")
_LOC = re.compile(r'"([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse(sass):
    """Blocks of the (single) function: [(instrs, succ)], instr = (op, pred, args, loc chain)."""
    items, loc, fresh, labels = [], (), True, []
    for line in sass.splitlines():
        s = line.strip()
        if s.startswith("//##"):
            if fresh:
                loc, fresh = tuple((f, int(n)) for f, n in _LOC.findall(s)), False
            continue
        m = _LABEL.match(s)
        if m:
            labels.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body, pred = m.group(2).rstrip(" ;"), ""
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        op, _, args = body.partition(" ")
        items.append((labels, (op, pred, args, loc)))
        labels, fresh = [], True
    label_at = {lb: k for k, (lbs, _) in enumerate(items) for lb in lbs}
    branch = lambda op: op.split(".")[0] in ("BRA", "EXIT", "RET")
    leaders = {0}
    for k, (lbs, ins) in enumerate(items):
        if lbs:
            leaders.add(k)
        if branch(ins[0]):
            leaders.add(k + 1)
            t = _TARGET.search(ins[2])
            if t and t.group(1) in label_at:
                leaders.add(label_at[t.group(1)])
    starts = sorted(x for x in leaders if x < len(items))
    block_of, blocks = {}, []
    for bi, st in enumerate(starts):
        en = starts[bi + 1] if bi + 1 < len(starts) else len(items)
        blocks.append([ins for _, ins in items[st:en]])
        for k in range(st, en):
            block_of[k] = bi
    succ = []
    for bi, b in enumerate(blocks):
        last, ss = b[-1], set()
        nxt = bi + 1 if bi + 1 < len(blocks) else None
        if branch(last[0]):
            t = _TARGET.search(last[2])
            if last[0].startswith("BRA") and t and t.group(1) in label_at:
                ss.add(block_of[label_at[t.group(1)]])
            if last[1] and nxt is not None:
                ss.add(nxt)
        elif nxt is not None:
            ss.add(nxt)
        succ.append(sorted(ss))
    return blocks, succ


def loops(blocks, succ):
    """Natural loops: {header: body set} from back edges (target address <= source, reaching)."""
    pred = defaultdict(list)
    for b, ss in enumerate(succ):
        for s in ss:
            pred[s].append(b)
    out = {}
    for b, ss in enumerate(succ):
        for h in ss:
            if h <= b:
                body, st = {h}, [b]
                while st:
                    n = st.pop()
                    if n not in body:
                        body.add(n)
                        st.extend(pred[n])
                out.setdefault(h, set()).update(body)
    return out


def block_paths(blocks, succ, body):
    """Instructions per iteration of a loop whose body splits into two paths (masked / unmasked)
    that rejoin: (prefix + common + path) for each path; nested retry loops count once."""
    h = min(body)
    reach = lambda starts, stop: _reach(succ, starts, stop | {h}, body)
    for b in sorted(body):
        ss = [s for s in succ[b] if s in body and s != h]
        if len(ss) != 2:
            continue
        r1, r2 = reach([ss[0]], set()), reach([ss[1]], set())
        p1, p2 = r1 - r2, r2 - r1
        hm = lambda bs: sum(1 for x in bs for i in blocks[x] if i[0].startswith("HMMA"))
        if hm(p1) and hm(p2):
            pre = reach([h], {b} | p1 | p2 | (r1 & r2)) | {b}
            n = lambda bs: sum(len(blocks[x]) for x in bs)
            mufu = lambda bs: sum(1 for x in bs for i in blocks[x] if i[0].startswith("MUFU"))
            base = n(pre) + n(r1 & r2)
            return sorted([(base + n(p), hm(p), mufu(p) + mufu(pre)) for p in (p1, p2)])
    raise RuntimeError("no two-path block loop found")


def _reach(succ, starts, stop, body):
    seen, st = set(), list(starts)
    while st:
        b = st.pop()
        if b in seen or b in stop or b not in body:
            continue
        seen.add(b)
        st.extend(succ[b])
    return seen


# ------------------------------------------------------------------------- workload (prologue)
# The launch plan and the pack prologue (segments, sort, tile ranges) are emulated by
# mixkernels/bench/wattn_workload.py: one model with the static report's trip-count rules. Loaded by
# path (numpy only), so this script does not import torch.
def _load_workload():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wattn_workload", os.path.join(ROOT, "mixkernels", "bench",
                                                                                 "wattn_workload.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WW = _load_workload()
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


def count_lines(blocks, src, first, last):
    """Instructions whose innermost frame in `src` lies in [first, last] (not inside other frames)."""
    path = os.path.realpath(os.path.join(HERE, src))
    n = 0
    for b in blocks:
        for op, pred, args, loc in b:
            if loc and os.path.realpath(loc[0][0]).endswith(os.path.basename(src) + ".inst.cu") and first <= loc[0][1] <= last:
                n += 1
            elif loc and os.path.realpath(loc[0][0]) == path and first <= loc[0][1] <= last:
                n += 1
    return n


def attribute(blocks, fns):
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
    for b in blocks:
        for op, pred, args, loc in b:
            key = "<kernel>"
            for f, ln in loc:
                hit = [n for s, e, n in ranges.get(os.path.realpath(f), []) if s <= ln <= e]
                if hit:
                    key = hit[0]
                    break
            out[key] += 1
    return out


def costs(work):
    """Per-unit warp-instruction costs of the bf16 / d32 / rpb kernels from their SASS."""
    res = {}
    info, sass = compile_instance("window_attention.cu", "int smem_limit() {",
                                  "template __global__ void wattn_fwd_kernel<__nv_bfloat16, 32, 1, false>(const FwdArgs);", work)
    blocks, succ = parse(sass)
    lp = [b for h, b in loops(blocks, succ).items() if any(i[0].startswith("HMMA") for x in b for i in blocks[x])]
    inner = max((b for b in lp if not any(o < b for o in lp)), key=len)  # the 32-key block loop
    (u, uh, um), (mk, mh, mm) = block_paths(blocks, succ, inner)
    # lazy rescale: the 16+2 FMUL / 2 MUFU branch runs in about half the blocks at these shapes
    rescale = 20
    fwd_block = {(32, False): dict(instr=u - rescale / 2, hmma=uh, mufu=um - 1, smem_wavefronts=16 + 16 + 24 + 4),
                 (32, True): dict(instr=mk - rescale / 2, hmma=mh, mufu=mm - 1, smem_wavefronts=16 + 16 + 24 + 4)}
    fwd_block[(16, False)] = {k: v / 2 + (10 if k == "instr" else 0) for k, v in fwd_block[(32, False)].items()}
    fwd_block[(16, True)] = {k: v / 2 + (10 if k == "instr" else 0) for k, v in fwd_block[(32, True)].items()}
    att = attribute(blocks, {"fwd_tile", "store_rows_warp", "prologue", "segment_ids", "assign_items",
                             "load_rows_async", "load_table_async", "rows_nonfinite", "zero_rows", "fwd_block", "fwd_exact"})
    res["fwd"] = dict(block=fwd_block, registers=info["registers"], spill_bytes=info["spill_bytes"],
                      tile=att["fwd_tile"] + att["store_rows_warp"],
                      # per CTA: every warp runs the prologue (its scan loops about once); thread 0 the assignment
                      prologue=8 * (att["prologue"] + att["segment_ids"] + att["zero_rows"]) + att["assign_items"],
                      # per (CTA, head): the load loops (two inlined copies, ~1 pass of the 4x-unrolled body
                      # at 208 rows) and the non-finite check, every warp
                      head=8 * (att["load_rows_async"] / 2 + att["load_table_async"] / 2 + att["rows_nonfinite"]))
    info, sass = compile_instance("window_attention_bwd.cu", "struct BwdPlan {",
                                  "template __global__ void wattn_bwd_kernel<__nv_bfloat16, 32, 1, false>(const BwdArgs);", work)
    blocks, succ = parse(sass)
    hm = [b for h, b in loops(blocks, succ).items() if any(i[0].startswith("HMMA") for x in b for i in blocks[x])]
    innermost = [b for b in hm if not any(o < b for o in hm)]  # no other HMMA loop strictly inside
    paths = [block_paths(blocks, succ, b) for b in innermost]
    key_p = max(paths, key=lambda p: p[0][1])  # the key loop has 16 HMMA per 16x16 block
    qry_p = max((p for p in paths if p[0][1] < key_p[0][1]), key=lambda p: p[0][0])  # with the bias-gradient adds
    bwd_block = {}
    for masked in (False, True):
        k, q = key_p[int(masked)], qry_p[int(masked)]
        bwd_block[(16, masked)] = dict(instr=k[0] + q[0], hmma=k[1] + q[1], mufu=k[2] + q[2],
                                       smem_wavefronts=32 + 24 + 24 + 24 + 4)
    att = attribute(blocks, {"key_item", "query_item", "store_rows_warp", "prologue", "segment_ids", "assign_items",
                             "load_rows_async", "load_table_async", "zero_rows", "key_block", "query_block"})
    res["bwd"] = dict(block=bwd_block, registers=info["registers"], spill_bytes=info["spill_bytes"],
                      tile=(att["key_item"] + att["query_item"] + att["store_rows_warp"]) / 2,
                      prologue=8 * (att["prologue"] + att["segment_ids"] + att["zero_rows"]) + att["assign_items"],
                      # per (CTA, head): loads (q/k/v, dO, O, table), delta and the bias-gradient flush: the
                      # head loop's own lines (loops there about once per pass), every warp
                      head=8 * (att["load_rows_async"] + att["load_table_async"] +
                                count_lines(blocks, "window_attention_bwd.cu",
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
        txt = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
        fn = next(f for f in re.split(r"\n\s*//-+ \.text\.", txt)[1:]
                  if "gather_rows_kernelI5uint4" in f.split()[0] and "Li4ELb0E" in f.split()[0] and mp in f.split()[0])
        blocks, succ = parse(fn)
        body = max(loops(blocks, succ).values(), key=len)
        per_step = sum(len(blocks[x]) for x in body)
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
