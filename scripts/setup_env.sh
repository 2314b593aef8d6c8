# Sourced by run_api.sh and run_tests.sh: create or reuse the virtual environment and install the project.
# Sets PYTHON. Arguments: the pyproject extras to install (e.g. "dev").
#   VENV=.venv             where the environment lives
#   TORCH_SPEC=...         pip requirement for torch when it is not importable (default torch==2.13.0)
#   SDSERVE_SYSTEM_PYTHON=1 use the python on PATH as it is (the Docker image installs everything at build time)

sdserve_setup() {
  local extras="${1:-}"
  if [[ "${SDSERVE_SYSTEM_PYTHON:-0}" == "1" ]]; then
    PYTHON="$(command -v python3 || command -v python)"
    return 0
  fi
  local venv="${VENV:-.venv}"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "sdserve: creating virtual environment in $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
  fi
  PYTHON="$venv/bin/python"
  if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "sdserve: installing ${TORCH_SPEC:-torch==2.13.0}" >&2
    # shellcheck disable=SC2086  # TORCH_SPEC may hold several words (e.g. an --index-url)
    "$PYTHON" -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
  fi
  # Reinstall only when pyproject.toml or the extras changed, so a second start is immediate.
  local target="."
  [[ -n "$extras" ]] && target=".[$extras]"
  local stamp="$venv/.sdserve-install-stamp"
  local wanted
  wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
    echo "sdserve: installing the project ($target)" >&2
    "$PYTHON" -m pip install --quiet -e "$target"
    echo "$wanted" >"$stamp"
  fi
}
