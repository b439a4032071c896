// Shared helpers for every family: input checks, dtype dispatch, shape helpers.
// Header-only and stable-ABI only (no ATen), so it compiles in seconds in both g++ and nvcc.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <string>

namespace lossforge {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using BFloat16 = c10::BFloat16;
using Half = c10::Half;

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Half: return "float16";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Short: return "int16";
    case ScalarType::Char: return "int8";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Bool: return "bool";
    case ScalarType::ComplexHalf: return "complex32";
    case ScalarType::ComplexFloat: return "complex64";
    case ScalarType::ComplexDouble: return "complex128";
    default: return c10::toString(t);  // torch's C++ name (e.g. Float8_e4m3fn)
  }
}

// C++-side checks. Python validates first with friendlier exceptions; these keep the op safe when it
// is called directly through torch.ops.lossforge.*.
inline void check_contiguous(const Tensor& t, const char* op, const char* arg) {
  STD_TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous");
}

inline void check_dtype(const Tensor& t, ScalarType want, const char* op, const char* arg) {
  STD_TORCH_CHECK(t.scalar_type() == want, op, ": ", arg, " must be ", dtype_name(want), ", got ",
                  dtype_name(t.scalar_type()));
}

inline void check_floating(const Tensor& t, const char* op, const char* arg) {
  auto s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::Double || s == ScalarType::BFloat16 ||
                      s == ScalarType::Half,
                  op, ": ", arg, " must be float32, float64, bfloat16 or float16, got ", dtype_name(s));
}

inline void check_same_device(const Tensor& a, const Tensor& b, const char* op, const char* arg_a,
                              const char* arg_b) {
  // device type (CPU, CUDA, or another: meta) and index
  STD_TORCH_CHECK(a.is_cuda() == b.is_cuda() && a.is_cpu() == b.is_cpu() && a.get_device_index() == b.get_device_index(),
                  op, ": ", arg_a, " and ", arg_b, " must be on the same device");
}

inline void check_device(const Tensor& t, bool want_cuda, const char* op, const char* arg) {
#if defined(LF_CUDA_EMULATION)
  // the CUDA executor (tests only) runs the CUDA implementations on CPU tensors
  (void)want_cuda;
  STD_TORCH_CHECK(t.is_cpu(), op, ": ", arg, " must be a CPU tensor (emulated CUDA)");
#else
  STD_TORCH_CHECK(want_cuda ? t.is_cuda() : t.is_cpu(), op, ": ", arg, " must be a ", want_cuda ? "CUDA" : "CPU",
                  " tensor");
#endif
}

// A contiguous tensor seen as [outer, size(dim), inner]: the layout every "reduce over one dimension"
// kernel works on without moving the dimension (no copy for F.cross_entropy's [N, C, d1, ...]).
struct DimSplit {
  int64_t outer, size, inner;
  int64_t rows() const { return outer * inner; }
};

inline int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op) {
  STD_TORCH_CHECK(ndim > 0, op, ": expected a tensor with at least one dimension");
  STD_TORCH_CHECK(dim >= -ndim && dim < ndim, op, ": dim ", dim, " is out of range for a ", ndim,
                  "-d tensor");
  return dim < 0 ? dim + ndim : dim;
}

inline DimSplit split_at_dim(const Tensor& t, int64_t dim, const char* op) {
  const int64_t nd = t.dim();
  dim = wrap_dim(dim, nd, op);
  DimSplit s{1, t.size(dim), 1};
  for (int64_t i = 0; i < dim; ++i) s.outer *= t.size(i);
  for (int64_t i = dim + 1; i < nd; ++i) s.inner *= t.size(i);
  return s;
}

}  // namespace lossforge

// Dispatch over the four floating dtypes; the body sees `scalar_t`.
#define LF_DISPATCH_FLOATING(STYPE, OPNAME, ...)                                                  \
  [&] {                                                                                           \
    switch (STYPE) {                                                                              \
      case ::lossforge::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }       \
      case ::lossforge::ScalarType::Double: { using scalar_t = double; return __VA_ARGS__(); }     \
      case ::lossforge::ScalarType::BFloat16: {                                                   \
        using scalar_t = ::lossforge::BFloat16; return __VA_ARGS__(); }                           \
      case ::lossforge::ScalarType::Half: { using scalar_t = ::lossforge::Half; return __VA_ARGS__(); } \
      default:                                                                                    \
        STD_TORCH_CHECK(false, OPNAME, ": unsupported dtype ", ::lossforge::dtype_name(STYPE));   \
    }                                                                                             \
  }()

// Dispatch over float32 / float64 only (kernels whose math needs no reduced-precision storage).
#define LF_DISPATCH_FLOAT_DOUBLE(STYPE, OPNAME, ...)                                              \
  [&] {                                                                                           \
    switch (STYPE) {                                                                              \
      case ::lossforge::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }       \
      case ::lossforge::ScalarType::Double: { using scalar_t = double; return __VA_ARGS__(); }     \
      default:                                                                                    \
        STD_TORCH_CHECK(false, OPNAME, ": unsupported dtype ", ::lossforge::dtype_name(STYPE),    \
                        " (float32 or float64 expected)");                                        \
    }                                                                                             \
  }()
