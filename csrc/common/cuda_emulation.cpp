// The CUDA executor's runtime (see common/cuda_emulation.h): fibers, the block scheduler, the launch and
// synchronisation checks, the per-kernel launch counts, and a small C interface for the tests
// (tests/cuda_executor.py). Test-only: never part of the wheel. x86-64 Linux only (the context switch).
#include "common/cuda_emulation.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LF_EMU_ASAN 1
#else
#define LF_EMU_ASAN 0
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

// ---- context switch (System V x86-64): callee-saved registers, MXCSR and the x87 control word ----------
extern "C" void lf_emu_switch(void** save_sp, void* load_sp) __attribute__((visibility("hidden")));
extern "C" void lf_emu_fiber_start() __attribute__((visibility("hidden")));
extern "C" [[noreturn]] void lf_emu_fiber_main() __attribute__((visibility("hidden")));
asm(R"(
  .text
  .p2align 4
  .globl lf_emu_switch
  .hidden lf_emu_switch
  .type lf_emu_switch, @function
lf_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lf_emu_switch, .-lf_emu_switch

  .p2align 4
  .globl lf_emu_fiber_start
  .hidden lf_emu_fiber_start
  .type lf_emu_fiber_start, @function
lf_emu_fiber_start:
  call lf_emu_fiber_main
  ud2
  .size lf_emu_fiber_start, .-lf_emu_fiber_start
)");

namespace lf_emu {
namespace {

// sm_90 (H100) limits.
constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned long long kMaxGridDim[3] = {2147483647ull, 65535ull, 65535ull};
constexpr size_t kDefaultSharedLimit = 48 * 1024;  // static + dynamic, without the opt-in attribute
constexpr size_t kOptinSharedLimit = 232448;       // cudaDevAttrMaxSharedMemoryPerBlockOptin (227 KB)
constexpr int kMultiProcessors = 132;
constexpr unsigned char kPoison = 0xff;  // NaN in every float type, -1 in every integer type

constexpr size_t kStackBytes = LF_EMU_ASAN ? (512 << 10) : (128 << 10);

enum Order : int { kForward, kReverse, kShuffle, kWarpAhead, kOrders };
const char* const kOrderNames[kOrders] = {"forward", "reverse", "shuffle", "warp_ahead"};

enum class State : unsigned char { kReady, kBarrier, kWarp, kDone, kFailed };

struct Fiber {
  void* sp = nullptr;
  State state = State::kReady;
  const char* file = nullptr;  // where it waits
  int line = 0;
  WarpOp op = kSyncWarp;
  unsigned mask = 0;
  int arg = 0, width = 0;
  uint64_t bits = 0;  // the value it offers to a shuffle, then the value it receives
  void* asan_fake_stack = nullptr;
};

struct SharedArray {
  void* storage;
  size_t bytes;
};

std::string short_file(const char* file) {
  std::string f = file ? file : "?";  // relative to the repository: csrc/... or tests/...
  for (const char* top : {"/csrc/", "/tests/"}) {
    const size_t at = f.rfind(top);
    if (at != std::string::npos) return f.substr(at + 1);
  }
  return f;
}

std::string where(const char* file, int line) { return short_file(file) + ":" + std::to_string(line); }

std::string dim_text(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// "first-last" runs of a sorted list of thread indices
std::string thread_list(const std::vector<int>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void shuffle_in_place(std::vector<int>& v, uint64_t& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[splitmix(rng) % i]);
}

}  // namespace

struct KernelRecord {
  std::string name;  // e.g. "stablemax::stablemax_kernel<1, float>"
  const void* fn;
  size_t max_dynamic_shared = kDefaultSharedLimit;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  bool opted_in = false;
  unsigned long long launches[kOrders] = {};
};

namespace {

std::vector<KernelRecord*>& registry() {
  static std::vector<KernelRecord*> r;
  return r;
}

// One launch at a time in the whole process (the threads of a block share these globals).
struct Executor {
  std::mutex mutex;
  Order order = kForward;
  uint64_t seed = 0;

