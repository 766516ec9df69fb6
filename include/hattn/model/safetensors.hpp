#pragma once
// Reading (memory-mapped) and writing safetensors files, and a TensorStore that
// serves the tensors of a model folder: model.safetensors, or shards listed
// in model.safetensors.index.json.
//
// Format: an 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...}
// and the data, offsets relative to its start. Every header is checked
// against the file size before a tensor is handed out.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/status.hpp"

namespace hattn::model {

// A tensor inside a mapped file. Valid while its TensorStore lives.
struct TensorRef {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    return n;
  }
};

// One memory-mapped safetensors file. Move-only.
class SafetensorsFile {
 public:
  SafetensorsFile() = default;
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // Maps `path` and checks its header: kInvalidArgument for a missing or
  // truncated file and a bad header, kNotSupported for a dtype other than
  // F32/F16/BF16. `detail` says which file and tensor. `resident`: read the
  // whole file in now (MAP_POPULATE), so later accesses never wait for the
  // disk; otherwise pages are read on first touch.
  static Status open(const std::filesystem::path& path, SafetensorsFile* out,
                     std::string* detail = nullptr, bool resident = false);

  const std::map<std::string, TensorRef>& tensors() const noexcept { return tensors_; }
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  void unmap() noexcept;
  std::filesystem::path path_;
  void* map_ = nullptr;
  std::size_t map_bytes_ = 0;
  std::map<std::string, TensorRef> tensors_;
};

// The tensors of a model folder.
class TensorStore {
 public:
  // Opens <dir>/model.safetensors.index.json (sharded) if present, else
  // <dir>/model.safetensors. Every shard named by the index must open, and
  // every tensor of the index must be in its shard. `resident`: as for
  // SafetensorsFile::open, for every shard.
  static Status open(const std::filesystem::path& dir, TensorStore* out,
                     std::string* detail = nullptr, bool resident = false);

  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // The tensor `name` with exactly `shape`; kInvalidArgument (with detail)
  // when it is missing or has another shape.
  Status get(const std::string& name, std::span<const std::int64_t> shape, TensorRef* out,
             std::string* detail = nullptr) const;
  std::size_t num_tensors() const noexcept { return index_.size(); }
  std::size_t num_files() const noexcept { return files_.size(); }

 private:
  std::vector<SafetensorsFile> files_;
  std::map<std::string, const TensorRef*> index_;
};

// A tensor to write: numel elements of `dtype`, from `data`, or (when data is
// null) produced by `fill` into a buffer when the writer reaches the tensor,
// so that a large model never has to be held in memory whole.
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kBF16;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
  std::function<void(void* dst)> fill;
};

// Writes a safetensors file (header padded to 8 bytes, tensors in order).
Status write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                         std::string* detail = nullptr);

}  // namespace hattn::model
