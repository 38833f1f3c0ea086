#!/usr/bin/env bash
# Installs what Driftless needs on a fresh machine, then gets out of the way:
#   - Mosquitto (Debian package) when it is missing and can be installed;
#   - with --test: Chromium (Debian package), for the test that renders the API docs
#     in a browser that can reach nothing but loopback;
#   - a virtual environment in .venv with the project and its dev extras.
# Idempotent: the venv is refreshed only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

apt_updated=0
install_debian() {  # install_debian WHAT PACKAGE...
  local what=$1; shift
  echo "bootstrap: installing $what (Debian package)" >&2
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo"
    else
      echo "bootstrap: $what is missing and I cannot install it (not root, no sudo)." >&2
      echo "           Install the package(s) $*, then run this again." >&2
      exit 1
    fi
  fi
  if [ "$apt_updated" = 0 ]; then $sudo apt-get update -qq; apt_updated=1; fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
have_mosquitto || install_debian Mosquitto mosquitto mosquitto-clients

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  install_debian Chromium chromium
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: Python 3.11 or newer is required ($("$PY" --version 2>&1))" >&2
  exit 1
fi

stamp=.venv/.driftless-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: preparing .venv" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  echo "$want" > "$stamp"
fi
