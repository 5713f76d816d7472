// CUDA kernels of patch_embed (see patch_embed_kernel.cuh). Only CUDA headers here, by design.
//
// Both kernels write a row-major matrix (patches (M, K) or tokens (M, E)). A block owns a few
// whole rows so that (a) its threads write one contiguous span (coalesced stores) and (b) the
// expensive 64-bit token -> voxel decomposition runs once per row, not once per element; the
// per-element work is 32-bit index math plus one load and one store (bandwidth-bound).
#include <algorithm>
#include <climits>

#include "patch_embed_kernel.cuh"

namespace segevol_fast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRows = 64;             // rows per block; bounds the shared row table
constexpr int64_t kWorkPerBlock = 4096;  // ~16 elements per thread amortise the per-row setup

// Arithmetic type: fp32 for float and the 16-bit types (matches the Triton / ATen paths), fp64
// for double.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Rows per block and block count for M rows of `width` elements; false if the grid is too large.
bool plan(int64_t M, int64_t width, int* rows, unsigned* blocks) {
  *rows = static_cast<int>(std::clamp<int64_t>(kWorkPerBlock / std::max<int64_t>(width, 1), 1, kMaxRows));
  const int64_t n = (M + *rows - 1) / *rows;
  if (n > INT_MAX) return false;
  *blocks = static_cast<unsigned>(n);
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
gather_patches_kernel(const T* __restrict__ x, T* __restrict__ patches, PatchGeometry g, int64_t M,
                      int K, int rows, typename AccOf<T>::type scale, typename AccOf<T>::type shift,
                      bool affine) {
  __shared__ int64_t row_base[kMaxRows];  // offset in x of each row's first voxel
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(rows), M - r0));
  const int64_t* st = g.stride;
  if (threadIdx.x < nrows) {
    const int64_t m = r0 + threadIdx.x, N = g.gd * g.gh * g.gw;
    const int64_t b = m / N, t = m % N;
    const int64_t i = t / (g.gh * g.gw), j = (t / g.gw) % g.gh, k = t % g.gw;
    row_base[threadIdx.x] = b * st[0] + i * g.pd * st[2] + j * g.ph * st[3] + k * g.pw * st[4];
  }
  __syncthreads();
  const int C = static_cast<int>(g.C), per_p2 = static_cast<int>(g.pw) * C;
  const int per_p1 = static_cast<int>(g.ph) * per_p2;
  const int total = nrows * K;  // <= max(kWorkPerBlock, K): fits int (K checked on the host)
  T* dst = patches + r0 * K;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int r = idx / K, kk = idx - r * K;
    // kk = ((p1 * ph + p2) * pw + p3) * C + c: channel fastest, as MONAI flattens a patch
    const int p1 = kk / per_p1, rem = kk - p1 * per_p1;
    const int p2 = rem / per_p2, rem2 = rem - p2 * per_p2;
    const int p3 = rem2 / C, c = rem2 - p3 * C;
    auto v = to_acc(x[row_base[r] + p1 * st[2] + p2 * st[3] + p3 * st[4] + c * st[1]]);
    if (affine) v = v * scale + shift;
    store(dst + idx, v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
init_tokens_kernel(T* __restrict__ out, const T* __restrict__ bias, int64_t bias_stride,
                   const T* __restrict__ pos, int64_t pos_sn, int64_t pos_se, int64_t M, int64_t N,
                   int E, int rows) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(rows), M - r0));
  const int64_t n0 = r0 % N;  // token index of the block's first row
  const int total = nrows * E;
  T* dst = out + r0 * E;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int r = idx / E, e = idx - r * E;
    int64_t n = n0 + r;
    if (n >= N) n %= N;  // the block's rows crossed into the next sample
    typename AccOf<T>::type v = 0;
    if (bias != nullptr) v += to_acc(bias[e * bias_stride]);
    if (pos != nullptr) v += to_acc(pos[n * pos_sn + e * pos_se]);
    store(dst + idx, v);
  }
}

template <typename T>
cudaError_t launch_gather(const T* x, T* patches, const PatchGeometry& g, double scale, double shift,
                          cudaStream_t stream) {
  const int64_t M = g.B * g.gd * g.gh * g.gw, K = g.pd * g.ph * g.pw * g.C;
  if (M <= 0 || K <= 0) return cudaSuccess;
  if (K > INT_MAX / 2) return cudaErrorInvalidValue;  // the in-block index is 32-bit
  int rows;
  unsigned blocks;
  if (!plan(M, K, &rows, &blocks)) return cudaErrorInvalidConfiguration;
  using acc_t = typename AccOf<T>::type;
  gather_patches_kernel<T><<<blocks, kThreads, 0, stream>>>(
      x, patches, g, M, static_cast<int>(K), rows, static_cast<acc_t>(scale),
      static_cast<acc_t>(shift), scale != 1.0 || shift != 0.0);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_init(T* out, const T* bias, int64_t bias_stride, const T* pos, int64_t pos_sn,
                        int64_t pos_se, int64_t B, int64_t N, int64_t E, cudaStream_t stream) {
  const int64_t M = B * N;
  if (M <= 0 || E <= 0) return cudaSuccess;
  if (E > INT_MAX / 2) return cudaErrorInvalidValue;
  int rows;
  unsigned blocks;
  if (!plan(M, E, &rows, &blocks)) return cudaErrorInvalidConfiguration;
  init_tokens_kernel<T><<<blocks, kThreads, 0, stream>>>(out, bias, bias_stride, pos, pos_sn, pos_se,
                                                         M, N, static_cast<int>(E), rows);
  return cudaGetLastError();
}

}  // namespace

// Non-template overloads: the .cpp wrapper links against these without seeing any device code.
#define SF_PATCH_EMBED_INSTANTIATE(T)                                                             \
  cudaError_t gather_patches(const T* x, T* patches, const PatchGeometry& g, double scale,        \
                             double shift, cudaStream_t stream) {                                 \
    return launch_gather<T>(x, patches, g, scale, shift, stream);                                 \
  }                                                                                               \
  cudaError_t init_tokens(T* out, const T* bias, int64_t bias_stride, const T* pos, int64_t pos_sn, \
                          int64_t pos_se, int64_t B, int64_t N, int64_t E, cudaStream_t stream) {  \
    return launch_init<T>(out, bias, bias_stride, pos, pos_sn, pos_se, B, N, E, stream);          \
  }

SF_PATCH_EMBED_INSTANTIATE(float)
SF_PATCH_EMBED_INSTANTIATE(double)
SF_PATCH_EMBED_INSTANTIATE(__half)
SF_PATCH_EMBED_INSTANTIATE(__nv_bfloat16)
#undef SF_PATCH_EMBED_INSTANTIATE

}  // namespace segevol_fast::cuda
