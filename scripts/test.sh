#!/usr/bin/env bash
# Build hattn (Release, in build/) and run every test. Exit code: ctest's.
#
#   scripts/test.sh              # all tests
#   scripts/test.sh -R install   # extra arguments go to ctest
#
# Without arguments it then also builds and runs the runtime tests under
# ThreadSanitizer (build/tsan; HATTN_TSAN=0 skips it, HATTN_TSAN=1 forces it).
#
# On a fresh Debian 12 machine it first installs the packages it needs (as
# root, or through sudo). Re-runs are incremental. See scripts/common.sh for
# HATTN_BUILD_DIR, HATTN_JOBS and HATTN_CMAKE_ARGS.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

hattn_setup
hattn_log "running tests"
cd "$HATTN_BUILD_DIR"
rc=0
ctest --output-on-failure "$@" || rc=$?
tsan="${HATTN_TSAN:-auto}"
if [[ "$tsan" == 1 || ("$tsan" == auto && $# -eq 0) ]]; then
  hattn_tsan_tests || rc=1
fi
exit "$rc"
