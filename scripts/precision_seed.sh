#!/usr/bin/env bash
# One default-pipeline run at a given training precision and seed, in a throw-away clone of HEAD,
# kept as results/precision/<name>/ (eval.json, train.json, predictions, meta.json: the grid's
# per-run layout, so `okdpose.precision_runs` can bootstrap bf16 vs fp32 like the grid's rows).
#   scripts/precision_seed.sh PRECISION SEED [CHANNELS_LAST] [NAME]
#   e.g. scripts/precision_seed.sh bf16 1            -> results/precision/default-bf16-s1
#        scripts/precision_seed.sh bf16 1 auto intel-xeon-amx/default-bf16-s1   (another machine: its own table root)
#        scripts/precision_seed.sh fp32 1 false      -> results/precision/default-fp32-s1 (contiguous)
# Env: THREADS (torch threads, default: all cores), KEEP=1 keeps the clone, PY (python with okdpose
# and dvc; default .venv/bin/python), FROM=DIR collects a finished run of that checkout instead of
# running one (its reports/train.json must say that precision, its params that seed; no wall time).
set -euo pipefail
prec=${1:?precision: fp32 | bf16 | auto}; seed=${2:?seed}; cl=${3:-auto}; name=${4:-default-$prec-s$seed}
repo=$(git rev-parse --show-toplevel); rev=$(git -C "$repo" rev-parse HEAD)
bin=$(cd "$(dirname "${PY:-$repo/.venv/bin/python}")" && pwd); export PATH="$bin:$PATH"
if [ -n "${FROM:-}" ]; then
  cd "$FROM"; rev=$(git rev-parse HEAD); start=0; end=0
  python -c 'import json, sys, yaml; t = yaml.safe_load(open("params.yaml"))["train"]
used = json.load(open("reports/train.json")).get("precision")       # what auto resolved to
seed = t["seed"]
if (used, seed) != (sys.argv[1], int(sys.argv[2])):
    sys.exit(f"{sys.argv[3]}: trained with precision {used}, train.seed {seed}, not {sys.argv[1]} {sys.argv[2]}")' "$prec" "$seed" "$FROM"
else
work=$(mktemp -d "/tmp/okdpose-precision-${name//\//_}.XXXX"); trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
git clone -q "$repo" "$work/repo" && cd "$work/repo"
python - "$prec" "$seed" "$cl" <<'EOF'
import sys, yaml
prec, seed, cl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
p = yaml.safe_load(open("params.yaml"))
p["train"].update(precision=prec, seed=seed, channels_last=cl if cl == "auto" else cl == "true")
p["tracking"]["enabled"] = False
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS; fi
start=$(date +%s); dvc repro -q evaluate; end=$(date +%s)
fi
out="$repo/results/precision/$name"; tmp="$out.tmp"; rm -rf "$tmp"; mkdir -p "$tmp"
python - "$tmp" "$name" "$prec" "$seed" "$cl" "$rev" "$((end - start))" <<'EOF'
import gzip, hashlib, json, os, pathlib, sys, time
from okdpose.device import cpu_model, reported_flags
tmp, name, prec, seed, cl, rev, wall = sys.argv[1:]
tmp = pathlib.Path(tmp)
ev = json.load(open("reports/eval.json"))
for k in sorted(int(s[5:]) for s in ev if s.startswith("stage") and s[5:].isdigit()):
    with gzip.GzipFile(tmp / f"predictions_stage{k}.json.gz", "wb", mtime=0) as f:
        f.write(open(f"results/eval/predictions_stage{k}.json", "rb").read())
(tmp / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
(tmp / "train.json").write_text(open("reports/train.json").read())
gt = open(f"data/prepared/{ev.get('split', 'test')}_gt.json", "rb").read()
shared = tmp.parent / "test_gt.json.gz"           # the ground truth every run here is scored on
if not shared.is_file():
    with gzip.GzipFile(shared, "wb", mtime=0) as f:
        f.write(gt)
elif hashlib.sha256(gzip.decompress(shared.read_bytes())).digest() != hashlib.sha256(gt).digest():
    sys.exit(f"{shared}: another test split than this run's data/prepared (data params differ); "
             f"collect this run elsewhere")
meta = {"name": name, "row": f"default-{prec}", "seed": int(seed), "precision": prec, "channels_last": cl,
        "rev": rev, "gt_sha256": hashlib.sha256(gt).hexdigest(), "repro_evaluate_s": int(wall) or None,
        "threads": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()),
        "how": f"scripts/precision_seed.sh {prec} {seed} {cl}: clone of rev, params train.precision {prec}, "
               f"train.seed {seed}, train.channels_last {cl}, tracking off; dvc repro evaluate",
        "machine": f"{cpu_model()}, flags {' '.join(reported_flags())}",
        "finished": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}
(tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
EOF
rm -rf "$out"; mv "$tmp" "$out"; echo "$out ($((end - start)) s)"
