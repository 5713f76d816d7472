// CUDA kernels of patch_embed, behind a torch-free interface (raw pointers, sizes, strides and a
// stream) so this header and its .cu compile with nvcc alone: tests/test_cuda_sources.py checks
// them on any machine with nvcc, even where torch is a CPU build. The torch-facing wrapper is
// patch_embed_cuda.cpp. Semantics: segevol_fast/ops/patch_embed/op.py.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace segevol_fast::cuda {

// Where the patches of a (B, C, D, H, W) volume are; strides in elements, any sign or layout.
struct PatchGeometry {
  int64_t B, C;        // batch, channels
  int64_t gd, gh, gw;  // patch grid (D // pd, H // ph, W // pw); the remainder is ignored
  int64_t pd, ph, pw;  // patch size
  int64_t stride[5];   // strides of x along b, c, d, h, w
};

// patches[m, k] (row-major, M = B*gd*gh*gw rows, K = pd*ph*pw*C columns) = x*scale + shift at
// token m's voxel k, in MONAI's order: tokens row-major over the grid, k = (p1, p2, p3, c) with the
// channel fastest. The affine runs in fp32 (fp64 for double), then rounds to the input dtype.
cudaError_t gather_patches(const float* x, float* patches, const PatchGeometry& g, double scale,
                           double shift, cudaStream_t stream);
cudaError_t gather_patches(const double* x, double* patches, const PatchGeometry& g, double scale,
                           double shift, cudaStream_t stream);
cudaError_t gather_patches(const __half* x, __half* patches, const PatchGeometry& g, double scale,
                           double shift, cudaStream_t stream);
cudaError_t gather_patches(const __nv_bfloat16* x, __nv_bfloat16* patches, const PatchGeometry& g,
                           double scale, double shift, cudaStream_t stream);

// out[b, n, e] (contiguous (B, N, E)) = bias[e * bias_stride] + pos[n * pos_sn + e * pos_se];
// bias and/or pos may be null (then they count as 0). A GEMM then accumulates into out (beta = 1).
cudaError_t init_tokens(float* out, const float* bias, int64_t bias_stride, const float* pos,
                        int64_t pos_sn, int64_t pos_se, int64_t B, int64_t N, int64_t E,
                        cudaStream_t stream);
cudaError_t init_tokens(double* out, const double* bias, int64_t bias_stride, const double* pos,
                        int64_t pos_sn, int64_t pos_se, int64_t B, int64_t N, int64_t E,
                        cudaStream_t stream);
cudaError_t init_tokens(__half* out, const __half* bias, int64_t bias_stride, const __half* pos,
                        int64_t pos_sn, int64_t pos_se, int64_t B, int64_t N, int64_t E,
                        cudaStream_t stream);
cudaError_t init_tokens(__nv_bfloat16* out, const __nv_bfloat16* bias, int64_t bias_stride,
                        const __nv_bfloat16* pos, int64_t pos_sn, int64_t pos_se, int64_t B,
                        int64_t N, int64_t E, cudaStream_t stream);

}  // namespace segevol_fast::cuda
