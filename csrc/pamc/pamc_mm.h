// mm(a, b) into a preallocated contiguous `out` (aten::mm.out through the stable dispatcher), shared by
// the CPU and CUDA tiled pairwise loss: the tile buffer is allocated once per call, not once per tile.
#pragma once

#include <array>

#include "common/common.h"

namespace lossforge {
namespace pamc {

inline void mm_out(const Tensor& a, const Tensor& b, const Tensor& out) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a), torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION));
  // The dispatcher returns a new owning handle to `out`: take it, so that it is released (left in the
  // stack, every call would leak a reference and with it the whole tile buffer).
  (void)torch::stable::detail::to<Tensor>(stack[0]);
}

}  // namespace pamc
}  // namespace lossforge
