"""``python -m mixkernels.bench --static``: static performance report for sm_90, no GPU needed.

For every shipped kernel configuration at the headline shapes (static_cases.py) and each dtype:
compile for sm_90 (Triton: AOT at the real launch specialization, aot.py; CUDA: ``nvcc`` of
``csrc/cuda`` with launches captured from our own host code, static_cuda.py), read registers,
spills and shared memory (ptxas -v, cuobjdump), count SASS instructions executed per warp (CFG +
loops weighted by trip counts, static_sass.py + static_rules.py), and estimate the time with the
stated model (static_model.py). Writes ``static.json`` ({"model", "records", ...}) and
``static.md``. ``--check`` is the CI gate: exit 1 if any bf16/fp16 configuration spills (except
the explicit allow-list below) or fails to compile.

    python -m mixkernels.bench --static [--out DIR] [--dtype bf16,fp16,fp32] [--backend triton,cuda]
        [--shapes LABEL,...] [--ops OP,...] [--compare OLD_static.json] [--check] [--jobs N]
        [--cache DIR | --no-cache] [--no-calibration]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import static_cases, static_model, static_rules, static_sass

__all__ = ["main", "run", "ALLOWED_SPILLS", "gate_failures", "stale_allowances", "write_json"]

# Configurations allowed to spill (bf16/fp16) while a rewrite is in flight: (backend, op, shape).
# Empty since the rebuilt Triton window attention (issue #11 part 3) landed; the CI gate (--check)
# fails on any spilling shipped configuration and warns about entries that no longer spill.
ALLOWED_SPILLS: set = set()
GATE_DTYPES = ("bf16", "fp16")
_BW = static_model.MODEL["hbm_bytes_per_s"]


# ----------------------------------------------------------------------------- per launch


def _launch_stats(fn: static_sass.Function, ctx: static_rules.Ctx, rules, triton: bool, *, regs: int,
                  spill_st: int, spill_ld: int, smem: int, programs: int, name: str) -> Dict[str, Any]:
    counts = static_sass.weigh(fn, lambda lp: static_rules.trips_for(rules, ctx, lp.site, triton,
                                                                    static_sass.outer_sites(fn, lp)))
    occ = static_model.occupancy(regs, smem, ctx.threads)
    loops = [dict(site=str(lp.site), trips=round(lp.trips, 3), why=lp.why, matched=lp.matched) for lp in fn.loops]
    if spill_st < 0:  # no ptxas log: static local-memory traffic from the SASS
        spill_st = int(sum(static_sass.access_bytes(i) for b in fn.blocks for i in b.instrs if i.base == "STL"))
        spill_ld = int(sum(static_sass.access_bytes(i) for b in fn.blocks for i in b.instrs if i.base == "LDL"))
    return dict(kernel=name, grid=list(ctx.grid), programs=programs, threads=ctx.threads, registers=regs,
                spill_store_bytes=spill_st, spill_load_bytes=spill_ld, smem_bytes=smem, ctas_per_sm=occ["ctas"],
                occupancy_limit=occ["limit"], static_instructions=fn.static_count(),
                instr_per_warp=counts["total"], counts={k: round(v, 2) for k, v in counts.items()},
                inflight_bytes_per_warp=static_sass.inflight_bytes(fn), loops=loops)


def _warps(launch) -> int:
    """Warps of one program: a partial warp occupies (and issues as) a whole one."""
    return max(1, -(-launch["threads"] // 32))


def _side(ops: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The launcher's own device work beside its kernels (torch ops, memsets), each priced as one
    memory-bound launch: (bytes read + written) / bandwidth + launch_us."""
    out = []
    for o in ops:
        b = o["read_bytes"] + o["write_bytes"]
        out.append(dict(o, us=round(b / _BW * 1e6 + static_model.MODEL["launch_us"], 3)))
    return out