  // fiber stacks, reused across launches
  unsigned char* stacks = nullptr;
  size_t stack_count = 0;
  std::vector<Fiber> fibers;
  void* main_sp = nullptr;
  void* main_fake_stack = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  int current = -1;
  bool stacks_dirty = false;  // a launch was abandoned with fibers inside their kernels

  // the launch
  KernelRecord* kernel = nullptr;
  dim3 grid, block;
  int threads = 0;
  size_t dynamic_bytes = 0;
  void* dynamic = nullptr;
  std::vector<SharedArray> statics;  // this block's static shared arrays
  size_t static_bytes = 0;
  void (*thread_fn)(void*) = nullptr;
  void* params = nullptr;
  std::string error;  // set by a failing fiber
  uint64_t launch_serial = 0;
};

Executor& ex() {
  static Executor e;
  return e;
}

[[noreturn]] void raise(const std::string& what) {
  Executor& e = ex();
  throw std::runtime_error("CUDA executor: " + what + " [kernel " + (e.kernel ? e.kernel->name : "?") + ", grid " +
                           dim_text(e.grid) + ", block " + dim_text(e.block) + ", dynamic shared " +
                           std::to_string(e.dynamic_bytes) + " B, order " + kOrderNames[e.order] + "]");
}

unsigned char* stack_of(int i) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return ex().stacks + static_cast<size_t>(i) * (kStackBytes + page) + page;  // above its guard page
}

void ensure_stacks(int n) {
  Executor& e = ex();
  if (static_cast<size_t>(n) <= e.stack_count) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t each = kStackBytes + page;
  if (e.stacks) munmap(e.stacks, e.stack_count * each);
  void* p = mmap(nullptr, n * each, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("CUDA executor: cannot map the fiber stacks");
  e.stacks = static_cast<unsigned char*>(p);
  e.stack_count = n;
  for (int i = 0; i < n; ++i) mprotect(e.stacks + i * each, page, PROT_NONE);  // a stack overflow faults
}

// A fresh fiber whose first switch "returns" into lf_emu_fiber_start with a 16-byte aligned stack.
void init_fiber(int i) {
  Fiber& f = ex().fibers[i];
  f = Fiber{};
  unsigned char* bottom = stack_of(i);
  uintptr_t top = (reinterpret_cast<uintptr_t>(bottom) + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 16 - 64);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memset(sp, 0, 64);
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(sp) + 4, &fpucw, 2);
  sp[7] = reinterpret_cast<uint64_t>(&lf_emu_fiber_start);
  f.sp = sp;
}

void set_thread_index(int tid) {
  const Executor& e = ex();
  threadIdx.x = tid % e.block.x;
  threadIdx.y = (tid / e.block.x) % e.block.y;
  threadIdx.z = tid / (e.block.x * e.block.y);
}

// Scheduler -> fiber i, until it waits, finishes or fails.
void resume(int i) {
  Executor& e = ex();
  e.current = i;
  set_thread_index(i);
#if LF_EMU_ASAN
  __sanitizer_start_switch_fiber(&e.main_fake_stack, stack_of(i), kStackBytes);
#endif
  lf_emu_switch(&e.main_sp, e.fibers[i].sp);
#if LF_EMU_ASAN
  __sanitizer_finish_switch_fiber(e.main_fake_stack, nullptr, nullptr);
#endif
  e.current = -1;
}

// Fiber -> scheduler. Returns when the scheduler resumes this fiber.
void yield(State s) {
  Executor& e = ex();
  Fiber& f = e.fibers[e.current];
  f.state = s;
#if LF_EMU_ASAN
  const bool final = s == State::kDone || s == State::kFailed;  // its fake stack is not needed again
  __sanitizer_start_switch_fiber(final ? nullptr : &f.asan_fake_stack, e.main_stack_bottom, e.main_stack_size);
#endif
  lf_emu_switch(&f.sp, e.main_sp);
#if LF_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &e.main_stack_bottom, &e.main_stack_size);
#endif
}

// A check that fails inside a thread: recorded, and the fiber never runs again.
[[noreturn]] void fail_in_thread(const std::string& what) {
  Executor& e = ex();
  if (e.error.empty()) e.error = what;
  yield(State::kFailed);
  std::abort();  // never resumed
}

Fiber& current_fiber() {
  Executor& e = ex();
  if (e.current < 0) throw std::runtime_error("CUDA executor: a device function was called outside a kernel");
  return e.fibers[e.current];
}

}  // namespace
}  // namespace lf_emu

