#!/usr/bin/env bash
# README command 2: installs the test dependencies and runs the whole test suite.
# Tests that need real data read ../shared/data (or $TKRE_SHARED_DATA) and skip when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test
exec "${TKRE_VENV:-.venv}/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
