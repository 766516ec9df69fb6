#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on bench_cuda_dense's decode shapes.

The comparison point for `bench_cuda_dense` (issue: "faster than SDPA"): one
query token per sequence, 32 query heads, 8 KV heads (GQA, enable_gqa=True),
head dim 128, every sequence n tokens, bf16 or f16 q/K/V. SDPA reads a
contiguous [b, 8, n, 128] cache (it has no paged layout), which favours it.
Timed as bench_cuda_dense is: CUDA events around `reps` calls, each on the
next of several KV sets (>= 256 MiB in all, so L2 holds none of them), median
of 7 rounds after a warm-up; GB/s counts the K and V bytes.

    python3 benchmarks/sdpa_reference.py [--json out.json]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128


def time_case(dtype, n, b, backend):
    kv_bytes = 2 * b * n * HKV * D * torch.tensor([], dtype=dtype).element_size()
    sets = max(1, -(-(256 << 20) // kv_bytes))
    g = torch.Generator(device="cuda").manual_seed(n * 131 + b)
    ks = [torch.randn(b, HKV, n, D, device="cuda", dtype=dtype, generator=g) for _ in range(sets)]
    vs = [torch.randn(b, HKV, n, D, device="cuda", dtype=dtype, generator=g) for _ in range(sets)]
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=dtype, generator=g)
    from torch.nn.attention import sdpa_kernel

    def step(i):
        return F.scaled_dot_product_attention(q, ks[i % sets], vs[i % sets], enable_gqa=True)

    with sdpa_kernel(backend):
        try:
            step(0)
        except RuntimeError as e:
            return None, str(e).splitlines()[0]
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for i in range(sets):
            step(i)
        t1.record()
        torch.cuda.synchronize()
        per = t0.elapsed_time(t1) / sets
        reps = max(sets, int(20.0 / max(per, 1e-3)))
        rounds = []
        for _ in range(7):
            t0.record()
            for i in range(reps):
                step(i)
            t1.record()
            torch.cuda.synchronize()
            rounds.append(t0.elapsed_time(t1) / reps)
    ms = statistics.median(rounds)
    del ks, vs
    torch.cuda.empty_cache()
    return ms, kv_bytes / (ms * 1e-3) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    rows = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'case':34} {'backend':10} {'us/step':>9} {'GB/s':>8}")
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "f16")):
        for n in (4096, 32768, 131072):
            for b in (1, 8, 64):
                best = None
                for bname, be in backends.items():
                    if bname == "math" and b * n > 8 * 32768:
                        continue  # materializes the scores: slow and large
                    ms, gbps = time_case(dtype, n, b, be)
                    case = f"sdpa/{name}/kv:{n}/bs:{b}"
                    if ms is None:
                        print(f"{case:34} {bname:10} unavailable: {gbps[:60]}")
                        continue
                    print(f"{case:34} {bname:10} {ms * 1e3:9.1f} {gbps:8.0f}")
                    rows.append({"case": case, "backend": bname, "us": ms * 1e3, "GBps": gbps})
                    if best is None or ms < best[1]:
                        best = (bname, ms)
                print(f"{'':34} best: {best[0]} {best[1] * 1e3:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
