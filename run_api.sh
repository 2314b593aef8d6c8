#!/usr/bin/env bash
# Set up (or reuse) .venv, then serve the API on ${HOST:-0.0.0.0}:${PORT:-8000} (demo model by default).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
sdserve_setup ""
exec "$PYTHON" -m uvicorn api.app:create_app --factory \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" --log-level "${LOG_LEVEL:-info}" "$@"
