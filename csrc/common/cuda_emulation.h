// The CUDA executor: CUDA's execution model on the CPU, for the tests. The .cu files compile a second
// time with the host compiler (-x c++ -DLF_CUDA_EMULATION -Dlossforge=lossforge_emulated), against this
// header instead of cuda_runtime.h, into a test-only module whose ops run the CUDA kernels and their host
// code on CPU tensors (torch.ops.lossforge_emulated.*). The runtime is common/cuda_emulation.cpp; what it
// checks and what it cannot see is in CONTRIBUTING.md ("The CUDA executor").
//
// Model: blocks run one at a time; the threads of a block are fibers that switch only at __syncthreads,
// __syncwarp and the shuffles, in an order chosen per run (forward, reverse, seeded shuffle, one warp
// ahead of the others), so a kernel whose result depends on that order has a race or a missing barrier.
// Shared memory is per block, filled with 0xff bytes (NaN, -1) when a block starts using it.
#pragma once

#if !defined(LF_CUDA_EMULATION) || defined(__CUDACC__)
#error "cuda_emulation.h is only for the host-compiler build of the .cu files (LF_CUDA_EMULATION)"
#endif

#include <math.h>  // the float overloads of ::log, ::exp, ... in the global namespace, as CUDA has them

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include <torch/csrc/stable/library.h>

// ---- qualifiers ------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Shared memory is declared with LF_SHARED / LF_DYNAMIC_SHARED (common/cuda_utils.cuh), so that the
// executor knows each array's size (the 48 KB limit) and can poison it per block.
#define __shared__ static_assert(false, "declare shared memory with LF_SHARED(type, name) or LF_DYNAMIC_SHARED")

// ---- the runtime API the host code uses -------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
// ---- built-in variables ------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Set by the executor for the running thread (fiber) and block.
extern uint3 threadIdx __attribute__((visibility("hidden")));
extern uint3 blockIdx __attribute__((visibility("hidden")));
extern dim3 blockDim __attribute__((visibility("hidden")));
extern dim3 gridDim __attribute__((visibility("hidden")));
constexpr int warpSize = 32;

// ---- the runtime's entry points (common/cuda_emulation.cpp) ----------------------------------------------
namespace lf_emu {

enum WarpOp : int { kSyncWarp, kShflIdx, kShflUp, kShflDown, kShflXor };

struct KernelRecord;
KernelRecord* register_kernel(const char* pretty_name, const void* fn);
void run_grid(KernelRecord* kernel, dim3 grid, dim3 block, size_t dynamic_shared, void (*thread)(void*), void* params);
void sync_block(const char* file, int line);
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);
void* dynamic_shared();
void* static_shared(void* storage, size_t bytes, const char* file, int line);
int func_set_attribute(const void* fn, int attribute, int value);

// A kernel instantiation's name, from the compiler: "... [with auto K = ns::kernel<float>]".
template <auto K>
const char* pretty_name() {
  return __PRETTY_FUNCTION__;
}

// Every kernel instantiation that the host code can launch registers itself when the module loads, so
// that the tests can require each one to have been launched.
template <auto K>
struct Kernel {
  static KernelRecord* const record;
};
template <auto K>
KernelRecord* const Kernel<K>::record = register_kernel(pretty_name<K>(), reinterpret_cast<const void*>(K));

template <typename F>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using type = std::tuple<std::decay_t<P>...>;
};

// launch<kernel>(grid, block, dynamic shared bytes, stream, args...): the executor's <<<>>>. The arguments
// are converted to the kernel's parameter types once, as a CUDA launch copies them; every thread then
// gets its own copies.
template <auto K, typename... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, cudaStream_t, Args&&... args) {
  using Params = typename KernelParams<decltype(K)>::type;
  Params params(std::forward<Args>(args)...);
  run_grid(Kernel<K>::record, grid, block, dynamic_shared_bytes,
           [](void* p) { std::apply(K, *static_cast<Params*>(p)); }, &params);
}

template <typename T>
T& shared_variable(T& storage, const char* file, int line) {
  return *static_cast<T*>(static_shared(&storage, sizeof(T), file, line));
}

// One emulated device: nothing to select.
struct DeviceGuard {
  explicit DeviceGuard(int) {}
};

template <typename T>
constexpr bool has_atomic_add = std::is_same_v<T, int> || std::is_same_v<T, unsigned int> ||
                                std::is_same_v<T, unsigned long long> || std::is_same_v<T, float> ||
                                std::is_same_v<T, double>;

}  // namespace lf_emu

// Shared memory: a static array of the function (blocks run one at a time) registered with the block.
#define LF_SHARED(type, name)                                          \
  static ::lf_emu::shared_type<type> lf_shared_storage_##name;         \
  auto& name = ::lf_emu::shared_variable(lf_shared_storage_##name, __FILE__, __LINE__)
#define LF_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::lf_emu::dynamic_shared())
namespace lf_emu {
template <typename T>
using shared_type = T;
}

// ---- synchronisation and shuffles ----------------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  lf_emu::sync_block(file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  lf_emu::warp_op(lf_emu::kSyncWarp, mask, 0, 0, warpSize, file, line);
}

namespace lf_emu {
template <typename T>
T shuffle(WarpOp op, unsigned mask, T var, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_op(op, mask, bits, arg, width, file, line);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}
}  // namespace lf_emu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return lf_emu::shuffle(lf_emu::kShflIdx, mask, var, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return lf_emu::shuffle(lf_emu::kShflUp, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return lf_emu::shuffle(lf_emu::kShflDown, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return lf_emu::shuffle(lf_emu::kShflXor, mask, var, lane_mask, width, file, line);
}

// ---- atomics (a fiber is never interrupted between the read and the write) -----------------------------
inline int atomicAdd(int* a, int v) { const int o = *a; *a = o + v; return o; }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { const unsigned int o = *a; *a = o + v; return o; }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  const unsigned long long o = *a;
  *a = o + v;
  return o;
}
inline float atomicAdd(float* a, float v) { const float o = *a; *a = o + v; return o; }
inline double atomicAdd(double* a, double v) { const double o = *a; *a = o + v; return o; }
template <typename T, typename V, std::enable_if_t<!lf_emu::has_atomic_add<T>, int> = 0>
T atomicAdd(T*, V) {
  static_assert(sizeof(T) == 0, "CUDA has no atomicAdd for this type");
  return T();
}

// ---- math: CUDA's overloads -------------------------------------------------------------------------------
// min/max of floating values are fminf/fmin (a NaN operand loses), of integers the usual comparison.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
// Intrinsics with one rounding per operation (the host compiler never contracts: -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }

namespace lf_emu {
cudaError_t device_attribute(int* value, cudaDeviceAttr attribute);
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }  // the executor raises at the launch instead
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument"; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  return lf_emu::device_attribute(value, attribute);
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attribute, int value) {
  return static_cast<cudaError_t>(lf_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attribute, value));
}

// ---- registration: the CUDA implementations register for CPU tensors --------------------------------------
// (the namespace is renamed on the command line: -Dlossforge=lossforge_emulated)
#undef STABLE_TORCH_LIBRARY_IMPL
#define STABLE_TORCH_LIBRARY_IMPL(ns, k, m) _STABLE_TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)
