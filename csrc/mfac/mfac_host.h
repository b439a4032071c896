// M-FAC host-side helpers shared by mfac_cpu.cpp and mfac_cuda.cu: argument checks (Python validates
// first with friendlier errors; these keep direct torch.ops calls safe) and the column chunks of a
// parameter list.
#pragma once

#include <algorithm>
#include <vector>

#include "common/common.h"
#include "mfac/mfac.h"

namespace lossforge {
namespace mfac {

// ---------------------------------------------------------------------------------------------
// Chunks of the column range: a chunk lies inside one tensor of a list.

struct Chunk {
  int64_t tensor, start, len, col;
};

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& sizes) {
  std::vector<Chunk> chunks;
  int64_t col = 0;
  for (size_t t = 0; t < sizes.size(); ++t) {
    for (int64_t s = 0; s < sizes[t]; s += kChunk)
      chunks.push_back({static_cast<int64_t>(t), s, std::min(kChunk, sizes[t] - s), col + s});
    col += sizes[t];
  }
  return chunks;
}

// ---------------------------------------------------------------------------------------------
// Checks.

inline ScalarType compute_dtype(ScalarType storage) {
  return storage == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline ScalarType check_buffer(const Tensor& G, bool cuda, const char* op) {
  STD_TORCH_CHECK(G.dim() == 2, op, ": G must be 2-D [m, d], got ", G.dim(), "-D");
  check_device(G, cuda, op, "G");
  const ScalarType s = G.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::Double || s == ScalarType::BFloat16, op,
                  ": G must be float32, float64 or bfloat16, got ", dtype_name(s));
  STD_TORCH_CHECK(G.size(1) <= 1 || G.stride(1) == 1, op, ": G's rows must be contiguous (stride(1) == 1)");
  STD_TORCH_CHECK(G.size(0) <= 1 || G.stride(0) >= G.size(1), op, ": G's row stride must be at least d");
  return compute_dtype(s);
}

inline void check_vector_tensor(const Tensor& t, bool cuda, ScalarType want, const char* op, const char* arg) {
  check_device(t, cuda, op, arg);
  check_dtype(t, want, op, arg);
  check_contiguous(t, op, arg);
}

// A list of tensors whose sizes add up to d (the parameter list of the optimizer, or one tensor).
inline std::vector<int64_t> check_list(const std::vector<Tensor>& xs, bool cuda, ScalarType want, int64_t d,
                                       const char* op, const char* arg) {
  std::vector<int64_t> sizes;
  int64_t total = 0;
  for (const Tensor& t : xs) {
    check_vector_tensor(t, cuda, want, op, arg);
    sizes.push_back(t.numel());
    total += t.numel();
  }
  STD_TORCH_CHECK(total == d, op, ": the tensors of ", arg, " have ", total, " elements in all, expected d = ", d);
  return sizes;
}

inline void check_params_like(const std::vector<Tensor>& ps, const std::vector<int64_t>& sizes, bool cuda,
                              ScalarType want, const char* op, const char* arg) {
  STD_TORCH_CHECK(ps.size() == sizes.size(), op, ": ", arg, " must have one tensor per gradient (", sizes.size(),
                  "), got ", ps.size());
  for (size_t t = 0; t < ps.size(); ++t) {
    check_vector_tensor(ps[t], cuda, want, op, arg);
    STD_TORCH_CHECK(ps[t].numel() == sizes[t], op, ": ", arg, "[", t, "] has ", ps[t].numel(),
                    " elements, expected ", sizes[t]);
  }
}

// [V, d] or [d] -> (V, is_batched)
inline int64_t vector_count(const Tensor& x, int64_t d, const char* op, const char* arg) {
  STD_TORCH_CHECK(x.dim() == 1 || x.dim() == 2, op, ": ", arg, " must be [d] or [k, d], got ", x.dim(), "-D");
  STD_TORCH_CHECK(x.size(x.dim() - 1) == d, op, ": ", arg, " must have d = ", d, " columns, got ",
                  x.size(x.dim() - 1));
  return x.dim() == 2 ? x.size(0) : 1;
}

}  // namespace mfac
}  // namespace lossforge