extern "C" void lf_emu_fiber_main() {
  using namespace lf_emu;
  Executor& e = ex();
#if LF_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &e.main_stack_bottom, &e.main_stack_size);
#endif
  try {
    e.thread_fn(e.params);
  } catch (const std::exception& err) {
    fail_in_thread(std::string("a thread threw: ") + err.what());
  }
  yield(State::kDone);
  std::abort();  // a finished fiber is never resumed
}

namespace lf_emu {
namespace {

bool same_call(const Fiber& a, const Fiber& b) {
  return a.op == b.op && a.line == b.line && a.mask == b.mask && a.width == b.width &&
         (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case kSyncWarp: return "__syncwarp";
    case kShflIdx: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    default: return "__shfl_xor_sync";
  }
}

std::string state_text(const Fiber& f) {
  switch (f.state) {
    case State::kReady: return "running";
    case State::kDone: return "returned";
    case State::kFailed: return "failed";
    case State::kBarrier: return "waiting at __syncthreads at " + where(f.file, f.line);
    default: return std::string("at ") + op_name(f.op) + " at " + where(f.file, f.line);
  }
}

// The lane that lane `lane` reads in a shuffle, or -1 for its own value.
int source_lane(const Fiber& f, int lane) {
  const int w = f.width, base = lane & ~(w - 1), in = lane & (w - 1);
  switch (f.op) {
    case kShflIdx: return base + (f.arg & (w - 1));
    case kShflUp: return in - f.arg >= 0 ? lane - f.arg : -1;
    case kShflDown: return in + f.arg < w ? lane + f.arg : -1;
    case kShflXor: {
      const int src = lane ^ f.arg;
      return (src & ~(w - 1)) > base ? -1 : src;  // a later group: own value
    }
    default: return -1;
  }
}

// Completes the warp operations whose every named lane has arrived at the same call. Returns whether
// any thread became ready. Raises when a named lane can no longer arrive.
bool resolve_warps() {
  Executor& e = ex();
  bool woke = false;
  const int warps = (e.threads + 31) / 32;
  for (int w = 0; w < warps; ++w) {
    const int base = w * 32, lanes = std::min(32, e.threads - base);
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = e.fibers[base + l];
      if (f.state != State::kWarp) continue;
      bool complete = true;
      for (int k = 0; k < 32; ++k) {
        if (!(f.mask >> k & 1u)) continue;
        if (k >= lanes)
          raise(std::string(op_name(f.op)) + " at " + where(f.file, f.line) + ": its mask names lane " +
                std::to_string(k) + " of warp " + std::to_string(w) + ", which the block does not have");
        const Fiber& g = e.fibers[base + k];
        if (g.state == State::kReady) {  // not there yet
          complete = false;
          continue;
        }
        if (g.state != State::kWarp || !same_call(f, g))
          raise(std::string(op_name(f.op)) + " at " + where(f.file, f.line) + " in block " + dim_text(dim3(
                    blockIdx.x, blockIdx.y, blockIdx.z)) + ": thread " + std::to_string(base + l) +
                " waits for lane " + std::to_string(k) + " of its mask, which is " + state_text(g) +
                " (every lane the mask names must reach the same call)");
      }
      if (!complete) continue;
      uint64_t got[32];
      for (int k = 0; k < 32; ++k) {
        if (!(f.mask >> k & 1u)) continue;
        const Fiber& g = e.fibers[base + k];
        const int src = source_lane(g, k);
        if (src >= 0 && !(f.mask >> src & 1u))
          raise(std::string(op_name(f.op)) + " at " + where(f.file, f.line) + ": lane " + std::to_string(k) +
                " reads lane " + std::to_string(src) + ", which is not in the mask (undefined)");
        got[k] = src >= 0 ? e.fibers[base + src].bits : g.bits;
      }
      for (int k = 0; k < 32; ++k) {
        if (!(f.mask >> k & 1u)) continue;
        e.fibers[base + k].bits = got[k];
        e.fibers[base + k].state = State::kReady;
      }
      woke = true;
    }
  }
  return woke;
}

// Nothing is ready: either every live thread waits at the same __syncthreads (release them), or the block
// is finished, or some thread can never get past its barrier (raise).
bool release_barrier() {
  Executor& e = ex();
  std::vector<int> done, waiting;
  const Fiber* first = nullptr;
  for (int i = 0; i < e.threads; ++i) {
    const Fiber& f = e.fibers[i];
    if (f.state == State::kDone) {
      done.push_back(i);
    } else if (f.state == State::kBarrier) {
      waiting.push_back(i);
      if (!first) first = &f;
    } else {
      raise("thread " + std::to_string(i) + " is stuck " + state_text(f));
    }
  }
  if (waiting.empty()) return false;  // the block is finished
  for (int i : waiting) {
    const Fiber& f = e.fibers[i];
    if (f.line != first->line || std::strcmp(f.file, first->file) != 0)
      raise("__syncthreads diverged: thread " + std::to_string(waiting.front()) + " waits at " +
            where(first->file, first->line) + ", thread " + std::to_string(i) + " at " + where(f.file, f.line));
  }
  if (!done.empty())
    raise("__syncthreads at " + where(first->file, first->line) + " is not reached by every thread of block " +
          dim_text(dim3(blockIdx.x, blockIdx.y, blockIdx.z)) + ": threads " + thread_list(done) +
          " returned, threads " + thread_list(waiting) + " wait");
  for (int i : waiting) e.fibers[i].state = State::kReady;
  return true;
}

void check_error() {
  Executor& e = ex();
  if (!e.error.empty()) {
    const std::string msg = e.error;
    e.error.clear();
    raise(msg);
  }
}

void run_ready(const std::vector<int>& order) {
  Executor& e = ex();
  for (int i : order) {
    if (e.fibers[i].state != State::kReady) continue;
    resume(i);
    check_error();
  }
}

void run_block(uint64_t linear, uint64_t& rng) {
  Executor& e = ex();
  blockIdx.x = static_cast<unsigned>(linear % e.grid.x);
  blockIdx.y = static_cast<unsigned>(linear / e.grid.x % e.grid.y);
  blockIdx.z = static_cast<unsigned>(linear / (static_cast<uint64_t>(e.grid.x) * e.grid.y));
  e.statics.clear();
  e.static_bytes = 0;
  if (e.dynamic_bytes) std::memset(e.dynamic, kPoison, e.dynamic_bytes);
  for (int i = 0; i < e.threads; ++i) init_fiber(i);

  const int warps = (e.threads + 31) / 32;
  // the warp that runs ahead: the last one first (thread 0, which often writes a block's result, then runs
  // late), another for each block and seed
  const int ahead = warps - 1 - static_cast<int>((e.seed + linear) % warps);
  std::vector<int> order(e.threads), ahead_lanes, others;
  for (int i = 0; i < e.threads; ++i) order[i] = e.order == kReverse ? e.threads - 1 - i : i;
  for (int i = 0; i < e.threads; ++i) (i / 32 == ahead ? ahead_lanes : others).push_back(i);
  for (;;) {
    if (e.order == kWarpAhead) {
      // one warp runs as far as it can before any other thread moves
      do run_ready(ahead_lanes);
      while (resolve_warps() && std::any_of(ahead_lanes.begin(), ahead_lanes.end(), [&](int i) {
               return e.fibers[i].state == State::kReady;
             }));
      run_ready(others);
    } else {
      if (e.order == kShuffle) shuffle_in_place(order, rng);
      run_ready(order);
    }
    resolve_warps();
    bool any_ready = false;
    for (int i = 0; i < e.threads && !any_ready; ++i) any_ready = e.fibers[i].state == State::kReady;
    if (any_ready) continue;
    if (!release_barrier()) break;
  }
}

void check_launch(dim3 grid, dim3 block, size_t dynamic_bytes) {
  const unsigned b[3] = {block.x, block.y, block.z};
  const unsigned g[3] = {grid.x, grid.y, grid.z};
  const char* axis = "xyz";
  for (int k = 0; k < 3; ++k) {
    if (b[k] == 0 || b[k] > kMaxBlockDim[k])
      raise(std::string("invalid block: blockDim.") + axis[k] + " = " + std::to_string(b[k]) + " (allowed 1.." +
            std::to_string(kMaxBlockDim[k]) + ")");
    if (g[k] == 0 || g[k] > kMaxGridDim[k])
      raise(std::string("invalid grid: gridDim.") + axis[k] + " = " + std::to_string(g[k]) + " (allowed 1.." +
            std::to_string(kMaxGridDim[k]) + ")");
  }
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads > kMaxThreadsPerBlock)
    raise("a block of " + std::to_string(threads) + " threads (at most " + std::to_string(kMaxThreadsPerBlock) + ")");
  const KernelRecord* k = ex().kernel;
  if (dynamic_bytes > k->max_dynamic_shared)
    raise(std::to_string(dynamic_bytes) + " B of dynamic shared memory, over the kernel's limit of " +
          std::to_string(k->max_dynamic_shared) + " B" +
          (k->opted_in ? std::string(" (its cudaFuncAttributeMaxDynamicSharedMemorySize)")
                       : std::string(" (more needs cudaFuncSetAttribute(kernel, "
                                     "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))")));
}

}  // namespace

