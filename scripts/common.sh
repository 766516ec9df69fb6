# shellcheck shell=bash
# Shared set-up for scripts/test.sh and scripts/demo.sh. Source it; do not run it.
#
#   hattn_setup   install missing Debian packages, configure Release into
#                 build/ (incremental) and build with every core
#
# Environment:
#   HATTN_BUILD_DIR   build directory (default: <repo>/build)
#   HATTN_JOBS        parallel build jobs (default: all cores)
#   HATTN_CMAKE_ARGS  extra arguments for the configure step, e.g.
#                     "-DHATTN_ENABLE_CUDA=OFF" (split on spaces)
#   HATTN_TSAN        1/0: run (or skip) the ThreadSanitizer build of the
#                     runtime tests in scripts/test.sh (default: run it when
#                     test.sh gets no ctest arguments)

HATTN_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
HATTN_BUILD_DIR="${HATTN_BUILD_DIR:-$HATTN_ROOT/build}"
HATTN_JOBS="${HATTN_JOBS:-$(nproc 2>/dev/null || echo 2)}"

# What a fresh Debian 12 machine needs to build and test hattn.
HATTN_PACKAGES=(build-essential cmake g++ libtbb-dev libeigen3-dev libxsimd-dev catch2
                libbenchmark-dev nlohmann-json3-dev)

hattn_log() { printf '==> %s\n' "$*" >&2; }

hattn_missing_packages() {
  local pkg
  for pkg in "${HATTN_PACKAGES[@]}"; do
    # A removed package can still be known to dpkg ("deinstall ok config-files").
    if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
      printf '%s\n' "$pkg"
    fi
  done
}

hattn_install_packages() {
  if ! command -v dpkg >/dev/null 2>&1; then
    hattn_log "dpkg not found: not a Debian system; install these yourself: ${HATTN_PACKAGES[*]}"
    return 0
  fi
  local missing
  mapfile -t missing < <(hattn_missing_packages)
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  hattn_log "installing missing packages: ${missing[*]}"
  local -a sudo=()
  if ((EUID != 0)); then
    if ! command -v sudo >/dev/null 2>&1; then
      hattn_log "error: not root and sudo not found; as root run: apt-get install ${missing[*]}"
      return 1
    fi
    sudo=(sudo)
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

hattn_configure() {
  local -a extra=()
  if [[ -n "${HATTN_CMAKE_ARGS:-}" ]]; then
    read -r -a extra <<<"$HATTN_CMAKE_ARGS"
  fi
  hattn_log "configuring $HATTN_BUILD_DIR (Release)"
  cmake -S "$HATTN_ROOT" -B "$HATTN_BUILD_DIR" -DCMAKE_BUILD_TYPE=Release "${extra[@]}"
}

hattn_build() {
  hattn_log "building with $HATTN_JOBS jobs"
  cmake --build "$HATTN_BUILD_DIR" --parallel "$HATTN_JOBS"
}

hattn_setup() {
  hattn_install_packages
  hattn_configure
  hattn_build
}

# ThreadSanitizer: a second build, in $HATTN_BUILD_DIR/tsan, of only the
# runtime (orchestrator) tests and the library they link, run with TBB's
# uninstrumented internals suppressed (tests/runtime/tsan.supp explains).
hattn_tsan_tests() {
  local dir="$HATTN_BUILD_DIR/tsan"
  hattn_log "ThreadSanitizer: configuring $dir"
  cmake -S "$HATTN_ROOT" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DHATTN_ENABLE_CUDA=OFF \
    -DHATTN_BUILD_BENCHMARKS=OFF -DHATTN_BUILD_EXAMPLES=OFF \
    "-DCMAKE_CXX_FLAGS=-fsanitize=thread" "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread" >/dev/null
  hattn_log "ThreadSanitizer: building hattn_runtime_tests and hattn_model_tests with $HATTN_JOBS jobs"
  cmake --build "$dir" --parallel "$HATTN_JOBS" --target hattn_runtime_tests hattn_model_tests
  local options="halt_on_error=1 second_deadlock_stack=1 suppressions=$HATTN_ROOT/tests/runtime/tsan.supp"
  hattn_log "ThreadSanitizer: running hattn_runtime_tests"
  TSAN_OPTIONS="$options" "$dir/tests/hattn_runtime_tests" || return 1
  # The model decoding through the orchestrator (streams and CPU thread of
  # hattn; TBB kept to the entering thread: it is not instrumented).
  hattn_log "ThreadSanitizer: running hattn_model_tests [orchestrated]"
  HATTN_TEST_ONE_TBB_THREAD=1 TSAN_OPTIONS="$options" "$dir/tests/hattn_model_tests" "[orchestrated]"
}
