# Sourced by run_api.sh and run_tests.sh: create or reuse the virtual environment and install exactly the lock.
# Sets PYTHON. Arguments: "dev" for the test set-up (requirements-dev.lock), nothing for the server's.
#   VENV=.venv              where the environment lives
#   TORCH_SPEC=...          pip requirement for torch (default: requirements-torch.txt's pin, e.g. torch==2.13.0;
#                           give another build of the same release, e.g. "torch==2.13.0 --index-url URL")
#   SDSERVE_SYSTEM_PYTHON=1 use the python on PATH as it is (the Docker image installs the lock at build time)
#
# The locks are written by scripts/relock.sh (pip-compile, with hashes). Here they are installed with
# --require-hashes --no-deps, so nothing the lock does not name can slip in, and re-installed whenever the lock,
# the torch pin or pyproject.toml changes (a stamp in the venv); packages the lock dropped are removed.

sdserve_setup() {
  local extras="${1:-}"
  if [[ "${SDSERVE_SYSTEM_PYTHON:-0}" == "1" ]]; then
    PYTHON="$(command -v python3 || command -v python)"
    return 0
  fi
  local venv="${VENV:-.venv}"
  local lock="requirements.lock"
  [[ "$extras" == "dev" ]] && lock="requirements-dev.lock"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "sdserve: creating virtual environment in $venv" >&2
    python3 -m venv "$venv"
  fi
  PYTHON="$venv/bin/python"
  local torch_pin torch_spec
  torch_pin="$(grep -v '^#' requirements-torch.txt | grep -m1 .)"
  torch_spec="${TORCH_SPEC:-$torch_pin}"
  local stamp="$venv/.sdserve-install-stamp"
  local wanted installed=""
  wanted="$(_sdserve_stamp "$lock" "$extras" "$torch_spec")"
  [[ -f "$stamp" ]] && installed="$(cat "$stamp")"
  # The dev lock holds every pin of the server's lock, so a test environment serves as it is.
  if [[ "$installed" == "$wanted" || "$installed" == "$(_sdserve_stamp requirements-dev.lock dev "$torch_spec")" ]]; then
    return 0
  fi
  if ! "$PYTHON" - "${torch_pin#torch==}" <<'PY' >/dev/null 2>&1 || [[ -n "${TORCH_SPEC:-}" ]]; then
import sys, torch
sys.exit(torch.__version__.split("+")[0] != sys.argv[1])
PY
    echo "sdserve: installing $torch_spec" >&2
    # shellcheck disable=SC2086  # torch_spec may hold several words (e.g. an --index-url)
    "$PYTHON" -m pip install --quiet $torch_spec
  fi
  echo "sdserve: installing $lock" >&2
  "$PYTHON" -m pip install --quiet --require-hashes --no-deps -r "$lock"
  # The project itself, built with the locked setuptools (no isolated build fetching an unlocked one).
  "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
  local strays
  strays="$("$PYTHON" scripts/lockfile.py strays "$lock")"
  if [[ -n "$strays" ]]; then
    echo "sdserve: removing packages the lock no longer has: $(echo "$strays" | tr '\n' ' ')" >&2
    # shellcheck disable=SC2086  # one name per word
    "$PYTHON" -m pip uninstall --quiet --yes $strays
  fi
  "$PYTHON" -m pip check >&2
  echo "$wanted" >"$stamp"
}

_sdserve_stamp() {
  echo "$(cat "$1" requirements-torch.txt pyproject.toml | sha256sum | cut -d' ' -f1) $2 $3"
}
