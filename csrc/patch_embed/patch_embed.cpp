// patch_embed: argument checks and the token pre-fill shared by the CPU and CUDA kernels.
// The schema is declared in csrc/op_list.h; the kernels register per dispatch key in cpu/ and
// cuda/ (the latter only in CUDA builds).
#include <ATen/ATen.h>

#include "segevol_fast/checks.h"
#include "patch_embed/patch_embed.h"

namespace segevol_fast {

PatchEmbedShape check_patch_embed(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& pos_embed,
                                  c10::IntArrayRef patch_size, c10::DeviceType device) {
  SF_CHECK_DIM(x, 5);
  SF_CHECK_DEVICE(x, device);
  SF_CHECK_DEVICE(weight, device);
  SF_CHECK_SAME_DTYPE(x, weight);
  TORCH_CHECK(patch_size.size() == 3, "patch_size must be (pd, ph, pw), got ", patch_size);
  PatchEmbedShape s{};
  s.B = x.size(0); s.C = x.size(1); s.D = x.size(2); s.H = x.size(3); s.W = x.size(4);
  s.pd = patch_size[0]; s.ph = patch_size[1]; s.pw = patch_size[2];
  TORCH_CHECK(s.pd > 0 && s.ph > 0 && s.pw > 0, "patch_size must be positive, got ", patch_size);
  s.gd = s.D / s.pd; s.gh = s.H / s.ph; s.gw = s.W / s.pw;
  TORCH_CHECK(s.gd > 0 && s.gh > 0 && s.gw > 0, "volume ", x.sizes(), " is smaller than one patch ",
              patch_size);
  s.N = s.gd * s.gh * s.gw;
  s.K = s.pd * s.ph * s.pw * s.C;
  SF_CHECK_DIM(weight, 2);
  TORCH_CHECK(weight.size(1) == s.K, "weight must be (E, pd*ph*pw*C) = (E, ", s.K, "), got ",
              weight.sizes());
  s.E = weight.size(0);
  if (bias) {
    SF_CHECK_DEVICE(*bias, device);
    SF_CHECK_SAME_DTYPE(x, *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.E, "bias must be (", s.E, "), got ",
                bias->sizes());
  }
  if (pos_embed) {
    SF_CHECK_DEVICE(*pos_embed, device);
    SF_CHECK_SAME_DTYPE(x, *pos_embed);
    TORCH_CHECK(pos_embed->numel() == s.N * s.E && pos_embed->size(-1) == s.E,
                "pos_embed must be (N, E) or (1, N, E) = (", s.N, ", ", s.E, "), got ",
                pos_embed->sizes());
  }
  return s;
}

at::Tensor init_tokens(const PatchEmbedShape& s, const at::Tensor& x,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& pos_embed) {
  // Always a fresh buffer: expand().contiguous() would return pos_embed itself when B == 1, and
  // the GEMM that accumulates into the result would then overwrite the parameter.
  at::Tensor out = at::empty({s.B, s.N, s.E}, x.options());
  if (pos_embed) {
    out.copy_(pos_embed->reshape({1, s.N, s.E}));
    if (bias) out.add_(*bias);
  } else if (bias) {
    out.copy_(bias->reshape({1, 1, s.E}));
  } else {
    out.zero_();
  }
  return out;
}

}  // namespace segevol_fast
