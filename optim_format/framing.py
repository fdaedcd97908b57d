"""Tensors on the wire, in the safetensors format, with as few copies as the format allows.

``safetensors.torch.save`` builds its output in Rust and hands it to Python as a new ``bytes``
(a 40 MB body costs ~14–40 ms, most of it first-touch page faults on fresh memory), and ``load``
copies every tensor out of the buffer. A training loop sends the same shapes every step, so:

- ``parts`` gives the header and each tensor's own memory, to be sent one after the other (no copy);
  ``encode`` writes them once into one new buffer (the service's answers, built under the run's lock);
- ``views`` gives tensors that *are* slices of a received buffer (``torch.frombuffer``), for a
  caller that copies them into place at once (the client writing the parameters, the service
  decoding gradients); ``parse_header`` checks a header as strictly as safetensors does.

The files are ordinary safetensors files (``safetensors.torch.load`` reads them, and refuses what
``parse_header`` refuses; tested). The engine writes its snapshots from ``parts`` too.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Mapping, Sequence

import torch

from .dtypes import TABLE
from .errors import FormatError

# the dtypes written and read here, by torch dtype and by safetensors code (``dtypes.TABLE``)
DTYPES: dict[torch.dtype, str] = {d.torch: d.code for d in TABLE if d.framed}
BY_CODE: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPES.items()}
ALIGN = 64  # torch's CPU allocator's alignment

# views of a read-only ``bytes`` body are only ever read (copied from); torch warns once that it could be written
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def _header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which the wire format does not carry")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    # the data starts 64-byte aligned (safetensors pads to 8): a tensor at an offset that is a multiple of 64
    # is then as aligned as torch's own memory in a buffer torch allocated, and a receiver may use it in place
    header += b" " * (-(len(header) + 8) % ALIGN)
    return header, offset


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, any shape), without a copy when it is contiguous on CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


def aligned_first(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors whose size is a multiple of ``ALIGN`` bytes first (each then starts at a multiple of
    ``ALIGN`` in ``parts``' data), the others after them; each group in its own order."""
    return dict(sorted(tensors.items(), key=lambda item: item[1].numel() * item[1].element_size() % ALIGN != 0))


