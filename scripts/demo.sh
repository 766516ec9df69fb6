#!/usr/bin/env bash
# Build hattn (Release, in build/) and run examples/llama_decode on a synthetic
# Llama 3.2 1B-shaped model (random bf16 weights, written once to
# build/synthetic/ and reused) at a 16K-token context: the KV caches (and the
# LSH indexes) are filled synthetically (benchmark-only prefill), then 32
# tokens are decoded twice, with CPU dense attention and with MagicPIG LSH
# attention (K 10, L 150; layer 0 dense), and the two tables show decode
# tok/s, where the time goes (GEMM, attention, copies, merge), and the KV and
# index memory; a last block puts the two side by side.
#
#   scripts/demo.sh                          # the default above
#   scripts/demo.sh --prompt-len 4096        # arguments go to both llama_decode runs
#                                            # after the defaults, and override them (--help)
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

hattn_setup
run() {
  "$HATTN_BUILD_DIR/examples/llama_decode" \
    --synthetic llama3-1b-shape --synthetic-dir "$HATTN_BUILD_DIR/synthetic" \
    --prompt-len 16384 --prefill synthetic --max-new-tokens 32 --attention "$1" "${@:2}"
}
for arg in "$@"; do
  [[ $arg == -h || $arg == --help ]] && exec "$HATTN_BUILD_DIR/examples/llama_decode" --help
done
dense_out="$(run cpu-dense "$@")"
printf '=== attention cpu-dense ===\n%s\n\n' "$dense_out"
lsh_out="$(run lsh "$@")"
printf '=== attention lsh ===\n%s\n\n' "$lsh_out"

# Side by side: decode speed, attention's share of the decode step, memory.
fields() {
  awk '/^decode +[0-9.]+ s \|/ { for (i = 1; i <= NF; ++i) if ($i == "attention") att = $(i + 1) " s " $(i + 3) }
       /^decode +[0-9.]+ tok\/s/ { tok = $2 }
       /^memory / { kv = $3; idx = $6 }
       END { printf "%s|%s|%s MB|%s MB", tok, att, kv, idx }' <<<"$1"
}
printf '=== side by side ===\n'
printf '%-10s %12s  %-22s %12s %12s\n' attention "decode tok/s" "decode attention" KV index
for a in cpu-dense lsh; do
  out="$dense_out"
  [[ $a == lsh ]] && out="$lsh_out"
  IFS='|' read -r tok att kv idx <<<"$(fields "$out")"
  printf '%-10s %12s  %-22s %12s %12s\n' "$a" "$tok" "$att" "$kv" "$idx"
done
