#!/usr/bin/env bash
# Build (once) the Python venv holding the published Caracal SDKs used by the
# interop tests. Prints the venv path as the last line of stdout.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CARACAL_SDK_VENV:-$root/target/sdk-venv}"
marker="$venv/.caracal-sdk-installed"
py="$venv/bin/python"

# Reuse a finished venv; a missing marker means a previous install broke off.
if [[ -f "$marker" ]] && "$py" -c '' >/dev/null 2>&1; then
  echo "$venv"
  exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# --clear: start over from a half-built or stale venv.
if ! python3 -m venv --clear "$venv" >"$log" 2>&1; then
  cat "$log" >&2
  echo "sdk-venv: creating venv at $venv failed" >&2
  exit 1
fi

# The packages declare a newer Python than the machine's 3.11; they work on it.
if ! "$py" -m pip install --quiet --disable-pip-version-check \
     --ignore-requires-python \
     caracalai-sdk caracalai-admin caracalai-verify caracalai-revocation-redis \
     >"$log" 2>&1; then
  cat "$log" >&2
  echo "sdk-venv: pip install into $venv failed (log above)" >&2
  exit 1
fi

touch "$marker"
echo "$venv"
