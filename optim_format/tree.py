"""State trees <-> (JSON, named tensors).

Optimizer and scheduler ``state_dict``s are trees of dicts, lists, tuples, numbers, strings and tensors.
``encode_tree`` turns one into plain JSON in which every tensor is replaced by a reference to a named
tensor, so a snapshot is a safetensors file (the tensors) whose metadata holds the JSON (everything
else); a sparse COO tensor is stored as its indices and values. Nothing is pickled; ``decode_tree`` accepts
only the types it wrote.

Dicts are written as sorted ``[key, value]`` pairs so that the same state always gives the same
bytes: the digest of a resumed run must equal that of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from . import dtypes
from .errors import FormatError


def _key_order(key: Any) -> tuple[str, str]:
    return (type(key).__name__, str(key))


def encode_tree(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Return a JSON-able copy of ``obj``; tensors go to ``tensors`` under a key derived from ``path``."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor) and obj.layout == torch.sparse_coo:
        # a sparse state tensor (SGD's momentum buffer after sparse gradients) as its two dense parts, exactly as
        # torch holds them: the same indices in the same order, coalesced or not
        return {
            "__sparse_coo__": {
                "shape": list(obj.shape),
                "coalesced": obj.is_coalesced(),
                "indices": encode_tree(obj._indices(), f"{path}#indices", tensors),
                "values": encode_tree(obj._values(), f"{path}#values", tensors),
            }
        }
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise FormatError(f"cannot store a tensor of layout {obj.layout} at {path!r}")
        if path in tensors:
            raise FormatError(f"two tensors would be stored under {path!r}")
        tensors[path] = obj.detach()
        return {"__tensor__": path}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": dtypes.name_of(obj)}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: _key_order(kv[0]))
        pairs = []
        for k, v in items:
            if not isinstance(k, (str, int)):
                raise FormatError(f"cannot store a key of type {type(k).__name__} at {path!r}")
            pairs.append([k, encode_tree(v, f"{path}/{k}", tensors)])
        return {"__dict__": pairs}
    raise FormatError(f"cannot store a value of type {type(obj).__name__} at {path!r}")


def decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict) and len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tensor__":
            try:
                return tensors[value]
            except KeyError:
                raise FormatError(f"snapshot refers to a missing tensor {value!r}") from None
        if tag == "__sparse_coo__":
            return _sparse(value, tensors)
        if tag == "__float__":
            return float(value)
        if tag == "__dtype__":
            return dtypes.parse(value)
        if tag == "__device__":
            return torch.device(value)
        if tag == "__tuple__":
            return tuple(decode_tree(v, tensors) for v in value)
        if tag == "__dict__":
            return {k: decode_tree(v, tensors) for k, v in value}
    raise FormatError(f"unexpected value in snapshot: {str(obj)[:80]}")


def _sparse(value: Any, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    try:
        shape, coalesced = [int(s) for s in value["shape"]], bool(value["coalesced"])
        indices, values = decode_tree(value["indices"], tensors), decode_tree(value["values"], tensors)
        # checked: a snapshot's indices are used as memory offsets
        return torch.sparse_coo_tensor(indices, values, shape, is_coalesced=coalesced, check_invariants=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise FormatError(f"snapshot holds an invalid sparse tensor: {str(exc)[:200]}") from None
