#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for the shared-database test (tests/test_postgres.py), once.
# The test starts a throwaway server of its own (initdb + pg_ctl on a free port, as an unprivileged user); nothing
# here starts or configures a service. Without root or apt-get it says so and exits 0, and the test skips itself.
set -euo pipefail

if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "install_postgres: PostgreSQL is already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_postgres: no apt-get here; install PostgreSQL yourself (the Postgres test will skip)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_postgres: not root and no passwordless sudo; skipping (the Postgres test will skip)" >&2
        exit 0
    fi
fi
echo "install_postgres: installing Debian's postgresql"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends postgresql || {
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends postgresql
}
