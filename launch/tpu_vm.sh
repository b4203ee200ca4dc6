#!/usr/bin/env bash
# Runs one tkre_jax stage on a Cloud TPU VM (default: a v4-8, one host with 4 TPU v4 chips):
# creates the VM unless it exists, copies this checkout (and the data) to every worker, installs the
# project with jax[tpu], and runs the SAME `python -m tkre_jax.main --mesh=tpu-v4-8 ...` command on
# all workers at once (`--worker=all`). Only the mesh differs from a CPU or GPU run.
#
#   bash launch/tpu_vm.sh --stage=finetune --workdir=runs/fewrel/finetune \
#       --config.data.prepared_dir=runs/fewrel/prepared
#
#   bash launch/tpu_vm.sh --first_hour   # checks, bench rows and one TKRE seed on every worker
#                                        # (launch/first_hour.sh; results copied to runs/first_hour)
#
# Every other argument goes to tkre_jax.main unchanged; relative paths are relative to the checkout
# on the VM. Settings (environment variables, defaults in brackets):
#   TPU_NAME [tkre-v4-8]   ZONE [us-central2-b, where v4 lives]   PROJECT [gcloud's default]
#   TPU_TYPE [v4-8]        TPU_VERSION [tpu-ubuntu2204-base]       MESH [tpu-v4-8]
#   SPOT=1                 create a Spot VM (cheaper, may be preempted)
#   DATA_DIR [$TKRE_DATA_DIR or ../shared/data]  copied to ~/tkre/shared/data on every worker
#   SYNC_PATHS             extra paths of this checkout to copy (e.g. runs/fewrel/prepared)
#   SKIP_SYNC=1 / SKIP_SETUP=1   reuse the code / the environment already on the VM
#   DELETE_AFTER=1         delete the VM at the end (it is billed while it exists)
#
# The commands it runs, spelled out for the defaults (run them by hand to do it step by step):
#   gcloud compute tpus tpu-vm describe tkre-v4-8 --zone=us-central2-b --format='value(state)'
#   gcloud compute tpus tpu-vm create tkre-v4-8 --zone=us-central2-b --accelerator-type=v4-8 \
#       --version=tpu-ubuntu2204-base                             # only when describe failed
#   tar czf /tmp/tkre_src.tgz --exclude=.venv --exclude=.git --exclude=runs main/ shared/data/
#   gcloud compute tpus tpu-vm scp /tmp/tkre_src.tgz tkre-v4-8:~/ --zone=us-central2-b --worker=all
#   gcloud compute tpus tpu-vm ssh tkre-v4-8 --zone=us-central2-b --worker=all --command='
#       mkdir -p ~/tkre && tar xzf ~/tkre_src.tgz -C ~/tkre && cd ~/tkre/main &&
#       (python3 -m venv --help >/dev/null || sudo apt-get install -y python3-venv) &&
#       bash launch/setup_env.sh && .venv/bin/python -m pip install -q -e ".[tpu]"'
#   gcloud compute tpus tpu-vm ssh tkre-v4-8 --zone=us-central2-b --worker=all --command='
#       cd ~/tkre/main && .venv/bin/python -m tkre_jax.main --mesh=tpu-v4-8 --stage=finetune \
#         --workdir=runs/fewrel/finetune --config.data.prepared_dir=runs/fewrel/prepared'
#   gcloud compute tpus tpu-vm scp --recurse tkre-v4-8:~/tkre/main/runs/fewrel/finetune \
#       runs/fewrel/ --zone=us-central2-b --worker=0                # the results, from process 0
#   gcloud compute tpus tpu-vm delete tkre-v4-8 --zone=us-central2-b --quiet
#
# Bench (throughput and MFU rows, tkre_jax/stages/bench.py; random weights, no data needed), then
# the rows back from worker 0 and the report over every machine's rows:
#   bash launch/tpu_vm.sh --stage=bench --workdir=runs/bench-tpu-v4-8 --config.bench.model=bert-base \
#       --config.bench.dtype=bfloat16 --config.bench.batch_size=64
#   gcloud compute tpus tpu-vm scp --recurse tkre-v4-8:~/tkre/main/runs/bench-tpu-v4-8 runs/ \
#       --zone=us-central2-b --worker=0
#   python -m tkre_jax.benchmarking.compare runs/bench-*/rows benchmarks/rows --out=runs/report
# (v5e: TPU_TYPE=v5litepod-8 MESH=tpu-v5e-8 ZONE=<a v5e zone>; --config.mesh.rules=fsdp shards
# the parameters and optimizer state as well)
#
# Pod slices (several workers, e.g. TPU_TYPE=v4-32 MESH=tpu-v4-32): the same command runs on every
# worker with TKRE_DISTRIBUTED=1, so each process calls jax.distributed.initialize() before touching
# the TPU; process 0 writes the logs and summaries. Orbax writes each host's shards of a checkpoint,
# so --workdir must then be a directory that all workers share (e.g. a gcsfuse-mounted bucket at
# the same path on every worker), not the VM's local disk.
# Each worker streams only its shard of the pre-training corpus (tfds.split_for_jax_process), so a
# resumed pod run repeats the data order only on the same number of workers. What is tested
# without a pod: tests/test_multiprocess.py starts 2 processes on one machine (CPU devices, gloo
# collectives, --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I, the flags
# that stand in for the TPU auto-detection), runs mslm (stopped by a NaN at step 3, resumed from its
# step-2 checkpoint) and finetune --init_from it on an fsdp:4 mesh, and checks the parameters
# against a 1-process run and the rows each process read. Untested: real TPU hosts, ICI / DCN
# collectives and gcsfuse.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

