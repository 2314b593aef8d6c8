#!/usr/bin/env bash
# Set up (or reuse) .venv with the dev dependencies, then run the whole test suite.
# Extra arguments go to pytest, e.g. ./run_tests.sh -m "not slow" to skip the slowest tests locally.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
sdserve_setup "dev"
for step in scripts/install_*.sh; do
  [[ -e "$step" ]] && bash "$step"
done
"$PYTHON" -m ruff check .
exec "$PYTHON" -m pytest "$@"
