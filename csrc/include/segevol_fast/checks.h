// Input validation shared by the native kernels. Every message says what was expected, so a
// user reading a failed TORCH_CHECK knows what to change without opening this file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define SF_CHECK_DEVICE(t, dev_type)                                                  \
  TORCH_CHECK((t).device().type() == (dev_type), #t " must be on ", (dev_type),       \
              " but is on ", (t).device())
#define SF_CHECK_DIM(t, n) \
  TORCH_CHECK((t).dim() == (n), #t " must have ", (n), " dims, got shape ", (t).sizes())
#define SF_CHECK_SAME_DTYPE(a, b)                                                     \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " dtype ", (a).scalar_type(), \
              " differs from " #b " dtype ", (b).scalar_type())
