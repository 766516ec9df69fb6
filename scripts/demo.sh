#!/usr/bin/env bash
# Build hattn (Release, in build/) and run example 01: CPU dense decode
# attention on a paged KV cache, timed and checked against the reference.
#
#   scripts/demo.sh                        # the example's defaults
#   scripts/demo.sh --batch 8 --dtype f16  # arguments go to the example (--help)
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

hattn_setup
exec "$HATTN_BUILD_DIR/examples/01_cpu_dense_decode" "$@"
