// Native CPU patch_embed.
//
// float32: oneDNN convolution + one fused transpose/epilogue pass (patch_embed_cpu_conv below).
// Other dtypes: two passes instead of MONAI's four (permute-copy, GEMM, bias, +pos):
//   1. gather: one parallel pass writes the (B*N, K) patch matrix straight from the strided
//      volume, applying the optional x*scale+shift on the fly (so a normalised copy of the
//      volume never exists);
//   2. one BLAS GEMM accumulates patches @ weight^T into tokens pre-filled with bias + pos
//      (beta = 1), so bias and position embedding cost no extra pass over the output.
// The GEMM is ATen's (MKL/oneDNN/OpenBLAS): a hand-written one would not beat it.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstring>

#include "segevol_fast/checks.h"
#include "patch_embed/patch_embed.h"

namespace segevol_fast {
namespace {

template <typename scalar_t>
void gather_patches(const scalar_t* x, scalar_t* out, const PatchEmbedShape& s,
                    const int64_t* st /* strides of x: b, c, d, h, w */, double scale,
                    double shift) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool affine = scale != 1.0 || shift != 0.0;
  const acc_t a = static_cast<acc_t>(scale), b0 = static_cast<acc_t>(shift);
  // A patch row (p1, p2) is pw*C consecutive outputs; when C == 1 and W is unit-stride it is
  // also pw consecutive inputs, the common case we copy with memcpy or a tight loop.
  const bool contiguous_rows = s.C == 1 && st[4] == 1;
  const int64_t tokens = s.B * s.N;
  // Grain: enough tokens per task that scheduling is noise next to the copy (K values each).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(s.K, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / s.N, n = t % s.N;
      const int64_t i = n / (s.gh * s.gw), j = (n / s.gw) % s.gh, k = n % s.gw;
      const scalar_t* base = x + bi * st[0] + i * s.pd * st[2] + j * s.ph * st[3] + k * s.pw * st[4];
      scalar_t* dst = out + t * s.K;
      for (int64_t p1 = 0; p1 < s.pd; ++p1) {
        for (int64_t p2 = 0; p2 < s.ph; ++p2) {
          const scalar_t* row = base + p1 * st[2] + p2 * st[3];
          if (contiguous_rows) {
            if (!affine) {
              std::memcpy(dst, row, sizeof(scalar_t) * s.pw);
            } else {
              for (int64_t p3 = 0; p3 < s.pw; ++p3)
                dst[p3] = static_cast<scalar_t>(static_cast<acc_t>(row[p3]) * a + b0);
            }
            dst += s.pw;
            continue;
          }
          for (int64_t p3 = 0; p3 < s.pw; ++p3) {
            for (int64_t c = 0; c < s.C; ++c) {
              const acc_t v = static_cast<acc_t>(row[p3 * st[4] + c * st[1]]);
              *dst++ = static_cast<scalar_t>(affine ? v * a + b0 : v);
            }
          }
        }
      }
    }
  });
}

}  // namespace

// float32 fast path. oneDNN's strided convolution beats the BLAS sgemm on the (B*N, K) x (K, E)
// product at SegVol sizes on x86 (measured: ~19 ms vs ~27 ms for one 32x256x256 window on 2
// cores) and reads the volume in place, so no patch matrix is written at all. The input affine
// folds in by linearity, conv(x*s + t) = s*conv(x) + t*rowsum(W): with s == 1 the per-channel
// constant bias + t*rowsum(W) rides in the convolution's own bias, and one TensorIterator pass
// adds the position embedding while transposing (B, E, N) -> (B, N, E).
at::Tensor patch_embed_cpu_conv(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& pos_embed, const PatchEmbedShape& s,
                                double scale, double shift) {
  // Linear rows are (p1, p2, p3, c); Conv3d wants (E, C, pd, ph, pw). With C == 1 the two
  // layouts are the same bytes, so this is a view, not a copy.
  const at::Tensor conv_w = s.C == 1 ? weight.reshape({s.E, 1, s.pd, s.ph, s.pw})
                                     : weight.reshape({s.E, s.pd, s.ph, s.pw, s.C}).permute({0, 4, 1, 2, 3}).contiguous();
  // Per-channel constant: bias[e] + shift * rowsum(W)[e] (E values).
  std::optional<at::Tensor> chan = bias;
  if (shift != 0.0) chan = (bias ? *bias : at::zeros({s.E}, x.options())) + weight.sum(1) * shift;
  const bool unit_scale = scale == 1.0;
  const at::Tensor cropped =
      x.narrow(2, 0, s.gd * s.pd).narrow(3, 0, s.gh * s.ph).narrow(4, 0, s.gw * s.pw);
  const at::Tensor y = at::conv3d(cropped, conv_w, unit_scale ? chan : std::nullopt, {s.pd, s.ph, s.pw})
                           .view({s.B, s.E, s.N})
                           .transpose(1, 2);  // (B, N, E) view
  // out = scale * y + (pos + chan when not already inside y), in one pass.
  at::Tensor add;
  if (pos_embed) add = pos_embed->reshape({1, s.N, s.E});
  if (!unit_scale && chan) add = add.defined() ? add + *chan : chan->reshape({1, 1, s.E});
  if (!add.defined()) return unit_scale ? y.contiguous() : (y * scale).contiguous();
  at::Tensor out = at::empty({s.B, s.N, s.E}, x.options());
  return at::add_out(out, add.expand({s.B, s.N, s.E}), y, scale);
}

at::Tensor patch_embed_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& pos_embed,
                           c10::IntArrayRef patch_size, double scale, double shift) {
  const PatchEmbedShape s = check_patch_embed(x, weight, bias, pos_embed, patch_size, c10::kCPU);
  // The ATen calls below must run in x's dtype even when the caller is inside torch.autocast:
  // the op itself defines its precision (fp32 accumulation), autocast must not recast its GEMM.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (x.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn()) {
    return patch_embed_cpu_conv(x, weight, bias, pos_embed, s, scale, shift);
  }
  // Other dtypes: CPU convolutions in float16/bfloat16/float64 are far slower than the GEMM
  // (seconds vs tens of milliseconds), so gather the patch matrix and use one BLAS GEMM.
  at::Tensor patches = at::empty({s.B * s.N, s.K}, x.options());
  const int64_t strides[5] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_embed_cpu", [&] {
    gather_patches<scalar_t>(x.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>(), s,
                             strides, scale, shift);
  });
  at::Tensor out = init_tokens(s, x, bias, pos_embed);
  out.view({s.B * s.N, s.E}).addmm_(patches, weight.t());
  return out;
}

TORCH_LIBRARY_IMPL(segevol_fast_C, CPU, m) { m.impl("patch_embed", &patch_embed_cpu); }

}  // namespace segevol_fast
