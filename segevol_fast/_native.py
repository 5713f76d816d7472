"""Optional loading of the compiled extension `segevol_fast._C`.

The package imports without the extension (a source checkout, a failed build): `native()` then
returns None and the ops fall back to their references. Only forcing the native backend, or calling
`require_native()`, raises, with the reason the import failed and how to build the extension.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch  # noqa: F401  (loads libtorch/libc10 so that _C's shared-library dependencies resolve)

from .errors import NativeExtensionError

_BUILD_HINT = (
    "Build it from the repository root with `make build` (or "
    "`pip install --no-build-isolation --no-deps -e .` inside an environment that already has torch); "
    "set SEGEVOL_FAST_CUDA=on to require the CUDA kernels."
)


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # missing or ABI-incompatible build
        return None, f"{type(exc).__name__}: {exc}"
    return _C, None


def native() -> ModuleType | None:
    """The compiled module, or None when it is not importable."""
    return _load()[0]


def native_import_error() -> str | None:
    """Why the compiled module could not be imported (None when it loaded)."""
    return _load()[1]


def require_native(feature: str = "the native backend") -> ModuleType:
    mod = native()
    if mod is None:
        raise NativeExtensionError(
            f"{feature} needs the compiled extension segevol_fast._C, which could not be imported "
            f"({native_import_error()}). {_BUILD_HINT}"
        )
    return mod


def native_has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    mod = native()
    return bool(mod is not None and mod.build_info().get("cuda", False))


def native_ops() -> frozenset[str]:
    """Names of the ops compiled into the extension (csrc/op_list.h at build time); empty without it."""
    mod = native()
    return frozenset() if mod is None else _ops_of(mod)


@functools.lru_cache(maxsize=None)
def _ops_of(mod: ModuleType) -> frozenset[str]:
    # Cached: backend selection asks on every native call, and build_info() builds a fresh dict.
    return frozenset(mod.build_info().get("ops", ()))


def build_hint() -> str:
    return _BUILD_HINT
