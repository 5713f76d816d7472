// patch_embed: volume (B,C,D,H,W) -> tokens (B,N,E) = Linear(patchify(x*scale+shift)) + bias + pos.
// Shared shape logic of the CPU (cpu/) and CUDA (cuda/) kernels, defined in patch_embed.cpp;
// semantics in segevol_fast/ops/patch_embed/op.py; schema in csrc/op_list.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

namespace segevol_fast {

struct PatchEmbedShape {
  int64_t B, C, D, H, W;     // input volume
  int64_t pd, ph, pw;        // patch size
  int64_t gd, gh, gw;        // patch grid (voxels past the last whole patch are ignored)
  int64_t N, K, E;           // tokens per sample, values per patch, embedding width
};

// Validates every argument (device, dtype, shapes) and returns the derived sizes.
PatchEmbedShape check_patch_embed(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& pos_embed,
                                  c10::IntArrayRef patch_size, c10::DeviceType device);

// (B,N,E) tensor holding bias[e] + pos[n,e] (zeros when both are absent), contiguous, so a GEMM
// can accumulate the projection into it with beta = 1 instead of adding bias and pos afterwards.
at::Tensor init_tokens(const PatchEmbedShape& s, const at::Tensor& x,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& pos_embed);

at::Tensor patch_embed_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& pos_embed,
                           c10::IntArrayRef patch_size, double scale, double shift);

}  // namespace segevol_fast
