// Native CUDA patch_embed: the torch-facing wrapper (built only in CUDA builds).
//
// Same plan as the CPU kernel: gather the (B*N, K) patch matrix in one coalesced pass (with the
// optional x*scale+shift fused), pre-fill the tokens with bias + pos, and let cuBLAS (at::addmm_)
// accumulate patches @ weight^T into them with beta = 1. The GEMM dominates at SegVol sizes and
// cuBLAS is as fast as it gets; the two small kernels live in patch_embed_kernel.cu, which takes
// raw pointers so it compiles without torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "patch_embed_kernel.cuh"
#include "segevol_fast/checks.h"
#include "patch_embed/patch_embed.h"

namespace segevol_fast {
namespace {

// Run gather + init for element type T (the CUDA type with the same bits as the tensor's dtype).
template <typename T>
void launch(const at::Tensor& x, at::Tensor& patches, at::Tensor& out, const PatchEmbedShape& s,
            const std::optional<at::Tensor>& bias, const at::Tensor& pos, double scale, double shift,
            cudaStream_t stream) {
  cuda::PatchGeometry g{};
  g.B = s.B; g.C = s.C;
  g.gd = s.gd; g.gh = s.gh; g.gw = s.gw;
  g.pd = s.pd; g.ph = s.ph; g.pw = s.pw;
  for (int d = 0; d < 5; ++d) g.stride[d] = x.stride(d);
  cudaError_t err = cuda::gather_patches(static_cast<const T*>(x.const_data_ptr()),
                                         static_cast<T*>(patches.mutable_data_ptr()), g, scale,
                                         shift, stream);
  TORCH_CHECK(err == cudaSuccess, "patch_embed: gather_patches kernel failed: ",
              cudaGetErrorString(err));
  const T* b = bias ? static_cast<const T*>(bias->const_data_ptr()) : nullptr;
  const T* p = pos.defined() ? static_cast<const T*>(pos.const_data_ptr()) : nullptr;
  err = cuda::init_tokens(static_cast<T*>(out.mutable_data_ptr()), b, bias ? bias->stride(0) : 0, p,
                          pos.defined() ? pos.stride(0) : 0, pos.defined() ? pos.stride(1) : 0, s.B,
                          s.N, s.E, stream);
  TORCH_CHECK(err == cudaSuccess, "patch_embed: init_tokens kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

at::Tensor patch_embed_cuda(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& pos_embed,
                            c10::IntArrayRef patch_size, double scale, double shift) {
  // Shapes, dtypes and device types (shared with the CPU kernel), then what only CUDA needs.
  const PatchEmbedShape s = check_patch_embed(x, weight, bias, pos_embed, patch_size, c10::kCUDA);
  // The ATen calls below must run in x's dtype even when the caller is inside torch.autocast:
  // the op itself defines its precision (fp32 accumulation), autocast must not recast its GEMM.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "patch_embed (CUDA) supports float32, float16, bfloat16 and float64, got ", dtype);
  TORCH_CHECK(weight.device() == x.device(), "weight must be on ", x.device(), " like x, but is on ",
              weight.device());
  TORCH_CHECK(!bias || bias->device() == x.device(), "bias must be on ", x.device(),
              " like x, but is on ", bias->device());
  TORCH_CHECK(!pos_embed || pos_embed->device() == x.device(), "pos_embed must be on ", x.device(),
              " like x, but is on ", pos_embed->device());

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  at::Tensor patches = at::empty({s.B * s.N, s.K}, x.options());
  at::Tensor out = at::empty({s.B, s.N, s.E}, x.options());  // fresh: never aliases pos_embed
  // (N, E) view of pos (a view when possible; strides go to the kernel, so any layout works).
  const at::Tensor pos = pos_embed ? pos_embed->reshape({s.N, s.E}) : at::Tensor();
  switch (dtype) {
    case at::kFloat: launch<float>(x, patches, out, s, bias, pos, scale, shift, stream); break;
    case at::kDouble: launch<double>(x, patches, out, s, bias, pos, scale, shift, stream); break;
    case at::kHalf: launch<__half>(x, patches, out, s, bias, pos, scale, shift, stream); break;
    case at::kBFloat16: launch<__nv_bfloat16>(x, patches, out, s, bias, pos, scale, shift, stream); break;
    default: TORCH_CHECK(false, "unreachable dtype ", dtype);
  }
  // out += patches @ weight^T on the same (current) stream; cuBLAS accumulates in fp32 for 16-bit.
  out.view({s.B * s.N, s.E}).addmm_(patches, weight.t());
  return out;
}

TORCH_LIBRARY_IMPL(segevol_fast_C, CUDA, m) { m.impl("patch_embed", &patch_embed_cuda); }

}  // namespace segevol_fast
