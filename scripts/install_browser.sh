#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test (tests/test_ui_browser.py), once.
# Playwright drives it through executable_path=/usr/bin/chromium: never `playwright install`.
# Skips when the browser is already there; without root or apt-get it says so and exits 0,
# and the browser test then skips itself with the reason.
set -euo pipefail

CHROMIUM="${SDSERVE_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    echo "install_browser: $CHROMIUM is already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; install Chromium yourself and set SDSERVE_CHROMIUM" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_browser: not root and no passwordless sudo; skipping (the browser test will skip)" >&2
        exit 0
    fi
fi
echo "install_browser: installing Debian's chromium"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y chromium || {
    $SUDO apt-get update
    $SUDO apt-get install -y chromium
}
"$CHROMIUM" --version
