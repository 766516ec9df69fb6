#!/usr/bin/env bash
# Build hattn (Release, in build/) and run examples/llama_decode on a synthetic
# Llama 3.2 1B-shaped model (random bf16 weights, written once to
# build/synthetic/ and reused) at a 16K-token context: the KV caches are
# filled synthetically (benchmark-only prefill), then 32 tokens are decoded
# with CPU dense attention, and the table shows decode tok/s and where the
# time goes (GEMM, attention, copies, merge) and the KV memory.
#
#   scripts/demo.sh                          # the default above
#   scripts/demo.sh --prompt-len 4096        # arguments go to llama_decode after
#                                            # the defaults, and override them (--help)
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

hattn_setup
exec "$HATTN_BUILD_DIR/examples/llama_decode" \
  --synthetic llama3-1b-shape --synthetic-dir "$HATTN_BUILD_DIR/synthetic" \
  --prompt-len 16384 --prefill synthetic --max-new-tokens 32 --attention cpu-dense "$@"
