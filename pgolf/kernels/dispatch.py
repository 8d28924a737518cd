"""Pick the Triton kernel or the eager reference for a call.

`PGOLF_KERNELS=auto` (default) uses Triton on CUDA tensors when Triton imports, the reference elsewhere;
`reference` forces the eager path everywhere (the "eager/compile only" baseline); `triton` forces Triton,
which on CPU tensors only works under `TRITON_INTERPRET=1` (how the CPU tests run the kernels).
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

_SAID: set[str] = set()


def say_once(key: str, message: str) -> None:
    """Warn about a fallback once per process, not once per call."""
    if key not in _SAID:
        _SAID.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


_TRITON = _probe_triton()


def triton_available() -> bool:
    """Whether Triton imports here (probed once at import, so compiled graphs see a constant)."""
    return _TRITON


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def mode() -> str:
    value = os.environ.get("PGOLF_KERNELS", "auto").lower()
    if value not in ("auto", "reference", "triton"):
        raise ValueError(f"PGOLF_KERNELS must be auto, reference or triton, not {value!r}")
    return value


@contextmanager
def kernels_mode(value: str) -> Iterator[None]:
    """PGOLF_KERNELS=value inside the block (e.g. the eager reference for a side-by-side run), restored after."""
    old = os.environ.get("PGOLF_KERNELS")
    os.environ["PGOLF_KERNELS"] = value
    try:
        mode()
        yield
    finally:
        if old is None:
            os.environ.pop("PGOLF_KERNELS", None)
        else:
            os.environ["PGOLF_KERNELS"] = old


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernel should handle a call on `tensor`."""
    m = mode()
    if m == "reference":
        return False
    if not triton_available():
        if m == "triton" or tensor.is_cuda:
            say_once("no-triton", "pgolf: Triton is not importable; using the eager PyTorch kernels")
        return False
    if tensor.is_cuda:
        return True
    return m == "triton" and interpreting()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a kernel should compute in: autocast's when it is on for x's device (custom ops are not
    autocast-aware, so the kernels cast themselves, as F.linear would), else x's own."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype
