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
#include "segevol_fast/patch_embed.h"

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
// cores), and it reads the volume in place, so no patch matrix is written at all. The input
// affine folds into the epilogue by linearity, conv(x*s + t) = s*conv(x) + t*rowsum(W), and one
// blocked pass transposes (B, E, N) -> (B, N, E) while adding bias + pos + t*rowsum(W); no
// temporary besides the convolution's own output.
at::Tensor patch_embed_cpu_conv(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& pos_embed, const PatchEmbedShape& s,
                                double scale, double shift) {
  // Linear rows are (p1, p2, p3, c); Conv3d wants (E, C, pd, ph, pw). With C == 1 the two
  // layouts are the same bytes, so this is a view, not a copy.
  const at::Tensor conv_w = s.C == 1 ? weight.reshape({s.E, 1, s.pd, s.ph, s.pw})
                                     : weight.reshape({s.E, s.pd, s.ph, s.pw, s.C}).permute({0, 4, 1, 2, 3}).contiguous();
  const at::Tensor y = at::conv3d(x.narrow(2, 0, s.gd * s.pd).narrow(3, 0, s.gh * s.ph).narrow(4, 0, s.gw * s.pw),
                                  conv_w, {}, {s.pd, s.ph, s.pw})
                           .reshape({s.B, s.E, s.N})
                           .contiguous();
  // Per-channel constant bias[e] + shift * rowsum(W)[e] (E values); pos is read in place.
  at::Tensor chan = bias ? bias->clone() : at::zeros({s.E}, x.options());
  if (shift != 0.0) chan.add_(weight.sum(1), shift);
  const at::Tensor pos = pos_embed ? pos_embed->reshape({s.N, s.E}).contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.B, s.N, s.E}, x.options());
  const float* yp = y.const_data_ptr<float>();
  const float* cp = chan.const_data_ptr<float>();
  const float* pp = pos.defined() ? pos.const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  const float a = static_cast<float>(scale);
  constexpr int64_t T = 32;  // transpose tile: 32x32 floats stay in L1 on both sides
  const int64_t n_tiles = (s.N + T - 1) / T;
  at::parallel_for(0, s.B * n_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / n_tiles, n0 = (job % n_tiles) * T, n1 = std::min(s.N, n0 + T);
      float tile[T][T];
      for (int64_t e0 = 0; e0 < s.E; e0 += T) {
        const int64_t e1 = std::min(s.E, e0 + T);
        // Read y along n (contiguous), write the tile transposed; then emit output rows along e
        // (contiguous, vectorisable) with the additive terms.
        for (int64_t e = e0; e < e1; ++e) {
          const float* ycol = yp + (b * s.E + e) * s.N;
          for (int64_t n = n0; n < n1; ++n) tile[n - n0][e - e0] = ycol[n];
        }
        for (int64_t n = n0; n < n1; ++n) {
          float* orow = op + (b * s.N + n) * s.E;
          const float* trow = tile[n - n0];
          const int64_t w = e1 - e0;
          float* o = orow + e0;
          const float* c = cp + e0;
          if (pp) {
            const float* prow = pp + n * s.E + e0;
            for (int64_t i = 0; i < w; ++i) o[i] = a * trow[i] + c[i] + prow[i];
          } else {
            for (int64_t i = 0; i < w; ++i) o[i] = a * trow[i] + c[i];
          }
        }
      }
    }
  });
  return out;
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
