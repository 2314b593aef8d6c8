#!/usr/bin/env bash
# Set up (or reuse) .venv, then serve the API on ${HOST:-127.0.0.1}:${PORT:-8000} (the shapes model by default).
# Loopback only unless HOST says otherwise (HOST=0.0.0.0 for every interface, as the Docker image does); the server
# reads HOST too and warns at start-up when it listens beyond loopback without API keys (README, Security).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
sdserve_setup ""
export HOST="${HOST:-127.0.0.1}"
exec "$PYTHON" -m uvicorn api.app:create_app --factory \
  --host "$HOST" --port "${PORT:-8000}" --log-level "${LOG_LEVEL:-info}" "$@"
