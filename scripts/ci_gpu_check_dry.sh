#!/usr/bin/env bash
# CI: scripts/gpu_check.sh end to end on this CPU machine (GPU_CHECK_DRY=1: tiny sizes, Triton
# interpreter, compiled CPU kernels and reference peers), then the results import on its output,
# so the one-call GPU check is proven before a GPU is at hand. Run in the project venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=$(mktemp -d)
DEST=$(mktemp -d)
rc=0
GPU_CHECK_DRY=1 GPU_CHECK_STRICT=1 OUT="$OUT" bash scripts/gpu_check.sh > "$DEST/stdout" 2>&1 || rc=$?
grep -E "^(== |   [a-z-]+: )" "$DEST/stdout"  # the steps and their times
tail -n 12 "$DEST/stdout"
[ "$rc" -eq 0 ] || { echo "gpu_check.sh dry run failed (rc=$rc)"; cat "$OUT/log.txt" | tail -n 80; exit 1; }
n=$(find "$OUT" -type f | wc -l)
echo "dry run: $n files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$n" -le 8 ] && [ -f "$OUT/summary.json" ]
python - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
assert s["dry_run"] and s["complete"], "the dry run did not reach its end"
bad = {f: b for f, bks in s["matrix"].items() for b, cells in bks.items() if any(c != "pass" for c in cells.values())}
assert set(s["matrix"]) == {"window_attention", "mixing", "windows", "uniform", "losses"}, s["matrix"].keys()
assert not bad and all({"triton", "cpu"} <= set(b) for b in s["matrix"].values()), s["matrix"]
assert s["headline"], "no benchmark result reached the summary"
print("dry run summary ok:", s["tests"])
PY
cp README.md "$DEST/README.md"
python -m mixkernels.bench.results import "$OUT" --dest "$DEST/results" --readme "$DEST/README.md" --allow-dry
grep -q "dry-cpu" "$DEST/README.md"
rm -rf "$OUT" "$DEST"
