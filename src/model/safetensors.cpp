#include "hattn/model/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

namespace hattn::model {
namespace {

using nlohmann::json;

void set_detail(std::string* detail, std::string text) {
  if (detail) *detail = std::move(text);
}

bool dtype_from_name(const std::string& s, DType* t) {
  if (s == "F32")
    *t = DType::kF32;
  else if (s == "F16")
    *t = DType::kF16;
  else if (s == "BF16")
    *t = DType::kBF16;
  else
    return false;
  return true;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
  }
  return "?";
}

std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace

SafetensorsFile::~SafetensorsFile() { unmap(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept
    : path_(std::move(o.path_)),
      map_(std::exchange(o.map_, nullptr)),
      map_bytes_(std::exchange(o.map_bytes_, 0)),
      tensors_(std::move(o.tensors_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    unmap();
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_bytes_ = std::exchange(o.map_bytes_, 0);
    tensors_ = std::move(o.tensors_);
  }
  return *this;
}

void SafetensorsFile::unmap() noexcept {
  if (map_) munmap(map_, map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
}

Status SafetensorsFile::open(const std::filesystem::path& path, SafetensorsFile* out,
                             std::string* detail, bool resident) {
  const std::string name = path.string();
  const Status bad_file(StatusCode::kInvalidArgument, "bad safetensors file");
  const int fd = ::open(name.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    set_detail(detail, "cannot open " + name + ": " + std::strerror(errno));
    return {StatusCode::kInvalidArgument, "cannot open safetensors file"};
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || st.st_size < 8) {
    ::close(fd);
    set_detail(detail, name + ": truncated (shorter than the 8-byte header length)");
    return bad_file;
  }
  const auto bytes = static_cast<std::size_t>(st.st_size);
  int flags = MAP_PRIVATE;
#if defined(MAP_POPULATE)
  if (resident) flags |= MAP_POPULATE;
#endif
  void* map = mmap(nullptr, bytes, PROT_READ, flags, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) {
    set_detail(detail, "cannot map " + name + ": " + std::strerror(errno));
    return {StatusCode::kOutOfMemory, "cannot map safetensors file"};
  }
  SafetensorsFile file;
  file.path_ = path;
  file.map_ = map;
  file.map_bytes_ = bytes;

  const auto* base = static_cast<const unsigned char*>(map);
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  if (header_len > bytes - 8) {
    set_detail(detail, name + ": truncated or bad header (header length " +
                           std::to_string(header_len) + " > file size " + std::to_string(bytes) +
                           ")");
    return bad_file;
  }
  const char* header = reinterpret_cast<const char*>(base + 8);
  const json j = json::parse(header, header + header_len, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    set_detail(detail, name + ": bad header (not a JSON object)");
    return bad_file;
  }
  const unsigned char* data = base + 8 + header_len;
  const std::uint64_t data_bytes = bytes - 8 - header_len;
  for (const auto& [key, value] : j.items()) {
    if (key == "__metadata__") continue;
    const auto where = name + ": tensor \"" + key + "\": ";
    if (!value.is_object() || !value.contains("dtype") || !value.contains("shape") ||
        !value.contains("data_offsets") || !value["dtype"].is_string() ||
        !value["shape"].is_array() || !value["data_offsets"].is_array() ||
        value["data_offsets"].size() != 2) {
      set_detail(detail, where + "bad header entry");
      return bad_file;
    }
    TensorRef t;
    const std::string dt = value["dtype"].get<std::string>();
    if (!dtype_from_name(dt, &t.dtype)) {
      set_detail(detail, where + "unsupported dtype " + dt + " (F32, F16, BF16 are)");
      return {StatusCode::kNotSupported, "unsupported tensor dtype"};
    }
    std::uint64_t numel = 1;
    for (const auto& d : value["shape"]) {
      if (!d.is_number_unsigned() || d.get<std::uint64_t>() > (std::uint64_t{1} << 40)) {
        set_detail(detail, where + "bad shape");
        return bad_file;
      }
      t.shape.push_back(d.get<std::int64_t>());
      numel *= d.get<std::uint64_t>();
      if (numel > (std::uint64_t{1} << 40)) {
        set_detail(detail, where + "bad shape");
        return bad_file;
      }
    }
    const auto& off = value["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      set_detail(detail, where + "bad data_offsets");
      return bad_file;
    }
    const auto begin = off[0].get<std::uint64_t>(), end = off[1].get<std::uint64_t>();
    if (begin > end || end - begin != numel * size_of(t.dtype)) {
      set_detail(detail, where + "data_offsets do not match shape " + shape_string(t.shape) +
                             " and dtype " + dt);
      return bad_file;
    }
    if (end > data_bytes) {
      set_detail(detail, where + "truncated file: data ends at byte " + std::to_string(end) +
                             " of " + std::to_string(data_bytes));
      return bad_file;
    }
    t.data = data + begin;
    file.tensors_.emplace(key, std::move(t));
  }
  *out = std::move(file);
  return Status::ok();
}

Status TensorStore::open(const std::filesystem::path& dir, TensorStore* out, std::string* detail,
                         bool resident) {
  TensorStore store;
  const auto index_path = dir / "model.safetensors.index.json";
  const auto single_path = dir / "model.safetensors";
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  std::error_code ec;
  if (std::filesystem::exists(index_path, ec)) {
    std::ifstream in(index_path, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    const std::string s = text.str();
    const json j = json::parse(s, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") ||
        !j["weight_map"].is_object()) {
      set_detail(detail, index_path.string() + ": not valid JSON with a \"weight_map\" object");
      return {StatusCode::kInvalidArgument, "bad safetensors index"};
    }
    std::map<std::string, std::size_t> shard_of_file;
    for (const auto& [tensor, file] : j["weight_map"].items()) {
      if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos) {
        set_detail(detail, index_path.string() + ": bad shard name for \"" + tensor + "\"");
        return {StatusCode::kInvalidArgument, "bad safetensors index"};
      }
      weight_map[tensor] = file.get<std::string>();
      shard_of_file.emplace(file.get<std::string>(), 0);
    }
    for (auto& [file, idx] : shard_of_file) {
      SafetensorsFile f;
      HATTN_RETURN_IF_ERROR(SafetensorsFile::open(dir / file, &f, detail, resident));
      idx = store.files_.size();
      store.files_.push_back(std::move(f));
    }
    for (const auto& [tensor, file] : weight_map) {
      const auto& tensors = store.files_[shard_of_file[file]].tensors();
      const auto it = tensors.find(tensor);
      if (it == tensors.end()) {
        set_detail(detail, index_path.string() + ": tensor \"" + tensor + "\" is not in " + file);
        return {StatusCode::kInvalidArgument, "missing tensor"};
      }
      store.index_[tensor] = &it->second;
    }
  } else if (std::filesystem::exists(single_path, ec)) {
    SafetensorsFile f;
    HATTN_RETURN_IF_ERROR(SafetensorsFile::open(single_path, &f, detail, resident));
    store.files_.push_back(std::move(f));
    for (const auto& [name, t] : store.files_.back().tensors()) store.index_[name] = &t;
  } else {
    set_detail(detail, "no model.safetensors or model.safetensors.index.json in " + dir.string());
    return {StatusCode::kInvalidArgument, "no safetensors weights in the model folder"};
  }
  *out = std::move(store);
  return Status::ok();
}

Status TensorStore::get(const std::string& name, std::span<const std::int64_t> shape,
                        TensorRef* out, std::string* detail) const {
  const auto it = index_.find(name);
  if (it == index_.end()) {
    set_detail(detail, "missing tensor \"" + name + "\"");
    return {StatusCode::kInvalidArgument, "missing tensor"};
  }
  const TensorRef& t = *it->second;
  if (!std::equal(t.shape.begin(), t.shape.end(), shape.begin(), shape.end())) {
    set_detail(detail, "tensor \"" + name + "\" has shape " + shape_string(t.shape) +
                           ", expected " + shape_string(shape));
    return {StatusCode::kInvalidArgument, "tensor has the wrong shape"};
  }
  *out = t;
  return Status::ok();
}

Status write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                         std::string* detail) {
  json header = json::object();
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    std::uint64_t numel = 1;
    for (std::int64_t d : t.shape) numel *= static_cast<std::uint64_t>(d);
    const std::uint64_t bytes = numel * size_of(t.dtype);
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string text = header.dump();
  while ((text.size() + 8) % 8 != 0) text.push_back(' ');  // data starts 8-byte aligned

  const auto fail = [&] {
    set_detail(detail, "cannot write " + path.string() + ": " + std::strerror(errno));
    return Status(StatusCode::kInvalidArgument, "cannot write safetensors file");
  };
  std::FILE* f = std::fopen(path.string().c_str(), "wb");
  if (!f) return fail();
  unsigned char len[8];
  std::uint64_t n = text.size();
  for (unsigned char& b : len) {
    b = static_cast<unsigned char>(n & 0xff);
    n >>= 8;
  }
  bool ok =
      std::fwrite(len, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  std::vector<unsigned char> buffer;
  for (const auto& t : tensors) {
    if (!ok) break;
    std::uint64_t numel = 1;
    for (std::int64_t d : t.shape) numel *= static_cast<std::uint64_t>(d);
    const std::size_t bytes = numel * size_of(t.dtype);
    const void* src = t.data;
    if (!src) {
      buffer.resize(bytes);
      if (t.fill)
        t.fill(buffer.data());
      else
        std::fill(buffer.begin(), buffer.end(), 0);
      src = buffer.data();
    }
    ok = std::fwrite(src, 1, bytes, f) == bytes;
  }
  if (std::fclose(f) != 0) ok = false;
  if (!ok) return fail();
  return Status::ok();
}

}  // namespace hattn::model
