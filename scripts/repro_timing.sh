#!/usr/bin/env bash
# Wall time of a whole `dvc repro -f` (every stage, as `make repro` runs it on the built-in data) in a
# throw-away clone, stage by stage, appended as one JSON line to results/repro_timing/runs.jsonl.
#   scripts/repro_timing.sh NAME [REV] [key=value ...]
#   e.g. scripts/repro_timing.sh default
#        scripts/repro_timing.sh fp32-contiguous HEAD train.precision=fp32 train.channels_last=false
#        scripts/repro_timing.sh before-issue-18 1e9eab9
# REV (default HEAD) runs with its own code (PYTHONPATH=its src/, also for stages of commits that did
# not put their src/ first). key=value sets params.yaml entries (values parsed as YAML). MLflow and
# energy stay as the params say: the run is the user's `dvc repro`. Env: THREADS (torch threads,
# default: all cores), KEEP=1 keeps the clone, PY (python with okdpose and dvc; default .venv/bin/python).
# The VM's speed drifts: compare runs side by side in A/B/B/A order, never against an old figure.
set -euo pipefail
name=${1:?name}; shift; rev=HEAD
if [ $# -gt 0 ] && [[ $1 != *=* ]]; then rev=$1; shift; fi
repo=$(git rev-parse --show-toplevel); sha=$(git -C "$repo" rev-parse "$rev")
bin=$(cd "$(dirname "${PY:-$repo/.venv/bin/python}")" && pwd); export PATH="$bin:$PATH"
work=$(mktemp -d "/tmp/okdpose-repro-$name.XXXX"); trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
git clone -q "$repo" "$work/repo" && cd "$work/repo" && git checkout -q "$sha"
python - "$@" <<'EOF'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
for item in sys.argv[1:]:
    key, value = item.split("=", 1)
    *path, leaf = key.split(".")
    node = p
    for k in path:
        node = node[k]
    if leaf not in node:
        sys.exit(f"params.yaml of this revision has no {key}: fix the key or the revision")
    node[leaf] = yaml.safe_load(value)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS; fi
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1      # the revision's code; lines arrive when printed
load=$(cut -d' ' -f1 /proc/loadavg); start=$(date -u +%FT%TZ)
# each output line stamped on arrival: dvc's "Running stage 'x':" lines mark where each stage starts
dvc repro -f 2>&1 | while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done > "$work/log"
status=${PIPESTATUS[0]}; printf '%s %s\n' "$(date +%s.%N)" "(end)" >> "$work/log"
[ "$status" -eq 0 ] || { tail -20 "$work/log"; echo "repro_timing: dvc repro failed (log kept in $work)"; KEEP=1; exit 1; }
mkdir -p "$repo/results/repro_timing"
PYTHONPATH="$repo/src" python - "$work/log" "$name" "$sha" "$start" "$load" "$@" >> "$repo/results/repro_timing/runs.jsonl" <<'EOF'
import json, os, re, sys
log, name, sha, start, load, *overrides = sys.argv[1:]
stamps = [(float(t), text) for t, _, text in (line.rstrip("\n").partition(" ") for line in open(log))]
marks = [(t, m.group(1)) for t, text in stamps if (m := re.match(r"Running stage '(.+)':", text))]
end = stamps[-1][0]
stages = {s: round((marks[i + 1][0] if i + 1 < len(marks) else end) - t, 1) for i, (t, s) in enumerate(marks)}
train = json.load(open("metrics/train.json"))
ev = json.load(open("metrics/eval.json"))
test_ap = {k: round(v["AP"], 4) for k, v in sorted(ev.items()) if k.startswith("stage") and isinstance(v, dict)
           and "AP" in v}
from okdpose.device import cpu_model, reported_flags      # this checkout's: older revisions lack it
machine = {"cpu": cpu_model(), "flags": " ".join(reported_flags())}
print(json.dumps({"name": name, "rev": sha, "overrides": overrides, "start_utc": start, "load_before": float(load),
                  "threads": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()), **machine,
                  "total_s": round(end - marks[0][0], 1), "stages_s": stages,
                  "precision": train.get("precision", "fp32"), "train_seconds": train.get("train_seconds"),
                  "test_ap": test_ap}))
EOF
tail -1 "$repo/results/repro_timing/runs.jsonl"
