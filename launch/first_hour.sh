#!/usr/bin/env bash
# A user's first hour on a rented GPU or TPU machine, in one command (run from the checkout on the
# machine, the project installed with jax[cuda12] / jax[tpu]):
#
#   bash launch/first_hour.sh MESH            # MESH: gpu, gpu-8, tpu-v4-8, tpu-v5e-8, ... (a preset)
#   bash launch/gpu.sh --first_hour           # the same, after gpu.sh's install (MESH=gpu-8 for 8 GPUs)
#   bash launch/tpu_vm.sh --first_hour        # on every worker of the TPU VM (MESH=tpu-v4-8, ...)
#
# Parts, in order; each writes its rows or numbers under OUT as it finishes, so a run cut short
# keeps what it ran (rerun the command: finished parts are skipped):
#   1. checks (~2 min): the devices JAX sees match the preset (else it stops at once, exit 1, naming
#      what it found: on a machine without the GPU / TPU it asks for), the mesh, and one train step
#      of a tiny random model on that mesh                                        -> OUT/check/
#   2. bench rows (~10 min): bert-base and roberta-large, bfloat16, the mslm / scl / finetune steps
#      and the eval forward, `dp` (batch 64) and `fsdp` (batch 256) rules          -> OUT/bench-*/rows/
#   3. one K = 8 seed of the TKRE grid on roberta-large, the paper's encoder: FewRel val_wiki
#      16-way, seed 42, baseline and TKRE (launch/ablation.py)                     -> OUT/grid/
#      Needs ROBERTA_LARGE_DIR, a local roberta-large checkpoint folder (config.json,
#      model.safetensors, tokenizer files; nothing is downloaded), and the data under
#      TKRE_DATA_DIR (default ../shared/data); skipped with a message when either is missing.
#
# Time on one H100 (estimate, no run on one yet: analytic FLOPs of docs/accelerators.md at an assumed
# 30-50% bf16 MFU): checks 2 min, bench 10 min (mostly compilation), the grid ~15-25 min (roberta-large
# 355M parameters: baseline ~3 min, mslm + scl ~2 min, TKRE fine-tuning ~4 min, compilation ~1 min per
# program): under an hour. Nothing here needs the network.
#
# Settings: OUT [runs/first_hour]; PY [${TKRE_VENV:-.venv}/bin/python]; ROBERTA_LARGE_DIR; TKRE_DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
MESH="${1:-${MESH:-}}"
if [ -z "$MESH" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
OUT="${OUT:-runs/first_hour}"
PY="${PY:-${TKRE_VENV:-.venv}/bin/python}"
mkdir -p "$OUT"
log() { echo "[first_hour $(date +%H:%M:%S)] $*"; }
done_mark() { [ -f "$1/summary.json" ]; }

# 1. Checks: devices, mesh, one step. A preset names its platform and device count; make_mesh
#    raises MeshError (exit 1) when the devices differ, e.g. no GPU on this machine.
log "1/3 checks on --mesh=$MESH"
"$PY" - "$MESH" "$OUT/check" <<'PYEOF'
import json, pathlib, sys
import jax
from tkre_jax.parallel import mesh as mesh_lib
spec, out = sys.argv[1], pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
devices = jax.devices()
print(f"JAX {jax.__version__}, backend {jax.default_backend()}: {len(devices)} device(s): "
      f"{sorted({d.device_kind for d in devices})}")
try:
  mesh = mesh_lib.make_mesh(spec)
except mesh_lib.MeshError as e:
  print(f"first_hour: {e}", file=sys.stderr)
  sys.exit(1)
print(f"mesh {dict(mesh.shape)}")
(out / "devices.json").write_text(json.dumps({
    "jax": jax.__version__, "backend": jax.default_backend(), "mesh": dict(mesh.shape),
    "devices": [{"id": d.id, "kind": d.device_kind, "platform": d.platform,
                 "process": d.process_index} for d in devices]}, indent=1))
PYEOF
if ! done_mark "$OUT/check/step"; then
  "$PY" -m tkre_jax.main --stage=bench --mesh="$MESH" --workdir="$OUT/check/step" \
      --config.bench.model=tiny --config.bench.stage=finetune --config.bench.steps=1 \
      --config.bench.warmup_steps=0 --config.bench.input_batches=0 --config.bench.seq_len=32 \
      --config.bench.batch_size=64
fi
log "checks passed: $OUT/check"

# 2. Bench rows.
log "2/3 bench rows"
for model in bert-base roberta-large; do
  for rules in dp fsdp; do
    batch=64; [ "$rules" = fsdp ] && batch=256
    w="$OUT/bench-$model-$rules"
    if done_mark "$w"; then log "skip $w (done)"; continue; fi
    "$PY" -m tkre_jax.main --stage=bench --mesh="$MESH" --workdir="$w" \
        --config.bench.model="$model" --config.bench.dtype=bfloat16 \
        --config.bench.batch_size="$batch" --config.mesh.rules="$rules"
  done
done
"$PY" -m tkre_jax.benchmarking.compare "$OUT"/bench-*/rows --out="$OUT/report" || true
log "bench rows in $OUT/bench-*/rows, report in $OUT/report"

# 3. One K = 8 seed of the TKRE grid on roberta-large.
DATA="${TKRE_DATA_DIR:-$(cd .. && pwd)/shared/data}"
if [ -z "${ROBERTA_LARGE_DIR:-}" ] || [ ! -f "${ROBERTA_LARGE_DIR}/config.json" ]; then
  log "3/3 skipped: set ROBERTA_LARGE_DIR to a local roberta-large folder (config.json, model.safetensors, tokenizer)"
  exit 0
fi
if [ ! -f "$DATA/fewrel/val_wiki.json" ]; then
  log "3/3 skipped: no FewRel data under $DATA (TKRE_DATA_DIR)"
  exit 0
fi
log "3/3 TKRE grid, FewRel K = 8, seed 42, roberta-large"
TKRE_DATA_DIR="$DATA" "$PY" launch/ablation.py --out="$OUT/grid" --datasets=fewrel --ks=8 \
    --seeds=42 --variants=baseline,tkre --hf_dir="$ROBERTA_LARGE_DIR" --mesh="$MESH" \
    --set=config.model.dtype=bfloat16 --doc=
log "grid rows in $OUT/grid/results.md"
