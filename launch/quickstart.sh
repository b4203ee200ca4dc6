#!/usr/bin/env bash
# README command 1: set up the environment and run the main job on real data:
# FewRel 1.0 val_wiki, 16-way K-shot (default K = 8) on the canonical split, all-MiniLM-L6-v2:
# TKRE with the reference code's objectives (docs/fidelity.md lists what differs): generate (replay)
# -> prepare (K-shot + 8 SCDG instances per relation) -> mslm (MLM-head warm-up, then MSLM) -> scl
# (the authors' 2-way contrastive term) -> finetune -> eval, next to the plain fine-tuning baseline
# (K-shot set only, HF encoder).
#
#   bash launch/quickstart.sh [--data_dir DIR] [--k K] [--workdir DIR] [--mesh MESH] [--no_setup]
#
# DIR must hold fewrel/val_wiki.json, fewrel/pid2name.json, fewrel/val_wiki_split.json (default:
# $TKRE_DATA_DIR, else ../shared/data beside the checkout). Prints the test metrics at the end, and
# each stage's wall time, start-up and compilation seconds.
# --no_setup: skip launch/setup_env.sh (the venv ${TKRE_VENV:-.venv} must already hold tkre_jax).
# Every stage is its own process; they share JAX's persistent compilation cache, by default
# <workdir>/jax_cache ($TKRE_COMPILATION_CACHE=DIR: that folder; set to '' to turn it off).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${TKRE_DATA_DIR:-}"
K=8
WORKDIR=""
MESH=cpu
SETUP=1
while [ $# -gt 0 ]; do
  case "$1" in
    --data_dir) DATA_DIR="$2"; shift 2;;
    --k) K="$2"; shift 2;;
    --workdir) WORKDIR="$2"; shift 2;;
    --mesh) MESH="$2"; shift 2;;
    --no_setup) SETUP=0; shift;;
    *) echo "unknown argument: $1" >&2; exit 2;;
  esac
done
[ -n "$DATA_DIR" ] || DATA_DIR="$(cd .. && pwd)/shared/data"
WORKDIR="${WORKDIR:-runs/fewrel-16way-${K}shot}"
mkdir -p "$WORKDIR" && WORKDIR="$(cd "$WORKDIR" && pwd)"
if [ ! -f "$DATA_DIR/fewrel/val_wiki.json" ]; then
  echo "FewRel data not found under $DATA_DIR/fewrel/." >&2
  echo "Get val_wiki.json and pid2name.json from github.com/thunlp/FewRel (data/), write" >&2
  echo '{"train_pool": [0, 32], "dev": [32, 100], "test": [100, 700]} to val_wiki_split.json,' >&2
  echo "and pass --data_dir DIR (or set TKRE_DATA_DIR) to the folder holding fewrel/." >&2
  exit 1
fi

if [ "$SETUP" = 1 ]; then bash launch/setup_env.sh; fi
PY="${TKRE_VENV:-.venv}/bin/python"
export TKRE_DATA_DIR="$DATA_DIR"
CACHE="${TKRE_COMPILATION_CACHE-$WORKDIR/jax_cache}"
TIMES="$WORKDIR/stage_times.tsv"
: > "$TIMES"
# run WORKDIR_NAME ARGS...: one stage in a fresh process; its wall time goes to stage_times.tsv.
run() {
  local name="$1"; shift
  echo; echo "==> tkre_jax.main $* --workdir=$WORKDIR/$name"
  local t0 ms; t0=$(date +%s%N)
  "$PY" -m tkre_jax.main --mesh="$MESH" --config.data.k="$K" --compilation_cache_dir="$CACHE" "$@" \
      --workdir="$WORKDIR/$name"
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%d.%d\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) >> "$TIMES"
}
start=$(date +%s)

