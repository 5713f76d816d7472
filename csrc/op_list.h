// The one list of native ops. Each entry is X(name, "(schema args) -> returns"):
//   - bindings.cpp defines every schema as torch.ops.segevol_fast_C.<name> and reports the names
//     in build_info()["ops"];
//   - CMakeLists.txt reads the names from this file and compiles csrc/<name>/*.cpp,
//     csrc/<name>/cpu/*.cpp and, in CUDA builds, csrc/<name>/cuda/*.{cu,cpp}.
// The kernels register themselves per dispatch key next to their code (TORCH_LIBRARY_IMPL in
// csrc/<name>/cpu/ and csrc/<name>/cuda/). Adding an op: one line here plus its folder.
// Keep one entry per line, `X(name,` at its start: CMake parses the names with a regex.
#pragma once

// clang-format off
#define SEGEVOL_FAST_OPS(X)                                                                   \
  X(patch_embed, "(Tensor x, Tensor weight, Tensor? bias, Tensor? pos_embed, int[] patch_size, " \
                 "float scale, float shift) -> Tensor")
// clang-format on
