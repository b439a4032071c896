// LF_HOST_DEVICE marks the small math functions that the CPU (.cpp, g++) and CUDA (.cu, nvcc) kernels
// of a family share through its <family>.h.
#pragma once

#if defined(__CUDACC__)
#define LF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LF_HOST_DEVICE inline
#endif
