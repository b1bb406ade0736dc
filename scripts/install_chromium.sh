#!/usr/bin/env bash
# Installs Debian's chromium for the browser tests (tests/browser), once: Playwright drives it through
# executable_path=/usr/bin/chromium, so no browser download from Playwright's CDN is needed.
# Idempotent and quiet: does nothing when /usr/bin/chromium exists; never fails the caller (the browser tests
# skip with a clear message when chromium is still missing, e.g. without root or without a package mirror).
set -uo pipefail
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_chromium: not root and no passwordless sudo: browser tests will be skipped" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get on this system: install chromium yourself for the browser tests" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 ||
        echo "install_chromium: apt-get install chromium failed: browser tests will be skipped" >&2
fi
exit 0
