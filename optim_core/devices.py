"""Where a run steps, and which implementations (``default`` / ``foreach`` / ``fused``) an optimizer has there.

The rules are torch's own, read from the installed torch rather than copied, so that they follow its version:

- ``default`` (``foreach=None, fused=None``) runs everywhere: torch picks the for-loop or foreach kernels itself.
- ``foreach=True`` is accepted by every class whose constructor takes ``foreach``; torch's ``_foreach_*`` ops have a
  per-tensor fallback on devices without multi-tensor kernels (CPU), so it runs on every device (slower there).
- ``fused=True`` is accepted by classes whose constructor takes ``fused`` and runs on the device types of
  ``torch.utils._foreach_utils._get_fused_kernels_supported_devices()``, less CUDA where the class checks its
  parameters with ``_device_dtype_check_for_fused(p, cuda_unsupported=True)``: Adagrad until torch gained its
  CUDA kernel (pytorch/pytorch#153038, landed by #177672): on torch 2.11 a CUDA server answered
  ``implementation: "fused"`` for ``adagrad`` with a 500 (issue 22).
"""

from __future__ import annotations

import ast
import inspect
import sys
from functools import cache

import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

IMPLEMENTATIONS = ("default", "foreach", "fused")
# The device types a service steps on (pick_device); the catalogue describes each of them.
DEVICE_TYPES = ("cpu", "cuda")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU; the same code path on both."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_device_type() -> str:
    """The device type this process would step a run on."""
    return pick_device().type


def _accepts(cls: type, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a class without an inspectable signature takes no such keyword that we know of
        return False


def source_refuses_fused_on_cuda(source: str) -> bool:
    """Whether Python source calls ``_device_dtype_check_for_fused(..., cuda_unsupported=True)``."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name != "_device_dtype_check_for_fused":
            continue
        for kw in node.keywords:
            if kw.arg == "cuda_unsupported" and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                return True
    return False


@cache
def _module_refuses_fused_on_cuda(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):  # no source shipped: trust the supported-devices list alone
        return False
    return source_refuses_fused_on_cuda(source)


def _fused_device_types(cls: type) -> tuple[str, ...]:
    devices = list(_get_fused_kernels_supported_devices())
    # the check may sit in a base class's module (AdamW steps through Adam's _init_group)
    modules = {c.__module__ for c in cls.__mro__ if c not in (torch.optim.Optimizer, object)}
    if any(_module_refuses_fused_on_cuda(m) for m in modules):
        devices = [d for d in devices if d != "cuda"]
    return tuple(devices)


def implementations_by_device(cls: type | None) -> dict[str, tuple[str, ...]]:
    """For each of :data:`DEVICE_TYPES`, the implementations ``cls`` runs there (``None``: a class not importable
    here, which has only its default)."""
    table = {}
    for device in DEVICE_TYPES:
        found = ["default"]
        if cls is not None and _accepts(cls, "foreach"):
            found.append("foreach")
        if cls is not None and _accepts(cls, "fused") and device in _fused_device_types(cls):
            found.append("fused")
        table[device] = tuple(found)
    return table