KernelRecord* register_kernel(const char* pretty_name, const void* fn) {
  // "... [with auto K = lossforge_emulated::stablemax::{anonymous}::stablemax_kernel<1, float>]"
  std::string name = pretty_name;
  const size_t at = name.find("K = ");
  if (at != std::string::npos) name = name.substr(at + 4, name.size() - at - 5);
  for (const char* drop : {"lossforge_emulated::", "{anonymous}::", "(anonymous namespace)::"}) {
    for (size_t p; (p = name.find(drop)) != std::string::npos;) name.erase(p, std::strlen(drop));
  }
  auto* r = new KernelRecord{name, fn};
  registry().push_back(r);
  return r;
}

void run_grid(KernelRecord* kernel, dim3 grid, dim3 block, size_t dynamic_bytes, void (*thread)(void*), void* params) {
  Executor& e = ex();
  std::lock_guard<std::mutex> lock(e.mutex);
  e.kernel = kernel;
  e.grid = grid;
  e.block = block;
  e.dynamic_bytes = dynamic_bytes;
  e.error.clear();
  check_launch(grid, block, dynamic_bytes);
  kernel->launches[e.order] += 1;
  e.threads = static_cast<int>(block.x * block.y * block.z);
  ensure_stacks(e.threads);
#if LF_EMU_ASAN
  if (e.stacks_dirty)  // the abandoned fibers' frames are still poisoned: the new fibers' frames differ
    for (size_t i = 0; i < e.stack_count; ++i)
      __asan_unpoison_memory_region(stack_of(static_cast<int>(i)), kStackBytes);
#endif
  e.stacks_dirty = true;  // until every block has finished
  e.fibers.assign(e.threads, Fiber{});
  gridDim = grid;
  blockDim = block;
  e.thread_fn = thread;
  e.params = params;
  // exactly the requested size, so that AddressSanitizer sees a read past it
  std::unique_ptr<unsigned char, decltype(&std::free)> dyn(
      static_cast<unsigned char*>(std::malloc(std::max<size_t>(dynamic_bytes, 1))), &std::free);
  e.dynamic = dyn.get();
  uint64_t rng = e.seed ^ (0x5bd1e995ull * ++e.launch_serial);
  const uint64_t blocks = 1ull * grid.x * grid.y * grid.z;
  std::vector<uint64_t> block_order;
  if (e.order == kShuffle) {
    block_order.resize(blocks);
    for (uint64_t i = 0; i < blocks; ++i) block_order[i] = i;
    for (uint64_t i = blocks; i > 1; --i) std::swap(block_order[i - 1], block_order[splitmix(rng) % i]);
  }
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t linear = e.order == kShuffle ? block_order[i] : e.order == kReverse ? blocks - 1 - i : i;
    run_block(linear, rng);
  }
  e.dynamic = nullptr;
  e.stacks_dirty = false;
}

