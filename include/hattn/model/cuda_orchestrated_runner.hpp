#pragma once
// The orchestrated decode with the model's stages on a GPU and attention on
// the CPU (Lamina's split; MagicPIG's when the backend is LSH): stage A and B
// of CudaLlamaModel on a CUDA compute stream, q/k/v copied by a CUDA copy
// stream into pinned ring slots, the orchestrator's CPU thread appending k, v
// to the host KV cache and attending (cpu::DenseDecode or the LSH backend),
// the partial copied back and merged into stage B's input, the compute stream
// waiting for it with a stream memory wait (no host round trip). Only with
// HATTN_ENABLE_CUDA.
//
// Prefill is not pipelined: run it with LlamaRunner (host stages) over a
// DenseKvAttention, as for OrchestratedRunner::create; decoding continues
// from that cache. The returned runner's API is OrchestratedRunner's; its
// times() split gemm/other/copies by CUDA events on the compute stream.

#include <memory>
#include <string>

#include "hattn/core/status.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/cuda_llama.hpp"
#include "hattn/model/orchestrated_runner.hpp"

namespace hattn::model {

// `model` (on its device, made current here), `prefilled` and `attention`
// must outlive the runner. Errors like OrchestratedRunner::create, plus
// kCudaError when streams or device buffers cannot be had.
Status create_cuda_orchestrated_runner(const CudaLlamaModel& model, DenseKvAttention& prefilled,
                                       const OrchestratedRunnerOptions& options,
                                       const CpuExecutor& attention,
                                       std::unique_ptr<OrchestratedRunner>* out,
                                       std::string* detail = nullptr);

}  // namespace hattn::model
