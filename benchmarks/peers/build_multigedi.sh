#!/usr/bin/env bash
# Build the reference peer multigedi 1.1.0 (PyPI sdist) into two venvs OUTSIDE the repo:
#
#   $PEERS_DIR/mg-sse3    the package's own flags (-march=nocona -mtune=haswell: SSE3, no AVX)
#   $PEERS_DIR/mg-native  the same sources with those two flags replaced by
#                         -march=native -mtune=native (patched in a temporary copy)
#
# multigedi is never a dependency of atlasfit; these venvs only serve peer benchmarks
# (benchmarks/peers/multigedi_ref_runner.py) and the fixture check (check_fixture.py).
#
# Usage:   bash benchmarks/peers/build_multigedi.sh            # build what is missing
#          FORCE=1 bash benchmarks/peers/build_multigedi.sh    # rebuild both from scratch
#          PEERS_DIR=/somewhere/else bash benchmarks/peers/build_multigedi.sh
#
# Idempotent: a venv whose build stamp matches and whose `import multigedi` works is kept.
# Needs: python3.11, g++, cmake >= 3.15, Eigen 3 headers (installed with apt-get if missing
# and running as root), network access to PyPI (or a pip index that has the sdist).
set -euo pipefail

PEERS_DIR="${PEERS_DIR:-/work/peers}"
PYTHON="${PYTHON:-python3.11}"
VERSION="1.1.0"
SDIST_SHA256="5650e35385f31b1ae9ddd24f3c2535fafc9260b4724306a6833f4dedeaa145dc"
STAMP="multigedi-${VERSION}-${SDIST_SHA256:0:12}"

log() { printf '[build_multigedi] %s\n' "$*" >&2; }

mkdir -p "$PEERS_DIR/sdist"

# 1. Eigen 3 headers (header-only; CMake finds /usr/share/eigen3/cmake/Eigen3Config.cmake).
if [ ! -f /usr/include/eigen3/Eigen/Core ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing libeigen3-dev"
    apt-get update
    apt-get install -y libeigen3-dev
  else
    log "Eigen 3 headers missing: run 'sudo apt-get install -y libeigen3-dev' first"; exit 1
  fi
fi

# 2. scikit-build-core must stay < 0.10 (pinned for every pip call below).
CONSTRAINTS="$PEERS_DIR/constraints.txt"
echo "scikit-build-core<0.10" > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"
export PIP_DISABLE_PIP_VERSION_CHECK=1

make_venv() {  # $1 = venv path: fresh venv with the build requirements
  rm -rf "$1"
  "$PYTHON" -m venv "$1"
  "$1/bin/pip" install -q "scikit-build-core<0.10" pybind11 numpy scipy anndata mudata psutil
}

# 3. The sdist (downloaded once with the first venv's pip, checked against its sha256).
SDIST="$PEERS_DIR/sdist/multigedi-${VERSION}.tar.gz"
sdist_ok() { [ -f "$SDIST" ] && echo "$SDIST_SHA256  $SDIST" | sha256sum -c --status; }

venv_ok() {  # $1 = venv: stamp matches and the extension imports
  [ "${FORCE:-0}" != 1 ] && [ -f "$1/.multigedi-stamp" ] \
    && [ "$(cat "$1/.multigedi-stamp")" = "$STAMP" ] \
    && "$1/bin/python" -c "import multigedi._multigedi_cpp" 2>/dev/null
}

build_variant() {  # $1 = name (sse3|native)
  local name="$1" venv="$PEERS_DIR/mg-$1" blog="$PEERS_DIR/build-$1.log" src
  if venv_ok "$venv"; then log "$venv is up to date ($STAMP)"; return; fi
  log "creating $venv"
  make_venv "$venv"
  if ! sdist_ok; then
    log "downloading multigedi==$VERSION sdist"
    rm -f "$SDIST"
    "$venv/bin/pip" download --no-deps --no-binary :all: --no-build-isolation \
      "multigedi==$VERSION" -d "$PEERS_DIR/sdist"
    sdist_ok || { log "sha256 of $SDIST differs from $SDIST_SHA256"; exit 1; }
  fi
  if [ "$name" = sse3 ]; then
    src="$SDIST"
  else
    # Its CMakeLists adds `-march=nocona -mtune=haswell` with target_compile_options, which
    # come AFTER CMAKE_CXX_FLAGS on the command line (the last -march wins), so a
    # CMAKE_CXX_FLAGS / cmake.args override cannot change the target: patch a temp copy.
    local tmp; tmp="$(mktemp -d)"
    tar xzf "$SDIST" -C "$tmp"
    src="$tmp/multigedi-$VERSION"
    local cm="$src/src/_multigedi_cpp/CMakeLists.txt"
    sed -i -E 's/^([[:space:]]+)-march=nocona[[:space:]]*$/\1-march=native/; s/^([[:space:]]+)-mtune=haswell[[:space:]]*$/\1-mtune=native/' "$cm"
    [ "$(grep -cE '^[[:space:]]+-(march|mtune)=native[[:space:]]*$' "$cm")" = 2 ] \
      || { log "could not patch the -march/-mtune lines of $cm"; exit 1; }
  fi
  log "building ($name), verbose log: $blog"
  # cmake.verbose=true in the package's pyproject prints every compiler command with -v.
  "$venv/bin/pip" install -v --no-build-isolation "$src" > "$blog" 2>&1 \
    || { tail -40 "$blog"; log "build failed, see $blog"; exit 1; }
  # Prove which -march reached the compiler (every g++ compile line of the extension).
  local want; if [ "$name" = sse3 ]; then want="-march=nocona"; else want="-march=native"; fi
  local ncomp nwant
  ncomp="$(grep -cE 'g\+\+ .* -c .*_multigedi_cpp/' "$blog" || true)"
  nwant="$(grep -E 'g\+\+ .* -c .*_multigedi_cpp/' "$blog" | grep -c -- "$want" || true)"
  if [ "$ncomp" = 0 ] || [ "$ncomp" != "$nwant" ]; then
    log "only $nwant of $ncomp compile lines carry $want; see $blog"; exit 1
  fi
  if [ "$name" = native ] && grep -q -- '-march=nocona' "$blog"; then
    log "-march=nocona still present in the native build; see $blog"; exit 1
  fi
  log "$nwant/$ncomp compile lines carry $want"
  [ "$name" = native ] && rm -rf "$(dirname "$src")"
  "$venv/bin/pip" freeze > "$PEERS_DIR/mg-$name.freeze.txt"
  echo "$STAMP" > "$venv/.multigedi-stamp"
}

build_variant sse3
build_variant native

# 4. Instruction-set evidence in the built extensions (AVX registers / FMA), if objdump exists.
if command -v objdump > /dev/null; then
  for name in sse3 native; do
    so="$(ls "$PEERS_DIR/mg-$name"/lib/python3.*/site-packages/multigedi/_multigedi_cpp*.so)"
    dis="$(objdump -d "$so")"
    log "mg-$name: ymm=$(grep -c '%ymm' <<< "$dis" || true) zmm=$(grep -c '%zmm' <<< "$dis" || true) vfmadd=$(grep -c 'vfmadd' <<< "$dis" || true)"
  done
fi
log "done: $PEERS_DIR/mg-sse3/bin/python and $PEERS_DIR/mg-native/bin/python"
