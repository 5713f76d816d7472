// Native CPU patch_embed: two passes instead of MONAI's four (permute-copy, GEMM, bias, +pos):
//   1. gather: one parallel pass writes the (B*N, K) patch matrix straight from the strided
//      volume, applying the optional x*scale+shift on the fly (so a normalised copy of the
//      volume never exists);
//   2. one BLAS GEMM accumulates patches @ weight^T into tokens pre-filled with bias + pos
//      (beta = 1), so bias and position embedding cost no extra pass over the output.
// The GEMM is ATen's (MKL/oneDNN/OpenBLAS): a hand-written one would not beat it.
//
// Why not oneDNN's strided Conv3d, which reads the volume in place: its accuracy depends on the
// instruction set it picks. With AVX-512 its float32 error on a SegVol window (K = 1024 terms a
// dot product) was ~4x that of the BLAS GEMM; with AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2, or an
// AVX2-only CPU) 6-10x, outside the 2x-of-PyTorch rule every kernel here is held to. The GEMM's
// error equals the plain-PyTorch reference's on every x86-64 CPU; it costs ~5 ms more a window
// than the convolution did (~0.3% of an encoder pass).
#include <ATen/ATen.h>
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

at::Tensor patch_embed_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& pos_embed,
                           c10::IntArrayRef patch_size, double scale, double shift) {
  const PatchEmbedShape s = check_patch_embed(x, weight, bias, pos_embed, patch_size, c10::kCPU);
  // The ATen calls below must run in x's dtype even when the caller is inside torch.autocast:
  // the op itself defines its precision (fp32 accumulation), autocast must not recast its GEMM.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor patches = at::empty({s.B * s.N, s.K}, x.options());
  const int64_t strides[5] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_embed_cpu", [&] {
    gather_patches<scalar_t>(x.const_data_ptr<scalar_t>(), patches.mutable_data_ptr<scalar_t>(), s,
                             strides, scale, shift);
  });
  at::Tensor out = init_tokens(s, x, bias, pos_embed);
  // A strided weight (a view of a wider buffer, reversed strides) is copied first: with it, ATen
  // skips BLAS for a one-token GEMM and sums in an order whose error broke the accuracy rule in
  // ~7% of random single-patch inputs. Model weights are contiguous: no copy then.
  out.view({s.B * s.N, s.E}).addmm_(patches, weight.contiguous().t());
  return out;
}

TORCH_LIBRARY_IMPL(segevol_fast_C, CPU, m) { m.impl("patch_embed", &patch_embed_cpu); }

}  // namespace segevol_fast