void sync_block(const char* file, int line) {
  Fiber& f = current_fiber();
  f.file = file;
  f.line = line;
  yield(State::kBarrier);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Executor& e = ex();
  Fiber& f = current_fiber();
  const int lane = e.current % 32;
  if (!(mask >> lane & 1u))
    fail_in_thread(std::string(op_name(op)) + " at " + where(file, line) + ": thread " + std::to_string(e.current) +
                   " calls it with mask 0x" + [&] {
                     char b[16];
                     std::snprintf(b, sizeof b, "%08x", mask);
                     return std::string(b);
                   }() + ", which does not name its own lane " + std::to_string(lane));
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail_in_thread(std::string(op_name(op)) + " at " + where(file, line) + ": width " + std::to_string(width) +
                   " is not a power of two in 1..32");
  f.op = op;
  f.mask = mask;
  f.bits = bits;
  f.arg = arg;
  f.width = width;
  f.file = file;
  f.line = line;
  yield(State::kWarp);
  return f.bits;
}

void* dynamic_shared() {
  current_fiber();
  return ex().dynamic;
}

void* static_shared(void* storage, size_t bytes, const char* file, int line) {
  Executor& e = ex();
  current_fiber();
  for (const SharedArray& s : e.statics)
    if (s.storage == storage) return storage;
  e.statics.push_back({storage, bytes});
  e.static_bytes += bytes;
  const KernelRecord* k = e.kernel;
  const size_t limit = k->opted_in ? kOptinSharedLimit : kDefaultSharedLimit;
  if (e.static_bytes > kDefaultSharedLimit || e.static_bytes + e.dynamic_bytes > limit)
    fail_in_thread("shared memory over the limit: " + std::to_string(e.static_bytes) + " B static (the last, " +
                   std::to_string(bytes) + " B, declared at " + where(file, line) + ") + " +
                   std::to_string(e.dynamic_bytes) + " B dynamic > " +
                   std::to_string(e.static_bytes > kDefaultSharedLimit ? kDefaultSharedLimit : limit) + " B");
  std::memset(storage, kPoison, bytes);  // a new block's shared memory holds no values yet
  return storage;
}

