"""Markdown and console output of the static report (``static.md``), with before/after columns."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .static_cases import HEADLINE

__all__ = ["markdown", "summary", "compare_rows"]

_ORDER = ("window_attention_fwd", "window_attention_bwd", "mix_tokens", "mix_tokens_bwd", "unmix_tokens",
          "unmix_tokens_bwd", "window_partition", "window_merge", "uniform_sample", "uniform_sample_bwd",
          "uniform_scatter", "mixmim_loss", "mixmim_loss_bwd", "masked_recon_loss", "masked_recon_loss_bwd")


def _key(r):
    return (r["backend"], r["kernel"], r["shape"], r["dtype"])


def _sort(records):
    op = {k: i for i, k in enumerate(_ORDER)}
    return sorted(records, key=lambda r: (op.get(r["kernel"], 99), r["shape"], r["dtype"], r["backend"]))


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _pct(v):
    # one decimal: a target's edge (e.g. 39.7% against 40%) must not round across it
    return "-" if v is None else f"{100 * v:.1f}%"


def compare_rows(doc, old) -> Dict[tuple, Dict[str, Any]]:
    return {_key(r): r for r in (old or {}).get("records", [])}


def _row(r, prev=None) -> str:
    if r.get("error"):
        return (f"| {r['backend']} | {r['kernel']} | {r['shape']} | {r['dtype']} | ERROR: "
                f"{r['error'].splitlines()[0][:80]} |" + " |" * 11)
    cells = [r["backend"], r["kernel"], r["shape"], r["dtype"], str(r["registers"]),
             str(r["spill_bytes"]), f"{r['smem_bytes'] / 1024:.0f}K", str(r["threads"]), str(r["ctas_per_sm"]),
             _f(r["instructions_per_element"]), _f(r.get("mufu_per_element"), "{:.2f}"), _f(r["floor_us"]),
             _f(r["est_us"]), _pct(r["est_fraction_of_floor"]), _pct(r.get("est_fraction_of_copy")),
             r.get("bound", "")]
    if prev is not None:
        if prev.get("error") or prev.get("est_us") is None:
            cells += ["-", "-", "-"]
        else:
            cells += [f"{_f(prev['est_us'])} -> {_f(r['est_us'])}",
                      f"{_pct(prev['est_fraction_of_floor'])} -> {_pct(r['est_fraction_of_floor'])}",
                      f"{_f(prev['instructions_per_element'])} -> {_f(r['instructions_per_element'])}"]
    return "| " + " | ".join(cells) + " |"


_HEAD = ("| backend | op | shape | dtype | regs | spill B | smem | threads | CTAs/SM | instr/elem | MUFU/elem "
         "| floor us | est us | % floor | % copy | bound |")


def _table(records, old_by_key=None) -> List[str]:
    head = _HEAD + (" est us before -> after | % floor | instr/elem |" if old_by_key is not None else "")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in _sort(records):
        prev = old_by_key.get(_key(r), {}) if old_by_key is not None else None
        out.append(_row(r, prev if old_by_key is not None else None))
    return out


def markdown(doc, old=None) -> str:
    env, m = doc["env"], doc["model"]
    olds = compare_rows(doc, old) if old else None
    L = [f"# Static performance report (sm_90, {m['gpu'].split(' (')[0]})", "",
         f"**Static estimate, no GPU.** Commit `{env['commit']}` (kernel sources: `mixkernels/triton` and `csrc` "
         f"as of `{env.get('kernels_commit', '?')}`), {env['date']}, Triton {env['triton']}. "
         "Every number comes from the compiled code (Triton AOT at the real launch specialization; "
         "`nvcc` for `csrc/cuda` with launches captured from our host code) and the model below; nothing ran."
         + (f" CUDA: {doc['info']['cuda'].get('nvcc')}, `{doc['info']['cuda'].get('flags')}`."
            if doc.get("info", {}).get("cuda", {}).get("nvcc") else ""),
         f"Regenerate: `python -m mixkernels.bench --static --out benchmarks/results/static` "
         f"({doc['seconds']:.0f} s for this run; compiles are cached)."
         + (f" Compared with `{old['env']['commit'][:12]}` ({old['env']['date']})." if old else ""), ""]
    L += ["## Model", "",
          "Per launch: `t = max(t_issue + t_mufu + t_mma, t_mem, t_lat) + launch_us`, summed over an op's launches "
          "(issue slots, MUFU and tensor cores are not assumed to overlap: see Calibration). The launcher's own "
          "device work beside its kernels counts too (`side_ops` in static.json: each torch op that moves memory, "
          "recorded after one warm call, and each cudaMemsetAsync): one launch each, (bytes read + written) / "
          "bandwidth + launch_us.",
          "`t_issue` = warp-instructions executed / (SMs x schedulers x clock x issue_eff), issue_eff = min(1, "
          "resident warps per scheduler / warps_to_hide_latency); `t_mufu` = MUFU lane-ops / (SMs x "
          "mufu_per_sm_clk x clock); `t_mma` = MMA FLOPs / (SMs x mma_flop_per_sm_clk x clock), the HMMA "
          "(mma.sync) share of the FLOPs at mma_sync_fraction of that rate, the HGMMA share at the full rate; `t_mem` = the op's floor bytes (split over launches by their "
          "requested global bytes) / (bandwidth x mem_eff), mem_eff = min(1, bytes in flight per SM / "
          "(bandwidth per SM x DRAM latency)); `t_lat` = waves x (instructions per warp + GPU-scope MEMBARs x "
          "membar_gpu_clk) / clock. Work per SM = ceil(programs / SMs) programs. `bound` names the largest term.",
          "Instructions executed per warp: SASS basic blocks weighted by the trip counts of their loops "
          "(back edges in the CFG; trip counts from `mixkernels/bench/static_rules.py`, listed per kernel "
          "below); every block of a loop body counts on every iteration (an upper bound for if/else).",
          "`instr/elem` = 32 x warp-instructions / elements (thread-instructions per score element for "
          "attention, per 16 B of floor traffic for token ops and losses); `MUFU/elem` the same for MUFU ops. "
          "Floor = bytes each input is read once and each output written once (DESIGN.md section 7), at "
          f"{m['hbm_bytes_per_s'] / 1e12:.1f} TB/s. `% copy` = (floor us + launch_us) / est us: the op against a "
          "copy of its floor bytes under the same model (one launch), the yardstick for token ops and losses "
          "(\"% of copy bandwidth\"), whose floors are a few us, so that one launch term alone caps `% floor`.", "", "| constant | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in m.items()]
    cal = doc.get("calibration")
    if cal:
        L += ["", "## Calibration", "", cal.get("note", ""), "",
              "| kernel | shape | published | source | model | error |", "|---|---|---|---|---|---|"]
        for c in cal.get("points", []):
            L.append(f"| {c['kernel']} | {c['shape']} | {c['published']} | {c['source']} | {c['model']} | "
                     f"{c['error']} |")
    head = [r for r in doc["records"] if r["shape"] in HEADLINE and r["kernel"].startswith("window_attention")
            and r["dtype"] == "bf16"]
    L += ["", "## Headline: window attention, bf16", ""] + _table(head, olds)
    L += ["", "## All records", ""] + _table(doc["records"], olds)
    gate = [r for r in doc["records"] if r["dtype"] in ("bf16", "fp16") and (r.get("spill_bytes") or r.get("error"))]
    L += ["", "## Spills (the CI gate)", "",
          "`python -m mixkernels.bench --static --check` fails on any bf16/fp16 record that spills or fails to "
          "compile, except the allow-listed configurations below (known spills of current main, to be removed "
          "when the rewrites land; `ALLOWED_SPILLS` in `mixkernels/bench/static.py`).", ""]
    L += [f"* {r['backend']} {r['kernel']} {r['shape']} {r['dtype']}: "
          + (f"ERROR {r['error'].splitlines()[0][:120]}" if r.get("error") else
             f"{r['spill_bytes']} B spilled ({r['dominant_kernel']}, {r['registers']} regs)")
          + (" (allow-listed)" if [r["backend"], r["kernel"], r["shape"]] in doc.get("allowed_spills", []) else "")
          for r in _sort(gate)] or ["* none"]
    um = sorted({u for r in doc["records"] for u in r.get("unmatched_loops", [])})
    L += ["", "## Loops without a trip-count rule (counted once)", ""] + ([f"* {u}" for u in um] or ["* none"])
    L += ["", "## How each loop was counted", "",
          "One entry per kernel (its first record; other dtypes and shapes use the same rules): loop (source "
          "line of its back edge), iterations per entry, derivation; xN: N copies of the loop in the SASS "
          "(inlined or unrolled call sites).", ""]
    seen = set()
    for r in _sort(doc["records"]):
        for la in r.get("launches", []):
            k = (r["backend"], la["kernel"].split("<")[0])
            if k in seen or not la["loops"]:
                continue
            seen.add(k)
            L.append(f"* **{r['backend']} {la['kernel']}** ({r['kernel']} {r['shape']} {r['dtype']}, "
                     f"{la['static_instructions']} SASS instructions, {la['instr_per_warp']:.0f} executed per warp)")
            lines: Dict[str, int] = {}
            for lp in la["loops"]:
                t = f"{lp['site']}: {lp['trips']:g} ({lp['why']})"
                lines[t] = lines.get(t, 0) + 1
            L += [f"  * {t}" + (f" x{n}" if n > 1 else "") for t, n in lines.items()]
    L += ["", "## What the SASS shows (per launch of the headline records)", ""]
    for r in _sort(head):
        for la in r.get("launches", []):
            c = la["counts"]
            tot = max(c.get("total", 1.0), 1.0)
            parts = ", ".join(f"{k} {100 * c[k] / tot:.0f}%" for k in ("int", "fp32", "convert", "mufu", "mma", "lds",
                                                                        "sts", "ldg", "stg", "ldl", "stl", "atomic",
                                                                        "membar", "cctl", "bar", "shfl") if c.get(k))
            L.append(f"* {r['backend']} {r['kernel']} {r['shape']}: {la['kernel']} x{la['programs']}: "
                     f"{la['instr_per_warp']:.0f} instr/warp ({parts}); est {la['estimate']['us']:.1f} us, "
                     f"bound {la['estimate']['bound']} (issue {la['estimate']['issue_us']:.1f}, mufu "
                     f"{la['estimate']['mufu_us']:.1f}, mma {la['estimate']['mma_us']:.1f}, mem "
                     f"{la['estimate']['mem_us']:.1f} us; issue_eff {la['estimate']['issue_eff']:.2f}, "
                     f"mem_eff {la['estimate']['mem_eff']:.2f})")
    return "\n".join(L) + "\n"


def summary(doc, old=None) -> str:
    olds = compare_rows(doc, old) if old else None
    head = [r for r in doc["records"] if r["shape"] in HEADLINE and r["kernel"].startswith("window_attention")]
    lines = [f"static report: {len(doc['records'])} records in {doc['seconds']:.0f} s (commit {doc['env']['commit'][:12]})"]
    lines += _table(head, olds)
    return "\n".join(lines)