def _finish(case: static_cases.Case, backend: str, launches: List[Dict[str, Any]],
            side_ops: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    """Record of one case: the launches' estimates summed (plus the launcher's side work: torch ops,
    memsets; see :func:`_side`), the dominant launch's resources."""
    total_req = sum(l_["counts"].get("global_bytes", 0.0) * l_["programs"] * _warps(l_) for l_ in launches)
    side = _side(side_ops)
    side_bytes = sum(o["read_bytes"] + o["write_bytes"] for o in side)
    est = sum(o["us"] for o in side)
    for l_ in launches:
        warps = _warps(l_)
        req = l_["counts"].get("global_bytes", 0.0) * l_["programs"] * warps
        share = req / total_req if total_req > 0 else 1.0 / len(launches)
        c = l_["counts"]
        e = static_model.estimate(
            programs=l_["programs"], warps=warps, ctas_per_sm=l_["ctas_per_sm"], instr_per_warp=c["total"],
            mufu_per_warp=c.get("mufu", 0.0), mma_flops_per_warp=c.get("mma_flops", 0.0),
            mma_sync_flops_per_warp=c.get("mma_sync_flops", 0.0), hbm_bytes=case.floor_bytes * share,
            inflight_bytes_per_warp=l_["inflight_bytes_per_warp"], membar_per_warp=c.get("membar_gpu", 0.0))
        l_["estimate"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in e.items()}
        l_["requested_global_bytes"] = req
        est += e["us"]
    dom = max(launches, key=lambda l_: l_["estimate"]["us"])
    warp_instr = sum(l_["instr_per_warp"] * l_["programs"] * _warps(l_) for l_ in launches)
    mufu = sum(l_["counts"].get("mufu", 0.0) * 32 * l_["programs"] * _warps(l_) for l_ in launches)
    floor_us = case.floor_bytes / _BW * 1e6
    unmatched = sorted({f"{l_['kernel']}: {lp['site']}" for l_ in launches for lp in l_["loops"] if not lp["matched"]})
    return dict(
        backend=backend, kernel=case.op, shape=case.shape, dtype=case.dtype, arch="sm_90", config=case.config,
        registers=dom["registers"], spill_bytes=sum(l_["spill_store_bytes"] + l_["spill_load_bytes"] for l_ in launches),
        smem_bytes=dom["smem_bytes"], threads=dom["threads"], ctas_per_sm=dom["ctas_per_sm"],
        occupancy_limit=dom["occupancy_limit"], instructions=round(dom["instr_per_warp"] * dom["threads"] / 32, 1),
        instructions_per_warp=round(dom["instr_per_warp"], 1), instructions_total=warp_instr,
        instructions_per_element=round(32 * warp_instr / case.elements, 3), element_unit=case.element_unit,
        elements=case.elements, mufu_per_element=round(mufu / case.elements, 3), floor_bytes=case.floor_bytes,
        floor_us=round(floor_us, 3), est_us=round(est, 3), est_fraction_of_floor=round(min(1.0, floor_us / est), 4),
        # against a copy of the floor bytes under the same model (one launch): the token ops' yardstick
        # ("% of copy bandwidth"), where a small op's launch term would otherwise cap % floor
        est_fraction_of_copy=round(min(1.0, (floor_us + static_model.MODEL["launch_us"]) / est), 4),
        bound=dom["estimate"]["bound"], dominant_kernel=dom["kernel"],
        traffic_ratio=round((total_req + side_bytes) / case.floor_bytes, 3) if case.floor_bytes else None,
        side_ops=side, side_us=round(sum(o["us"] for o in side), 3),
        unmatched_loops=unmatched, launches=launches, error=None)


def _error_record(case, backend, err: str) -> Dict[str, Any]:
    return dict(backend=backend, kernel=case.op, shape=case.shape, dtype=case.dtype, arch="sm_90", config=case.config,
                registers=None, spill_bytes=None, smem_bytes=None, threads=None, ctas_per_sm=None, instructions=None,
                instructions_per_element=None, floor_bytes=case.floor_bytes,
                floor_us=round(case.floor_bytes / _BW * 1e6, 3), est_us=None, est_fraction_of_floor=None,
                est_fraction_of_copy=None, error=err[-4000:], launches=[], unmatched_loops=[])


# ----------------------------------------------------------------------------- Triton


def triton_records(cases, cache: Optional[str], jobs: int, log=print) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    from . import aot

    t0 = time.time()
    caps, side = [], {}
    for c in cases:
        ops: List[Dict[str, Any]] = []
        try:  # once unrecorded first: a launcher's per-shape caches (e.g. key code tables) are warm in training
            aot.capture(c.triton)
            caps.append((c, aot.capture(c.triton, tag=c.key, torch_ops=ops), None))
        except Exception as e:  # noqa: BLE001 - a launcher that fails at this geometry is a record
            caps.append((c, [], f"capture failed: {type(e).__name__}: {e}"))
        side[c.key] = ops
    uniq: Dict[str, Any] = {}
    for _, launches, _ in caps:
        for la in launches:
            uniq.setdefault(aot.spec_key(la, 90), la)
    log(f"triton: {sum(len(x[1]) for x in caps)} launches, {len(uniq)} distinct specializations "
        f"(captured in {time.time() - t0:.1f}s); compiling for sm_90 with {jobs} procs ...")
    keys = list(uniq)

    def progress(r):
        if r.error or os.environ.get("MIXKERNELS_AOT_VERBOSE") == "1":
            log(f"  {'FAILED' if r.error else ('cached' if r.cached else 'ok')} {r.seconds:6.1f}s {r.kernel} {r.spec}")

    compiled = dict(zip(keys, aot.compile_many([(uniq[k], 90) for k in keys], cache, jobs, progress)))
    t1 = time.time()
    paths = sorted({c.cubin_path for c in compiled.values() if not c.error})
    with ThreadPoolExecutor(max(1, jobs)) as ex:  # nvdisasm in parallel (listings are kept in the cache)
        listings = dict(zip(paths, ex.map(lambda p: static_sass.disassemble(p, keep=cache is not None), paths)))
    funcs: Dict[str, Dict[str, static_sass.Function]] = {}
    records = []
    for case, launches, err in caps:
        if err:
            records.append(_error_record(case, "triton", err))
            continue
        stats, errs = [], []
        for la in launches:
            comp = compiled[aot.spec_key(la, 90)]
            if comp.error:
                errs.append(f"{la.name}: {comp.error}")
                continue
            if comp.cubin_path not in funcs:
                funcs[comp.cubin_path] = static_sass.parse(listings[comp.cubin_path])
            fn = funcs[comp.cubin_path][la.name]
            ps = aot.ptxas_stats(comp.ptxas_log)
            regs = ps["regs"] if ps["regs"] > 0 else aot.resource_usage(comp.cubin_path)[la.name]["REG"]
            args = la.named_args()
            ctx = static_rules.Ctx(case.params, la.grid, comp.num_warps * 32, args, la.name)
            smem = comp.shared + max(ps["smem"], 0)  # Triton's dynamic buffers + static arrays of inline asm
            stats.append(_launch_stats(fn, ctx, static_rules.TRITON_RULES, True, regs=regs, spill_st=ps["spill_st"],
                                       spill_ld=ps["spill_ld"], smem=smem, programs=la.programs, name=la.name))
            stats[-1]["spec"] = comp.spec
        records.append(_error_record(case, "triton", "\n".join(errs)) if errs or not stats else
                       _finish(case, "triton", stats, side[case.key]))
    info = dict(launches=sum(len(x[1]) for x in caps), specializations=len(uniq),
                compiled=sum(not c.cached for c in compiled.values()), cached=sum(c.cached for c in compiled.values()),
                compile_seconds=round(t1 - t0, 1), analysis_seconds=round(time.time() - t1, 1))
    return records, info


# ----------------------------------------------------------------------------- CUDA


def _static_smem(usage: Dict[str, int]) -> int:
    """Static shared memory of a CUDA kernel from ``cuobjdump --dump-resource-usage``. Its SHARED
    includes the sm_90 per-CTA system reserve (1 KB) for any kernel that uses shared memory (ptxas
    -v: "32 bytes smem" where cuobjdump says 1056; 0 where it says 1024); the occupancy model adds
    that reserve itself, so it is taken out here."""
    shared = usage.get("SHARED", 0)
    reserve = static_model.MODEL["smem_reserved_per_block"]
    return shared - reserve if shared >= reserve else shared


def cuda_records(cases, cache: str, jobs: int, log=print) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    from . import aot, static_cuda

    t0 = time.time()
    try:
        b = static_cuda.build(cache, jobs)
    except Exception as e:  # noqa: BLE001 - reported, the Triton half of the report still stands
        msg = f"CUDA build failed: {type(e).__name__}: {e}"
        log(msg)
        return [_error_record(c, "cuda", msg) for c in cases], dict(error=msg)
    log(f"cuda: built {len(b.cubins)} files in {b.seconds:.0f}s ({b.dir})")
    lines, owner = [], []
    for i, c in enumerate(cases):
        for ln in c.cuda:
            lines.append(ln)
            owner.append(i)
    caps = static_cuda.capture(b, lines)
    per_case: Dict[int, List[Tuple[int, Any, List[int]]]] = {}
    for i, (rc, launches, sets) in zip(owner, caps):
        per_case.setdefault(i, []).append((rc, launches, sets))
    wanted = {la.name for _, launches, _ in caps for la in launches}
    funcs: Dict[str, static_sass.Function] = {}
    for path in sorted({b.kernel_cubin[n] for n in wanted if n in b.kernel_cubin}):
        funcs.update(static_sass.parse(static_sass.disassemble(path), only=wanted))
    usage: Dict[str, Dict[str, int]] = {}
    for path in b.cubins.values():
        usage.update(aot.resource_usage(path))
    records = []
    for i, c in enumerate(cases):
        if not c.cuda:  # no CUDA launch for this case (e.g. cosine mode before the CUDA harness has it)
            continue
        got = per_case.get(i, [])
        bad = [rc for rc, _, _ in got if rc != 0]
        if bad or not got:
            records.append(_error_record(c, "cuda", f"launcher returned cudaError {bad} (configuration not supported)"))
            continue
        stats = []
        side = [dict(op="cudaMemsetAsync", read_bytes=0, write_bytes=n) for _, _, sets in got for n in sets]
        for _, launches, _ in got:
            for la in launches:
                short = la.short
                base = short.split("<")[0]
                tparams = tuple(t.strip() for t in short[short.find("<") + 1:short.rfind(">")].split(",")) \
                    if "<" in short else ()
                ps = aot.ptxas_stats(b.ptxas_log, la.name)
                u = usage.get(la.name, {})
                ctx = static_rules.Ctx(c.params, la.grid, la.threads, la.args, base, tparams, la.block)
                stats.append(_launch_stats(funcs[la.name], ctx, static_rules.CUDA_RULES, False,
                                           regs=ps["regs"] if ps["regs"] > 0 else u.get("REG", 0),
                                           spill_st=ps["spill_st"], spill_ld=ps["spill_ld"],
                                           smem=_static_smem(u) + la.smem, programs=la.programs, name=short))
        records.append(_finish(c, "cuda", stats, side) if stats else _error_record(c, "cuda", "no kernel launched"))
    home = static_cuda.cuda_home()
    ver = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    return records, dict(build_seconds=b.seconds, build_dir=b.dir, seconds=round(time.time() - t0, 1),
                         nvcc=next((ln for ln in ver.splitlines() if "release" in ln), "?"),
                         flags=" ".join(static_cuda.FLAGS))


# ----------------------------------------------------------------------------- report


def stale_allowances(records) -> List[str]:
    """Allow-list entries whose records were checked and no longer spill (to be removed)."""
    spills: Dict[tuple, bool] = {}
    for r in records:
        k = (r["backend"], r["kernel"], r["shape"])
        if k in ALLOWED_SPILLS and r["dtype"] in GATE_DTYPES and not r.get("error"):
            spills[k] = spills.get(k, False) or bool(r["spill_bytes"])
    return sorted(" ".join(k) for k, v in spills.items() if not v)


def gate_failures(records) -> List[str]:
    """The CI gate: bf16/fp16 records that spill (and are not allow-listed) or failed."""
    out = []
    for r in records:
        if r["dtype"] not in GATE_DTYPES:
            continue
        if r.get("error"):
            out.append(f"{r['backend']} {r['kernel']} {r['shape']} {r['dtype']}: ERROR {r['error'].splitlines()[0]}")
        elif r["spill_bytes"] and (r["backend"], r["kernel"], r["shape"]) not in ALLOWED_SPILLS:
            out.append(f"{r['backend']} {r['kernel']} {r['shape']} {r['dtype']}: spills {r['spill_bytes']} B "
                       f"({r['dominant_kernel']}, {r['registers']} registers)")
    return out


def _git_commit(paths=()) -> str:
    """HEAD (or, with ``paths``, the last commit that touched them), ``+dirty`` if they have edits."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        cmd = ["git", "log", "-1", "--format=%H", "--", *paths] if paths else ["git", "rev-parse", "HEAD"]
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *(paths or ("mixkernels", "csrc"))], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return (r.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def run(args) -> Dict[str, Any]:
    from . import aot

    t0 = time.time()
    dtypes = [d.strip() for d in args.dtype.split(",")]
    cases = static_cases.build_cases(dtypes, args.shapes.split(",") if args.shapes else None,
                                     args.ops.split(",") if args.ops else None)
    backends = [b.strip() for b in args.backend.split(",")]
    cache = None if args.no_cache else (args.cache or aot.default_cache_dir())
    import tempfile

    tmp = tempfile.mkdtemp(prefix="mk-static-") if cache is None else None
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    records, info = [], {}
    if "triton" in backends:
        r, info["triton"] = triton_records(cases, cache, args.jobs, log)
        records += r
    if "cuda" in backends:
        r, info["cuda"] = cuda_records(cases, cache or tmp, args.jobs, log)
        records += r
    calib = None
    if not args.no_calibration:
        from . import static_calib

        calib = static_calib.calibrate(cache, args.jobs, log)
    import triton

    doc = dict(schema="mixkernels-static/1", model=dict(static_model.MODEL), calibration=calib,
               env=dict(commit=_git_commit(), kernels_commit=_git_commit(("mixkernels/triton", "csrc")), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        triton=triton.__version__, python=sys.version.split()[0], gpu=None,
                        note="static estimate from compiled SASS, no GPU"),
               args=dict(dtypes=dtypes, backends=backends, shapes=args.shapes, ops=args.ops),
               info=info, seconds=round(time.time() - t0, 1), allowed_spills=sorted(map(list, ALLOWED_SPILLS)),
               records=records)
    return doc


def write_json(f, doc) -> None:
    """``static.json`` with one record per line (diffable, ~1 MB for the full report)."""
    head = {k: v for k, v in doc.items() if k != "records"}
    f.write(json.dumps(head, indent=1, default=str)[:-2] + ',\n "records": [\n')
    f.write(",\n".join(json.dumps(r, separators=(",", ":"), default=str) for r in doc["records"]))
    f.write("\n ]\n}\n")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m mixkernels.bench --static", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write static.json and static.md here")
    p.add_argument("--dtype", default="bf16,fp16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--backend", default="triton,cuda", help="comma list of triton, cuda")
    p.add_argument("--shapes", default=None, help="comma list of shape labels (default: all)")
    p.add_argument("--ops", default=None, help="comma list of ops (default: all)")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="before/after columns against an earlier report")
    p.add_argument("--check", action="store_true", help="CI gate: exit 1 if a bf16/fp16 config spills or fails")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("MIXKERNELS_AOT_JOBS", min(2, os.cpu_count() or 1))))
    p.add_argument("--cache", default=None, help="compile cache (default ~/.cache/mixkernels/aot or MIXKERNELS_AOT_CACHE)")
    p.add_argument("--no-cache", action="store_true", help="compile everything afresh")
    p.add_argument("--no-calibration", action="store_true", help="skip the calibration kernels")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels must be defined for the real compiler
        from .aot import clean_env

        return subprocess.call([sys.executable, "-m", "mixkernels.bench", "--static", *argv], env=clean_env())
    args = _parse(argv)
    from . import static_report

    doc = run(args)
    old = None
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
    md = static_report.markdown(doc, old)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "static.json"), "w") as f:
            write_json(f, doc)
        with open(os.path.join(args.out, "static.md"), "w") as f:
            f.write(md)
        print(f"wrote {os.path.join(args.out, 'static.json')} and static.md", file=sys.stderr)
    print(static_report.summary(doc, old))
    if args.check:
        bad = gate_failures(doc["records"])
        if bad:
            print(f"\nstatic gate FAILED ({len(bad)}):\n  " + "\n  ".join(bad), file=sys.stderr)
            return 1
        for k in stale_allowances(doc["records"]):
            print(f"warning: allow-listed {k} no longer spills: remove it from ALLOWED_SPILLS", file=sys.stderr)
        print(f"\nstatic gate passed: no spills in {sum(r['dtype'] in GATE_DTYPES for r in doc['records'])} "
              f"bf16/fp16 records ({len(ALLOWED_SPILLS)} allow-listed configs)", file=sys.stderr)
    return 0