int func_set_attribute(const void* fn, int attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  for (KernelRecord* r : registry()) {
    if (r->fn != fn) continue;
    if (value < 0 || static_cast<size_t>(value) > kOptinSharedLimit) return cudaErrorInvalidValue;
    r->max_dynamic_shared = static_cast<size_t>(value);
    r->opted_in = true;
    return cudaSuccess;
  }
  return cudaErrorInvalidValue;  // not a kernel this module launches
}

cudaError_t device_attribute(int* value, cudaDeviceAttr attribute) {
  switch (attribute) {
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = kMultiProcessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(kOptinSharedLimit); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

}  // namespace lf_emu

// ---- the tests' interface (ctypes, tests/cuda_executor.py) ----------------------------------------------
extern "C" {

// Thread (and block) order of the next launches: forward, reverse, shuffle or warp_ahead; seed picks the
// shuffle and the warp that runs ahead. Returns 0, or -1 for an unknown order.
__attribute__((visibility("default"))) int lf_emu_set_order(const char* order, unsigned long long seed) {
  using namespace lf_emu;
  for (int k = 0; k < kOrders; ++k) {
    if (std::strcmp(order, kOrderNames[k]) == 0) {
      std::lock_guard<std::mutex> lock(ex().mutex);
      ex().order = static_cast<Order>(k);
      ex().seed = seed;
      return 0;
    }
  }
  return -1;
}

// One line per kernel instantiation: name, then its launch counts per order (tab-separated).
__attribute__((visibility("default"))) const char* lf_emu_kernel_table() {
  using namespace lf_emu;
  static std::string text;
  std::lock_guard<std::mutex> lock(ex().mutex);
  text.clear();
  for (const KernelRecord* r : registry()) {
    text += r->name;
    for (int k = 0; k < kOrders; ++k) text += "\t" + std::to_string(r->launches[k]);
    text += "\n";
  }
  return text.c_str();
}


}
