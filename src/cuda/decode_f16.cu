// Decode kernels for f16 KV: every supported head dim x group width x row
// alignment (one translation unit per KV dtype keeps each nvcc job small).
#include "cuda/decode_kernel.cuh"

namespace hattn::cuda::detail {

DecodeLaunchFn decode_launcher_f16(int head_dim, int group_width, bool aligned) noexcept {
  return find_decode_launcher<hattn::f16>(head_dim, group_width, aligned);
}

}  // namespace hattn::cuda::detail
