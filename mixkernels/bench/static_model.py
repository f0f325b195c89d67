"""The static report's machine model: occupancy and an estimated kernel time (H200, sm_90).

Every constant is in :data:`MODEL` and written into ``static.json``/``static.md``. The estimate
is a bottleneck (roofline-style) model over four resources, per launch::

    t_issue = warp-instructions / (n_sm * schedulers * clock * issue_eff)
    t_mufu  = MUFU lane-ops / (n_sm * mufu_per_sm_clk * clock)
    t_mma   = MMA FLOPs / (n_sm * mma_flop_per_sm_clk * clock)     (wgmma FLOPs at that rate, mma.sync
                                                                    FLOPs at mma_sync_fraction of it)
    t_mem   = HBM bytes / (hbm_bw * mem_eff)
    t_lat   = waves x (instructions per warp + MEMBAR.GPU per warp x membar_gpu_clk) / clock
    t       = max(t_issue + t_mufu + t_mma, t_mem, t_lat) + launch_us

The issue slots, the MUFU pipe and the tensor cores are NOT assumed to overlap one another (a
kernel without warp specialization alternates its MMA and softmax phases): with the plain maximum
of the three, the model was 2.3-2.6x too fast on the tutorial attention kernels of the calibration
(static_calib.py); with the sum it is within about 20%. Memory transfers do overlap compute.

issue_eff = min(1, resident warps per scheduler / warps_to_hide_latency): a scheduler issues one
instruction per clock only if enough warps are ready; mem_eff = min(1, bytes in flight per SM /
(bandwidth per SM x DRAM latency)) (Little's law), with the bytes in flight estimated from the SASS
(the largest batch of global loads a warp issues before it uses any of them) times resident warps.
t_lat is the latency floor of one warp (it issues at most one instruction per clock, and a
GPU-scope memory barrier, e.g. the one around every acq_rel ``tl.atomic_add``, stalls it until its
stores are visible), times the waves of resident programs an SM runs one after another.
Work per SM: ceil(programs / n_sm) programs.
"""
from __future__ import annotations

import math
from typing import Any, Dict

__all__ = ["MODEL", "occupancy", "estimate"]

MODEL: Dict[str, Any] = {
    "gpu": "H200 SXM (sm_90; H100 SXM has the same SMs and clocks, 3.35 TB/s peak)",
    "n_sm": 132,
    "clock_ghz": 1.98,  # max boost; tensor-core-heavy kernels may clock lower
    "schedulers_per_sm": 4,  # one warp-instruction per clock each
    "warps_to_hide_latency": 2.0,  # resident warps per scheduler for full issue (assumption, see calibration)
    "mufu_per_sm_clk": 16,  # exp2/log2/rcp/rsqrt lane-ops per clock per SM
    "mma_flop_per_sm_clk": 4096,  # dense fp16/bf16 wgmma: 989 TFLOP/s on H100 SXM at 1.83 GHz
    "mma_sync_fraction": 0.5,  # legacy mma.sync (HMMA) reaches about half the wgmma rate (assumption)
    "hbm_bytes_per_s": 4.3e12,  # H200 sustained copy (DESIGN.md 7); peak 4.8e12
    "dram_latency_ns": 700.0,  # loaded DRAM latency (assumption) for Little's law
    "membar_gpu_clk": 800,  # stall of one MEMBAR.GPU/SYS (assumption: a round trip to L2 and back, loaded)
    "launch_us": 2.0,  # kernel start + tail drain per launch
    "regs_per_sm": 65536, "reg_alloc_unit": 256, "max_regs_per_thread": 255,
    "smem_per_sm": 233472, "smem_reserved_per_block": 1024, "smem_alloc_unit": 128, "max_smem_per_block": 232448,
    "max_threads_per_sm": 2048, "max_blocks_per_sm": 32,
}


