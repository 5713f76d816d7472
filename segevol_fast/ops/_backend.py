"""Backend selection shared by every op.

Each op registers up to three implementations:

    "ref"     plain PyTorch, the definition of correct; always available
    "triton"  a Triton kernel; on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1
    "native"  the C++ (CPU) or CUDA kernel from `segevol_fast._C`; for an op defined with
              `native_cpu=` (see `_op.define_op`), PyTorch's own compiled CPU kernel, CPU only

Default order: a CUDA tensor goes to native CUDA if built, else Triton, else ref; a CPU tensor goes
to native C++ if built, else ref (the Triton interpreter is for tests, never a default).
`SEGEVOL_FAST_BACKEND=ref|triton|native` or `with ops.use_backend("ref"):` forces one backend for
every op; forcing one that cannot run raises BackendUnavailableError saying how to get it. The
context manager wins over the environment variable; both are read at call time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from .. import _native
from ..errors import BackendUnavailableError

BACKENDS = ("ref", "triton", "native")
ENV_VAR = "SEGEVOL_FAST_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("segevol_fast_backend", default=None)


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    # device type -> None when it can run there, else the reason it cannot
    why_not: Callable[[str], str | None]


_REGISTRY: dict[str, dict[str, _Impl]] = {}


def register(op: str, backend: str, fn: Callable, why_not: Callable[[str], str | None]) -> None:
    """Register `fn` as `backend`'s implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, why_not)


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def implemented_backends(op: str) -> list[str]:
    """The backends `op` has an implementation of, whether or not they can run here."""
    return [b for b in BACKENDS if b in _REGISTRY.get(op, {})]


# ---------------------------------------------------------------------------- availability probes
@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not_triton(device_type: str) -> str | None:
    err = triton_import_error()
    if err is not None:
        return f"Triton is not importable ({err}); `pip install 'triton>=3.6,<3.10'`"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if triton_interpreter_on():
            return None
        return (
            "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
            "triton is first imported (tests do this), or move the tensors to a CUDA device"
        )
    return f"Triton kernels do not run on device type {device_type!r}"


def why_not_native(device_type: str) -> str | None:
    if _native.native() is None:
        return f"segevol_fast._C is not importable ({_native.native_import_error()}). {_native.build_hint()}"
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if _native.native_has_cuda():
            return None
        return (
            "segevol_fast._C was built without CUDA kernels (CPU torch or no nvcc at build time). "
            "Rebuild on a CUDA machine with SEGEVOL_FAST_CUDA=on."
        )
    return f"no native kernels for device type {device_type!r}"


def always(device_type: str) -> str | None:
    return None


# ---------------------------------------------------------------------------- forcing and choosing
def forced_backend() -> str | None:
    """The backend forced by `use_backend` (wins) or by SEGEVOL_FAST_BACKEND, else None."""
    name = _forced.get()
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        if name is not None:
            name = name.strip().lower()
            if name in ("", "auto"):
                return None
            if name not in BACKENDS:
                raise BackendUnavailableError(
                    f"{ENV_VAR}={name!r} is not a backend; use one of {', '.join(BACKENDS)} or unset it"
                )
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force every op to `name` ("ref", "triton", "native") inside the block; None restores auto."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _default_order(device_type: str) -> tuple[str, ...]:
    if device_type == "cuda":
        return ("native", "triton", "ref")
    return ("native", "ref")


def available_backends(op: str, device_type: str) -> list[str]:
    impls = _REGISTRY.get(op, {})
    return [b for b in BACKENDS if b in impls and impls[b].why_not(device_type) is None]


def select(op: str, device_type: str) -> str:
    """Name of the backend `op` will use for tensors on `device_type` right now."""
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"op {op!r} has no registered implementations")
    forced = forced_backend()
    if forced is not None:
        impl = impls.get(forced)
        if impl is None:
            raise BackendUnavailableError(f"op {op!r} has no {forced!r} implementation; available: {sorted(impls)}")
        reason = impl.why_not(device_type)
        if reason is not None:
            raise BackendUnavailableError(f"backend {forced!r} for op {op!r} on {device_type}: {reason}")
        return forced
    for name in _default_order(device_type):
        impl = impls.get(name)
        if impl is not None and impl.why_not(device_type) is None:
            return name
    raise BackendUnavailableError(f"no backend of op {op!r} can run on device type {device_type!r}")


def backend_report(devices: list[str]) -> dict:
    """The op-backend part of `segevol_fast.info()`: Triton's state, the forced backend as the
    environment spells it, and per op and device type the backend chosen and those available. It
    feeds bug reports, so it never raises: a failing choice is reported as "error: ..."."""
    ops = {}
    for op in registered_ops():
        per_device = {}
        for dev in devices:
            try:
                chosen = select(op, dev)
            except Exception as exc:
                chosen = f"error: {exc}"
            per_device[dev] = {"selected": chosen, "available": available_backends(op, dev)}
        ops[op] = per_device
    return {
        "triton_import_error": triton_import_error(),
        "triton_interpret": triton_interpreter_on(),
        "forced_backend": os.environ.get(ENV_VAR) or None,
        "ops": ops,
    }


def implementation(op: str, device_type: str) -> Callable:
    return _REGISTRY[op][select(op, device_type)].fn
