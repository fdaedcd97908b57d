"""A RunState as a snapshot and back: the tree of everything a run holds (parameters, optimizer state by
parameter name, scheduler, averages, counters, the RNG an algorithm draws from outside its ``state_dict``, the
spec), encoded as JSON + named tensors (``optim_format.tree``), and a state loaded from such a tree, refused
when it was written by another torch or on another device type (resuming would not be bitwise exact)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from optim_format import FormatError, snapshot, tree

from . import hessian
from .devices import pick_device
from .errors import SnapshotError
from .spec import RunSpec

if TYPE_CHECKING:
    from .run_state import RunState

FORMAT = "optim-run/1"
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def optimizer_state_by_name(state: RunState) -> dict[str, Any]:
    """The optimizer's ``state_dict`` with parameter names instead of positions."""
    sd = dict(state.optimizer.state_dict())
    names = state.names_in_optimizer_order
    sd["state"] = {names[i]: v for i, v in sd["state"].items()}
    sd["param_groups"] = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return sd


def _load_optimizer_state(state: RunState, named: Mapping[str, Any]) -> None:
    order = state.names_in_optimizer_order
    index = {n: i for i, n in enumerate(order)}
    groups = named["param_groups"]
    mine = [[order[i] for i in g["params"]] for g in state.optimizer.state_dict()["param_groups"]]
    theirs = [list(g["params"]) for g in groups]
    if mine != theirs:
        raise SnapshotError("the snapshot's parameter groups differ from the ones this spec builds")
    unknown = sorted(set(named["state"]) - set(index))
    if unknown:
        raise SnapshotError(f"optimizer state for unknown parameter(s) {unknown[:10]}")
    sd = dict(named)
    sd["state"] = {index[n]: v for n, v in named["state"].items()}
    sd["param_groups"] = [{**g, "params": [index[n] for n in g["params"]]} for g in groups]
    state.optimizer.load_state_dict(sd)


def _tree(state: RunState) -> dict[str, Any]:
    out = {
        "format": FORMAT,
        "torch": torch.__version__,
        "device": state.device.type,
        "spec": state.spec.to_dict(),
        "t": state.t,
        "epoch": state.epoch,
        "skipped_steps": state.skipped_steps,
        "params": state.params(),
        "optimizer": optimizer_state_by_name(state),
        "scheduler": state.schedule.state_dict() if state.schedule else None,
        "ema": state.ema.state_dict() if state.ema else None,
        "swa": state.swa.state_dict() if state.swa else None,
        "rng": state.rng,
    }
    extra = hessian.state_tree(state)  # only where there is one: the digests of other states stay as they were
    if extra is not None:
        out["hessian"] = extra
    return out


def encoded(state: RunState) -> tuple[Any, dict[str, torch.Tensor]]:
    """The state as a snapshot's JSON part and named tensors (views of the state's own)."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        meta = tree.encode_tree(_tree(state), "", tensors)
    except FormatError as exc:  # a state_dict holding what the format cannot carry
        raise SnapshotError(f"the state cannot be stored: {exc}") from None
    return meta, tensors


def load(
    cls: type[RunState],
    meta: Any,
    tensors: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device | None = None,
    adopt: bool = False,
) -> RunState:
    """The state of a snapshot's JSON part and tensors (see ``RunState.from_parts``)."""
    try:
        saved = tree.decode_tree(meta, tensors)
    except FormatError as exc:
        raise SnapshotError(str(exc)) from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise SnapshotError(f"not a run snapshot of format {FORMAT!r}")
    target = pick_device(device)
    if saved["torch"] != torch.__version__:
        raise SnapshotError(
            f"snapshot was written by torch {saved['torch']}, this process runs {torch.__version__}: "
            "resuming would not be bitwise exact"
        )
    if saved["device"] != target.type:
        raise SnapshotError(
            f"snapshot was written on {saved['device']}, this process steps on {target.type}: resuming would not be bitwise exact"
        )
    state = cls(RunSpec.from_dict(saved["spec"]), saved["params"], device=target, adopt=adopt)
    _load_optimizer_state(state, saved["optimizer"])
    if state.schedule is not None:
        state.schedule.load_state_dict(saved["scheduler"])
    if state.swa is not None:
        state.swa.load_state_dict(saved["swa"])
    if state.ema is not None:
        state.ema.load_state_dict(saved["ema"])
    state.t, state.epoch, state.skipped_steps = saved["t"], saved["epoch"], saved["skipped_steps"]
    state.rng = saved["rng"]
    hessian.load_state_tree(state, saved.get("hessian"))
    return state


def checksum(state: RunState) -> str:
    """A cheap fingerprint of the parameters: per tensor, the integer sum of its bit patterns.

    Integer sums do not depend on the order of the reduction (threads, kernels), so equal parameters always give
    equal checksums; computing it costs one read of the parameters.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{state.t}:{state.epoch}".encode())
    for name, p in state.params().items():
        flat = p.reshape(-1)
        as_int = flat.view(_INT_OF_SIZE[flat.element_size()])
        h.update(f"|{name}:{int(as_int.sum(dtype=torch.int64))}".encode())
    return h.hexdigest()


def nbytes(state: RunState) -> int:
    """The bytes of every tensor the state holds: parameters, optimizer state, averages (what it costs to keep the
    run in memory; a few microseconds per hundred tensors). A sparse tensor (SGD's momentum of a sparse gradient)
    counts its indices and values."""
    seen: set[tuple[int, int]] = set()  # a tensor held twice (a detached view of the same memory) counts once
    total = 0
    tensors = [*state.params().values(), *(v for s in state.optimizer.state.values() for v in s.values())]
    for kind in ("ema", "swa"):
        tensors += (state.averages(kind) or {}).values()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        for part in (t._indices(), t._values()) if t.layout == torch.sparse_coo else (t,):
            if (part.data_ptr(), part.numel()) not in seen:
                seen.add((part.data_ptr(), part.numel()))
                total += part.numel() * part.element_size()
    return total


@dataclass(frozen=True)
class Captured:
    """A frozen copy of a RunState (see ``RunState.capture``)."""

    t: int
    epoch: int
    meta: Any
    tensors: dict[str, torch.Tensor]

    def parts(self) -> list[memoryview]:
        """The snapshot file of the copy, as buffers of its own memory (``optim_format.snapshot.pack_parts``)."""
        return snapshot.pack_parts(self.meta, self.tensors)

    def digest(self) -> str:
        return snapshot.digest(self.meta, self.tensors)
