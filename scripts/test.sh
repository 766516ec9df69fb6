#!/usr/bin/env bash
# Build hattn (Release, in build/) and run every test. Exit code: ctest's.
#
#   scripts/test.sh              # all tests
#   scripts/test.sh -R install   # extra arguments go to ctest
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
exec ctest --output-on-failure "$@"
