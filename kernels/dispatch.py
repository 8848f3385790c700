"""Backend choice: fused Triton on CUDA, the Triton interpreter on CPU under ``TRITON_INTERPRET=1``, torch otherwise."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch")
_TRITON_MODULES = {"crd": "kernels.triton_crd", "nft": "kernels.triton_nft", "fdfo": "kernels.triton_fdfo",
                   "grpo": "kernels.triton_grpo"}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for these tensors (see the package docstring); raises on an unusable request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    triton_ok = on_cuda or (interpreter_enabled() and all(t.device.type == "cpu" for t in tensors))
    fp64 = any(t.dtype == torch.float64 for t in tensors)
    if backend == "auto":
        return "triton" if triton_ok and not fp64 else "torch"
    if not triton_ok:
        raise ValueError("backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
                         "triton is imported.")
    if fp64:
        raise ValueError("backend='triton' computes in fp32 and does not take float64 inputs; use backend='torch'.")
    return "triton"


def triton_module(name: str) -> ModuleType:
    """Import the Triton implementation lazily: ``triton.jit`` picks interpreter vs compiler at import time."""
    return importlib.import_module(_TRITON_MODULES[name])
