"""Shared by the kernel modules: which implementation a dispatcher runs, and Triton tile sizes."""
from __future__ import annotations

import jax


def resolve_impl(impl: str, what: str, backends: tuple[str, ...] = ("gpu",)) -> str:
    """"reference" or "pallas". ``"auto"`` is "pallas" where the kernel has a lowering for the
    default backend (``backends``: "gpu" = Triton, "tpu" = Mosaic), else the XLA reference."""
    if impl == "auto":
        return "pallas" if jax.default_backend() in backends else "reference"
    if impl not in ("reference", "pallas"):
        raise ValueError(f"unknown {what} impl {impl!r}")
    return impl


def interpret() -> bool:
    """Pallas kernels run in interpret mode on CPU (the tests), compiled elsewhere."""
    return jax.default_backend() == "cpu"


def pow2(n: int) -> int:
    """The smallest power of two >= n (Triton tiles must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())
