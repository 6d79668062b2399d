#!/usr/bin/env bash
# Installs the Debian packages the test suite and `caracal bench` need beyond the Rust
# toolchain, only when missing: prometheus (for `promtool`, which checks and unit-tests the
# alert rules), nginx (the plain reverse proxy the governed benchmark is measured beside), and
# chromium with chromium-driver (the console's browser tests).
set -euo pipefail

# Tests run in parallel and each may call this script: one install at a time (apt's own lock
# refuses a second apt-get instead of waiting), and the others then find the packages there.
exec 9>"${TMPDIR:-/tmp}/caracal-install-deps.lock"
flock 9

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
[[ -x /usr/bin/chromium ]] || need+=(chromium)
[[ -x /usr/bin/chromedriver ]] || need+=(chromium-driver)
if ((${#need[@]})); then
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  # The packaged daemon is not wanted: only its tools. Do not let the install start services.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
promtool --version | head -1
/usr/sbin/nginx -v
/usr/bin/chromedriver --version