def occupancy(regs: int, smem: int, threads: int, m: Dict[str, Any] = MODEL) -> Dict[str, int]:
    """Resident CTAs per SM (and what limits it) for ``regs`` per thread, ``smem`` bytes per CTA
    (static + dynamic), ``threads`` per CTA. 0 if the CTA cannot launch."""
    warps = max(1, math.ceil(threads / 32))
    regs = max(regs, 1)
    if regs > m["max_regs_per_thread"] or smem > m["max_smem_per_block"] or threads > 1024:
        return dict(ctas=0, by_regs=0, by_smem=0, by_threads=0, limit="does not fit")
    per_warp = math.ceil(regs * 32 / m["reg_alloc_unit"]) * m["reg_alloc_unit"]
    by_regs = (m["regs_per_sm"] // per_warp) // warps
    alloc = math.ceil(smem / m["smem_alloc_unit"]) * m["smem_alloc_unit"] + m["smem_reserved_per_block"]
    by_smem = m["smem_per_sm"] // alloc
    by_threads = m["max_threads_per_sm"] // (warps * 32)
    lim = {"threads": by_threads, "blocks": m["max_blocks_per_sm"], "shared memory": by_smem,
           "registers": by_regs}  # ties: the first named
    ctas = min(lim.values())
    return dict(ctas=ctas, by_regs=by_regs, by_smem=by_smem, by_threads=by_threads,
                limit=min(lim, key=lambda k: lim[k]) if ctas else "registers")


def estimate(*, programs: int, warps: int, ctas_per_sm: int, instr_per_warp: float, mufu_per_warp: float,
             mma_flops_per_warp: float, mma_sync_flops_per_warp: float, hbm_bytes: float,
             inflight_bytes_per_warp: float,
             membar_per_warp: float = 0.0, m: Dict[str, Any] = MODEL) -> Dict[str, float]:
    """Estimated time (us) of one launch and each resource's time; see the module docstring."""
    clk = m["clock_ghz"] * 1e9
    n_sm = m["n_sm"]
    if ctas_per_sm <= 0 or programs <= 0:
        return dict(us=float("inf") if programs > 0 else 0.0, issue_us=0.0, mufu_us=0.0, mma_us=0.0, mem_us=0.0,
                    latency_us=0.0, issue_eff=0.0, mem_eff=0.0, waves=0.0,
                    bound="does not fit" if programs > 0 else "empty")
    per_sm = math.ceil(programs / n_sm)  # programs on the busiest SM
    waves = math.ceil(per_sm / ctas_per_sm)
    resident_warps = min(per_sm, ctas_per_sm) * warps
    issue_eff = min(1.0, resident_warps / m["schedulers_per_sm"] / m["warps_to_hide_latency"])
    t_issue = per_sm * warps * instr_per_warp / (m["schedulers_per_sm"] * clk * max(issue_eff, 1e-9))
    t_mufu = per_sm * warps * mufu_per_warp * 32 / (m["mufu_per_sm_clk"] * clk)
    # mma.sync FLOPs (part of mma_flops_per_warp) at their fraction of the wgmma rate, the rest at it
    mma_rate = m["mma_flop_per_sm_clk"] * clk
    sync = min(mma_sync_flops_per_warp, mma_flops_per_warp)
    t_mma = per_sm * warps * ((mma_flops_per_warp - sync) + sync / m["mma_sync_fraction"]) / mma_rate
    need = m["hbm_bytes_per_s"] / n_sm * m["dram_latency_ns"] * 1e-9
    mem_eff = min(1.0, resident_warps * inflight_bytes_per_warp / need) if inflight_bytes_per_warp > 0 else 1.0
    t_mem = hbm_bytes / (m["hbm_bytes_per_s"] * max(mem_eff, 1e-3))
    t_lat = waves * (instr_per_warp + membar_per_warp * m["membar_gpu_clk"]) / clk
    compute = t_issue + t_mufu + t_mma
    parts = {"compute": compute, "memory": t_mem, "latency": t_lat}
    bound = max(parts, key=lambda k: parts[k])
    if bound == "compute":  # name the largest share
        bound = max((("issue", t_issue), ("mufu", t_mufu), ("mma", t_mma)), key=lambda kv: kv[1])[0]
    us = max(parts.values()) * 1e6 + m["launch_us"]
    return dict(us=us, issue_us=t_issue * 1e6, mufu_us=t_mufu * 1e6, mma_us=t_mma * 1e6, mem_us=t_mem * 1e6,
                latency_us=t_lat * 1e6, issue_eff=issue_eff, mem_eff=mem_eff, waves=waves, bound=bound)
