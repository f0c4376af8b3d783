// Compiles adaedge_kernels.cu as plain C++ for the host, so that the tests check the kernels'
// arithmetic and indexing on machines without a GPU: one "thread" whose grid-stride loop visits
// every output element in turn. Only for tests; the plugins compile the file with nvcc.
#pragma once
#include <cstdio>

struct AdaedgeDim3 { unsigned x; };
static const AdaedgeDim3 blockIdx = {0}, threadIdx = {0}, blockDim = {1}, gridDim = {1};
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define ADAEDGE_KERNEL extern "C"