# 1. LLM knowledge. Offline: replay the pre-generated EDKG/SCDG files through the same validation
#    (live generation: drop --llm=replay and set ANTHROPIC_API_KEY).
run generate --stage=generate --llm=replay
# 2. TFRecords. TKRE: the K-shot set plus the first 8 valid SCDG instances per relation (the
#    reference's add_k = 8; gold and synthetic rows counted in prepared/meta.json), dev, test, the
#    knowledge-guided pre-training corpus and the MLM-head warm-up text. Baseline: the K-shot set.
run prepared --stage=prepare --config.data.augment_k=8 \
    --config.data.edkg_file="$WORKDIR/generate/edkg.jsonl" \
    --config.data.scdg_file="$WORKDIR/generate/scdg.jsonl"
run prepared-baseline --stage=prepare --config.data.augment_k=0 \
    --config.data.corpus=off --config.data.unlabelled_file=
P=--config.data.prepared_dir="$WORKDIR/prepared"
# 3. TKRE: MSLM (after the MLM-head warm-up) -> SCL (MSLM kept on) -> fine-tuning on the augmented
#    set, each stage starting from the previous one.
run mslm --stage=mslm "$P"
run scl --stage=scl --init_from="$WORKDIR/mslm" "$P"
run tkre --stage=finetune --init_from="$WORKDIR/scl" "$P" \
    --config.train.final_eval_splits=dev
# 4. The plain fine-tuning baseline: K-shot set only, from the same HF encoder checkpoint.
run baseline --stage=finetune \
    --config.data.prepared_dir="$WORKDIR/prepared-baseline" --config.train.final_eval_splits=dev
# 5. Evaluation in fresh processes from the Orbax checkpoints.
run tkre-eval --stage=eval --init_from="$WORKDIR/tkre"
run baseline-eval --stage=eval --init_from="$WORKDIR/baseline"

"$PY" - "$WORKDIR" "$K" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
workdir, k, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
print(f"\nFewRel val_wiki 16-way {k}-shot, all-MiniLM-L6-v2 (pipeline wall time {seconds} s)")
print(f"{'model':<30}{'split':<7}{'accuracy':>10}{'micro-F1':>10}{'macro-F1':>10}{'n':>7}")
for name, sub in (("fine-tuning (baseline)", "baseline-eval"), ("TKRE (MSLM+SCL+augment)", "tkre-eval")):
  m = json.load(open(f"{workdir}/{sub}/summary.json"))["metrics"]
  for split in ("dev", "test"):
    r = m[split]
    print(f"{name:<30}{split:<7}{100*r['accuracy']:>10.2f}{100*r['micro_f1']:>10.2f}"
          f"{100*r['macro_f1']:>10.2f}{r['num_examples']:>7}")
# Stage by stage: the process's wall time; from its summary.json: start-up (imports, JAX backend),
# XLA compilation (seconds, programs, of which loaded from the persistent cache), training (the
# loop, dev evaluations excluded) and evaluation (finetune: model selection on dev; eval: scoring).
print(f"\n{'stage':<20}{'wall s':>8}{'start-up':>10}{'compile':>9}{'programs':>10}{'cached':>8}"
      f"{'train s':>9}{'eval s':>8}")
num = lambda v, w, d=1: f"{v:>{w}.{d}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
for line in open(f"{workdir}/stage_times.tsv"):
  sub, wall = line.rstrip("\n").split("\t")
  try:
    s = json.load(open(f"{workdir}/{sub}/summary.json"))
  except (OSError, ValueError):
    s = {}
  p, sec = s.get("process", {}), s.get("seconds")
  train = ev = None
  if isinstance(sec, dict) and "train" in sec:
    train = sec["train"] - sec.get("dev_eval", 0) + s.get("head_warmup", {}).get("seconds", 0)
    ev = sec.get("dev_eval", 0) + sec.get("eval", 0) if s.get("stage") == "finetune" else None
  elif s.get("stage") == "eval":
    ev = sum(s.get("split_seconds", {}).values()) or sec
  print(f"{sub:<20}{num(float(wall), 8)}{num(p.get('startup_seconds'), 10)}"
        f"{num(p.get('compile_seconds'), 9)}{num(p.get('compiles'), 10, 0)}"
        f"{num(p.get('cache_hits'), 8, 0)}{num(train, 9)}{num(ev, 8)}")
PYEOF
