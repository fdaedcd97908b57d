"""optim_format: the bytes that engine, client and service agree on (torch, safetensors and xxhash only).

- ``dtypes``: the one table of tensor dtypes: torch's, the names a spec uses, safetensors' codes;
- ``framing``: safetensors files written from the tensors' own memory and read as views of a buffer,
  their data 64-byte aligned (``ALIGN``): request and answer bodies, the step log's payloads;
- ``tree``: a ``state_dict``-like tree <-> JSON with references to named tensors (never pickle);
- ``snapshot``: a run's whole state as one safetensors file whose metadata is the tree, streamed in and out,
  and its digest;
- ``hessian``: the request of timm Adahessian's protocol (what the worker's estimate needs), as JSON.

Submodules are imported by name: a worker (``optim_client``) needs ``framing``, ``dtypes`` and ``hessian``.
"""

from .errors import FormatError

__all__ = ["FormatError"]