TPU_NAME="${TPU_NAME:-tkre-v4-8}"
ZONE="${ZONE:-us-central2-b}"
TPU_TYPE="${TPU_TYPE:-v4-8}"
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
MESH="${MESH:-tpu-v4-8}"
DATA_DIR="${DATA_DIR:-${TKRE_DATA_DIR:-$(cd .. && pwd)/shared/data}}"
REMOTE_ROOT="tkre"  # ~/tkre/main (the checkout) and ~/tkre/shared/data on the VM

if [ $# -eq 0 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
for arg in "$@"; do
  case "$arg" in
    --mesh=*) echo "tpu_vm.sh sets --mesh=$MESH; set MESH=... instead of passing $arg" >&2; exit 2;;
  esac
done

gc=(gcloud compute tpus tpu-vm)
loc=(--zone="$ZONE")
[ -n "${PROJECT:-}" ] && loc+=(--project="$PROJECT")

# 1. The VM: reuse it when it exists, else create it.
if state=$("${gc[@]}" describe "$TPU_NAME" "${loc[@]}" --format='value(state)' 2>/dev/null); then
  echo "[tpu_vm] reusing $TPU_NAME ($TPU_TYPE in $ZONE, state $state)"
  if [ "$state" = "STOPPED" ]; then
    "${gc[@]}" start "$TPU_NAME" "${loc[@]}"
  fi
else
  echo "[tpu_vm] creating $TPU_NAME: $TPU_TYPE in $ZONE, runtime $TPU_VERSION"
  create=(create "$TPU_NAME" "${loc[@]}" --accelerator-type="$TPU_TYPE" --version="$TPU_VERSION")
  [ "${SPOT:-0}" = "1" ] && create+=(--spot)
  "${gc[@]}" "${create[@]}"