def parts(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> list[memoryview]:
    """The safetensors file of ``tensors`` as a list of buffers: the header, then each tensor's own memory
    (CPU tensors are not copied). Sent one after the other, they are the file; valid while the tensors
    are unchanged."""
    header, _ = _header(tensors, metadata)
    return [memoryview(struct.pack("<Q", len(header)) + header), *(tensor_bytes(t) for t in tensors.values())]


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> memoryview:
    """The safetensors file of ``tensors`` in one new buffer: each tensor copied once, into memory that is
    not zeroed first (``torch.empty``)."""
    pieces = parts(tensors, metadata)
    size = sum(p.nbytes for p in pieces)
    out = torch.empty(size, dtype=torch.uint8).numpy().data
    pos = 0
    for piece in pieces:
        out[pos : pos + piece.nbytes] = piece
        pos += piece.nbytes
    return out


Entry = tuple[int, int, str, torch.dtype, list[int]]  # data offsets [begin, end), name, dtype, shape


def parse_header(
    raw: bytes | bytearray | memoryview, data_size: int, dtypes: Mapping[str, torch.dtype] = BY_CODE
) -> tuple[list[Entry], dict[str, str]]:
    """A safetensors header (the JSON after the 8-byte length), checked as strictly as safetensors checks
    it against ``data_size`` bytes of data: a JSON object of known dtypes, non-negative integer shapes,
    and data offsets that fit the shape and tile the data exactly, in order, with neither gap nor
    overlap. Its tensors in the order of their data, and its metadata; any other header is a ``FormatError`` (a ``ValueError``).
    """
    try:
        header = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("__metadata__ must map names to strings")
    entries: list[Entry] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: an entry is {{dtype, shape, data_offsets}}")
        dtype = dtypes.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise FormatError(f"tensor {name!r}: unknown dtype {info['dtype']!r}; known: {sorted(dtypes)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise FormatError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise FormatError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    expected = 0
    for begin, end, name, dtype, shape in entries:
        if begin != expected or end - begin != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            raise FormatError(f"tensor {name!r}: data_offsets [{begin}, {end}] do not follow the previous tensor or fit {shape}")
        expected = end
    if expected != data_size:
        raise FormatError(f"the tensors cover {expected} bytes of data; there are {data_size}")
    return entries, metadata


def views(buffer: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that share memory with ``buffer`` (a safetensors file, checked by ``parse_header``), and
    its metadata. For a buffer that stays unchanged while the tensors are in use; they are to be copied,
    not written (a ``bytes`` buffer is read-only), and they may be less aligned than torch's own memory
    (some kernels' results depend on alignment: copy before computing on them, unless the tensor's address
    is a multiple of ``ALIGN``: ``parts`` starts the data there, and ``aligned_first`` orders tensors so that
    most of them stay there)."""
    view = memoryview(buffer).cast("B")
    if len(view) < 8:
        raise FormatError(f"{len(view)} bytes is not a safetensors file (an 8-byte header length comes first)")
    (header_len,) = struct.unpack_from("<Q", view, 0)
    if header_len > len(view) - 8:
        raise FormatError(f"the header length {header_len} runs past the end of the {len(view)}-byte body")
    start = 8 + header_len
    entries, metadata = parse_header(view[8:start], len(view) - start)
    out: dict[str, torch.Tensor] = {}
    for begin, end, name, dtype, shape in entries:
        if end == begin:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(view, dtype=dtype, count=math.prod(shape), offset=start + begin).view(shape)
    return out, metadata


# ---------------------------------------------------------------------- parts of a parameter's entry
# A step's body may carry, besides dense gradients under the parameter's own name, entries named
# ``{name}#{part}`` (parameter names cannot hold '#': ``optim_core.spec.NAME_RE``):
# - a sparse COO gradient as ``{name}#indices`` (int64, [sparse_dim, nnz]) and ``{name}#values``
#   ([nnz, *shape[sparse_dim:]]): bytes in proportion to the rows touched, not to the parameter;
# - a Hessian-diagonal estimate (timm's Adahessian) as ``{name}#hessian``, shaped like the parameter.
SEPARATOR = "#"
INDICES, VALUES, HESSIAN = "indices", "values", "hessian"
PARTS = (INDICES, VALUES, HESSIAN)


def flatten(tensors: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The entries of a body holding ``tensors`` (dense or sparse COO) and ``hessians``: dense tensors are the
    given objects themselves (``parts`` then sends their memory without a copy); a sparse tensor becomes its
    ``#indices`` and ``#values`` as torch holds them (neither coalesced nor copied: duplicates and their order
    reach the optimizer as they left ``backward``); each Hessian estimate is ``{name}#hessian``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.layout == torch.sparse_coo:
            out[f"{name}{SEPARATOR}{INDICES}"] = t._indices()
            out[f"{name}{SEPARATOR}{VALUES}"] = t._values()
        elif t.layout == torch.strided:
            out[name] = t
        else:
            raise TypeError(f"tensor {name!r} has layout {t.layout}; the wire carries strided and sparse_coo tensors")
    for name, h in (hessians or {}).items():
        out[f"{name}{SEPARATOR}{HESSIAN}"] = h
    return out


def unflatten(
    entries: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tensors, hessians) of a body's entries (``flatten``'s inverse): each ``#indices``/``#values`` pair becomes
    a sparse COO tensor of the parameter's shape in ``shapes``, sharing memory with the entries and marked
    uncoalesced, as ``backward`` leaves an embedding's gradient. Checked here: the parts' names, that a pair is
    complete, the indices' dtype and rank, and that the values fit the indices and the shape; the index values
    themselves are the engine's to check (``optim_core.sparse``). Anything else is a ``FormatError``."""
    tensors: dict[str, torch.Tensor] = {}
    hessians: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in entries.items():
        name, sep, part = key.partition(SEPARATOR)
        if not sep:
            tensors[key] = t
        elif part == HESSIAN:
            hessians[name] = t
        elif part in (INDICES, VALUES):
            pairs.setdefault(name, {})[part] = t
        else:
            raise FormatError(f"entry {key!r}: unknown part {part!r}; parts are {list(PARTS)}")
    for name, pair in pairs.items():
        if name in tensors:
            raise FormatError(f"parameter {name!r} has both a dense entry and sparse parts")
        tensors[name] = _sparse(name, pair, shapes)
    return tensors, hessians


def _sparse(name: str, pair: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> torch.Tensor:
    missing = [f"{name}{SEPARATOR}{p}" for p in (INDICES, VALUES) if p not in pair]
    if missing:
        raise FormatError(f"sparse gradient {name!r} lacks {missing}: a sparse tensor is sent as #indices and #values")
    if name not in shapes:
        raise FormatError(f"sparse gradient {name!r}: no parameter of that name (its shape is needed to read it)")
    shape = [int(s) for s in shapes[name]]
    indices, values = pair[INDICES], pair[VALUES]
    if indices.dtype != torch.int64 or indices.dim() != 2 or not 1 <= indices.shape[0] <= len(shape):
        raise FormatError(
            f"{name}{SEPARATOR}{INDICES} is {str(indices.dtype).removeprefix('torch.')} {list(indices.shape)}; "
            f"it must be int64 [sparse_dim, nnz] with 1 <= sparse_dim <= {len(shape)} (the parameter is {shape})"
        )
    sparse_dim, nnz = indices.shape
    expected = [nnz, *shape[sparse_dim:]]
    if list(values.shape) != expected:
        raise FormatError(
            f"{name}{SEPARATOR}{VALUES} has shape {list(values.shape)}; with {nnz} indices of {sparse_dim} dim(s) into "
            f"{shape} it must be {expected}"
        )
    # the engine checks the indices against the shape before anything uses them
    return torch.sparse_coo_tensor(indices, values, shape, is_coalesced=False, check_invariants=False)
