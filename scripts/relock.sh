#!/usr/bin/env bash
# Re-resolve the locks with pip-compile, then install them and run the whole suite on them.
#   scripts/relock.sh            after editing pyproject.toml: keep every pin that still fits, resolve the rest
#   scripts/relock.sh --upgrade  move every package to the newest release that pyproject.toml allows
# Review `git diff requirements*.lock`, and commit the locks only when the suite passed.
# torch is pinned apart, in requirements-torch.txt (its build differs per target); the locks hold its dependencies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PIP_TOOLS="pip-tools==7.6.2"
tools=".cache/relock-venv"
if [[ ! -x "$tools/bin/pip-compile" ]]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet "$PIP_TOOLS"
fi
upgrade=()
[[ "${1:-}" == "--upgrade" ]] && upgrade=(--upgrade)

compile() {
  local output="$1"; shift
  "$tools/bin/pip-compile" --quiet "${upgrade[@]}" --generate-hashes --strip-extras --unsafe-package torch \
    --no-emit-index-url --no-emit-find-links -c requirements-torch.txt "$@" -o "$output" pyproject.toml
}
# The server's lock first; the dev lock is constrained by it, so both agree on every shared package.
compile requirements.lock --extra gpu --extra openvino
# The dev lock also holds the optional extras that the tests exercise (Ray Serve, the PostgreSQL driver).
compile requirements-dev.lock --extra gpu --extra openvino --extra dev --extra ray --extra postgres -c requirements.lock
# Scaling out (README "Scaling out"): the server's lock plus Ray Serve and the PostgreSQL driver, every pin the dev
# lock's (so what a Ray image installs is what the cluster tests ran on).
compile requirements-ray.lock --extra gpu --extra openvino --extra ray --extra postgres -c requirements.lock \
  -c requirements-dev.lock

./run_tests.sh