fi
workers=$("${gc[@]}" describe "$TPU_NAME" "${loc[@]}" \
  --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' | grep -c . || true)
echo "[tpu_vm] $TPU_NAME has ${workers:-?} worker(s)"

# 2. The code (and the data) on every worker.
if [ "${SKIP_SYNC:-0}" != "1" ]; then
  tarball="$(mktemp -d)/tkre_src.tgz"
  staging="$(mktemp -d)"
  mkdir -p "$staging/main" "$staging/shared"
  # The checkout without its environment, history and run outputs, plus SYNC_PATHS.
  tar cf - --exclude=.venv --exclude=.git --exclude=runs --exclude=workdir --exclude='*.egg-info' \
    --exclude=__pycache__ . | tar xf - -C "$staging/main"
  for p in ${SYNC_PATHS:-}; do
    mkdir -p "$staging/main/$(dirname "$p")"
    cp -r "$REPO/$p" "$staging/main/$p"
  done
  if [ -d "$DATA_DIR" ]; then
    cp -r "$DATA_DIR" "$staging/shared/data"
  else
    echo "[tpu_vm] no data folder at $DATA_DIR: copying the code only" >&2
  fi
  tar czf "$tarball" -C "$staging" .
  rm -rf "$staging"
  echo "[tpu_vm] copying $(du -h "$tarball" | cut -f1) to all workers"
  "${gc[@]}" scp "$tarball" "$TPU_NAME":~/ "${loc[@]}" --worker=all
  "${gc[@]}" ssh "$TPU_NAME" "${loc[@]}" --worker=all --command="mkdir -p ~/$REMOTE_ROOT && \
tar xzf ~/tkre_src.tgz -C ~/$REMOTE_ROOT && rm ~/tkre_src.tgz"
  rm -f "$tarball"
fi

# 3. The environment: the project with jax[tpu] (libtpu) in ~/tkre/main/.venv on every worker.
if [ "${SKIP_SETUP:-0}" != "1" ]; then
  "${gc[@]}" ssh "$TPU_NAME" "${loc[@]}" --worker=all --command="cd ~/$REMOTE_ROOT/main && \
(python3 -c 'import ensurepip' 2>/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q python3-venv)) && \
bash launch/setup_env.sh && .venv/bin/python -m pip install -q -e '.[tpu]' && \
.venv/bin/python -c 'import jax, tkre_jax; print(\"[tpu_vm] ready: jax\", jax.__version__)'"
fi

# 4. The same command on every worker (one JAX process per host).
env_prefix=""
if [ "${workers:-1}" -gt 1 ]; then
  env_prefix="TKRE_DISTRIBUTED=1 "
fi
cmd="cd ~/$REMOTE_ROOT/main && ${env_prefix}.venv/bin/python -m tkre_jax.main --mesh=$(printf '%q' "$MESH")"
for arg in "$@"; do
  cmd+=" $(printf '%q' "$arg")"
done
if [ "$1" = "--first_hour" ]; then  # checks, bench rows, one TKRE seed (launch/first_hour.sh)
  cmd="cd ~/$REMOTE_ROOT/main && ${env_prefix}ROBERTA_LARGE_DIR=${ROBERTA_LARGE_DIR:-} bash launch/first_hour.sh $(printf '%q' "$MESH")"
  set -- --workdir=runs/first_hour
fi
echo "[tpu_vm] on all workers: $cmd"
"${gc[@]}" ssh "$TPU_NAME" "${loc[@]}" --worker=all --command="$cmd"

# 5. The results, from worker 0 (the process that writes summaries and metrics).
workdir=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir="${arg#--workdir=}";; esac
done
if [ -n "$workdir" ] && [ "${workdir#/}" = "$workdir" ]; then
  mkdir -p "$(dirname "$workdir")"
  "${gc[@]}" scp --recurse "$TPU_NAME:~/$REMOTE_ROOT/main/$workdir" "$(dirname "$workdir")/" \
    "${loc[@]}" --worker=0
  echo "[tpu_vm] results in $workdir"
fi

if [ "${DELETE_AFTER:-0}" = "1" ]; then
  "${gc[@]}" delete "$TPU_NAME" "${loc[@]}" --quiet
else
  echo "[tpu_vm] $TPU_NAME is still running (and billed): gcloud compute tpus tpu-vm delete" \
    "$TPU_NAME --zone=$ZONE --quiet"
fi
