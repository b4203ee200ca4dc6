#!/usr/bin/env bash
# Runs one tkre_jax stage on this machine's GPUs (one node, all visible GPUs, one process):
# installs the project with jax[cuda12] into ${TKRE_VENV:-.venv} once, then runs
# `python -m tkre_jax.main --mesh=gpu ...`. Only the mesh differs from a CPU or TPU run.
#
#   bash launch/gpu.sh --stage=finetune --workdir=runs/fewrel/finetune \
#       --config.data.prepared_dir=runs/fewrel/prepared
#
#   bash launch/gpu.sh --first_hour     # a first hour on the machine: checks, bench rows, one
#                                       # TKRE seed on roberta-large (launch/first_hour.sh)
#
# Every other argument goes to tkre_jax.main unchanged. Settings (environment variables):
#   MESH [gpu]   `gpu`: all GPUs on the data axis (plain data parallelism; with 8 GPUs `gpu-8` puts
#                them on fsdp, add --config.mesh.rules=fsdp for ZeRO-3 style sharding)
#   CUDA_VISIBLE_DEVICES   which GPUs to use (default: all)
#   SKIP_SETUP=1           use the environment as it is
#
# The commands it runs, spelled out:
#   bash launch/setup_env.sh && .venv/bin/python -m pip install -q -e ".[gpu]"
#   nvidia-smi -L
#   .venv/bin/python -m tkre_jax.main --mesh=gpu --stage=finetune --workdir=runs/fewrel/finetune \
#       --config.data.prepared_dir=runs/fewrel/prepared
#
# Bench (throughput and MFU rows, tkre_jax/stages/bench.py; random weights, nothing to download):
#   bash launch/gpu.sh --stage=bench --workdir=runs/bench-gpu --config.bench.model=bert-base \
#       --config.bench.dtype=bfloat16 --config.bench.batch_size=64
#   MESH=gpu-8 bash launch/gpu.sh --stage=bench --workdir=runs/bench-gpu8-fsdp \
#       --config.bench.model=roberta-large --config.bench.dtype=bfloat16 \
#       --config.bench.batch_size=256 --config.mesh.rules=fsdp
# then merge the rows of every machine: python -m tkre_jax.benchmarking.compare runs/bench-*/rows --out=runs/report
#
# The `gpu` preset checks that every device JAX sees is a GPU: with a CPU-only jaxlib the run stops
# at once with a MeshError naming what it found (no silent fallback to the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
MESH="${MESH:-gpu}"
PY="${TKRE_VENV:-.venv}/bin/python"

if [ $# -eq 0 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
for arg in "$@"; do
  case "$arg" in
    --mesh=*) echo "gpu.sh sets --mesh=$MESH; set MESH=... instead of passing $arg" >&2; exit 2;;
  esac
done

if [ "${SKIP_SETUP:-0}" != "1" ]; then
  bash launch/setup_env.sh
  if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null
  then
    echo "[gpu] installing jax[cuda12] into ${TKRE_VENV:-.venv}"
    "$PY" -m pip install -q --disable-pip-version-check -e ".[gpu]"
  fi
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L
fi
# Let XLA take most of each GPU's memory up front (its default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-.90}"
if [ "$1" = "--first_hour" ]; then  # checks, bench rows, one TKRE seed (launch/first_hour.sh)
  exec bash launch/first_hour.sh "$MESH"
fi
echo "[gpu] $PY -m tkre_jax.main --mesh=$MESH $*"
exec "$PY" -m tkre_jax.main --mesh="$MESH" "$@"
