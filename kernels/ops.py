"""Box-matching post-processing kernels. Callers use these functions, never an implementation directly:
the device picks the implementation (CUDA tensors -> Triton, CPU tensors -> the torch reference).

Override per call with backend="triton" | "reference", or for the process with the environment variable
REWARDSCOPE_KERNELS=triton | reference | auto (the argument wins over the variable). Triton on CPU tensors
runs only in Triton's interpreter: set TRITON_INTERPRET=1 before the first call (the Triton modules are
imported lazily, on first use, so setting it after importing this package still works).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from . import reference
from .reference import BoxMatch, LayoutMatch, poisson_binomial

__all__ = ["BACKENDS", "BoxMatch", "LayoutMatch", "box_match", "layout_match", "poisson_binomial"]

BACKENDS = ("triton", "reference")
ENV_VARIABLE = "REWARDSCOPE_KERNELS"

# Triton's interpreter keeps per-launch state in globals: two threads interpreting at once corrupt each other.
_INTERPRETER_LOCK = threading.Lock()
_IMPORT_LOCK = threading.Lock()
_Result = TypeVar("_Result")


def _triton_module(name: str) -> types.ModuleType:
    """rewardscope.kernels.triton.<name>, imported on first use (defining its kernels reads TRITON_INTERPRET)."""
    with _IMPORT_LOCK:
        return importlib.import_module(f"{__package__}.triton.{name}")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """The implementation a call runs: the backend argument, else REWARDSCOPE_KERNELS, else the device."""
    choice = backend if backend is not None else os.environ.get(ENV_VARIABLE, "auto").strip().lower() or "auto"
    if choice not in (*BACKENDS, "auto"):
        source = "backend" if backend is not None else ENV_VARIABLE
        raise ValueError(f"{source} must be one of 'triton', 'reference' or 'auto', got {choice!r}")
    if choice == "auto":
        return "triton" if tensor.is_cuda and _triton_installed() else "reference"
    return choice


def _run_triton(name: str, *args, **kwargs):
    if not _triton_installed():
        raise RuntimeError("backend 'triton' needs the triton package; use backend='reference'")
    module = _triton_module(name)
    lock = _INTERPRETER_LOCK if module.INTERPRETED else contextlib.nullcontext()
    with lock:
        return getattr(module, name)(*args, **kwargs)


_BACKEND_DOC = """
    backend: "triton" | "reference" | "auto" | None (None: REWARDSCOPE_KERNELS, else auto; auto: CUDA tensors
    -> triton, others -> reference). Both backends take these arguments and return the same results: the torch
    reference (rewardscope.kernels.reference) declares the signature once for both.
    """


def _dispatched(implementation: Callable[..., _Result]) -> Callable[..., _Result]:
    """The public function over the reference `implementation` and its Triton twin of the same name: the same
    signature plus a keyword-only `backend`; the device of the first tensor argument picks by default."""
    name = implementation.__name__
    signature = inspect.signature(implementation)
    backend_parameter = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None)

    @functools.wraps(implementation)
    def call(*args: Any, backend: str | None = None, **kwargs: Any) -> _Result:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if resolve_backend(backend, bound.args[0]) == "triton":
            return _run_triton(name, *bound.args)
        return getattr(reference, name)(*bound.args)  # looked up per call, as the Triton twin is

    call.__module__ = __name__
    call.__doc__ = (implementation.__doc__ or "").rstrip() + "\n" + _BACKEND_DOC
    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), backend_parameter]
    )
    return call


box_match = _dispatched(reference.box_match)
layout_match = _dispatched(reference.layout_match)
