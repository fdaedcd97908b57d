"""The worker's side of the optimizers that take more than one gradient per step.

- Closure optimizers (``torch.LBFGS``): torch's ``step(closure)`` runs on the service; each time it evaluates the
  closure, the service answers with the parameters to evaluate at (written into the model), the worker calls the
  closure there and sends evaluation ``k``, until the answer says step ``t`` is done. Each evaluation is applied
  exactly once (the service logs it before it goes on), so a retry, a restarted worker or a restarted service
  resume the same step: the service says which evaluation it waits for (``position["evaluate"]``).
- Adahessian: after ``loss.backward(create_graph=True)`` the worker computes the Hessian-diagonal estimates the
  service's request asks for (``hessian.hutchinson``), with the run's generator, and sends them beside the
  gradients.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import torch

from .hessian import hutchinson

MAX_REFUSALS = 8  # evaluations refused in a row (the run moved on under this worker) before giving up


class Worker(Protocol):
    """What these protocols need of a worker (``RemoteOptimizer``): where the run is, what it asked for next, a
    step's request, the way back to the run's parameters, and the model's parameters by name."""

    run: str
    t: int
    position: dict[str, str]
    _by_name: dict[str, torch.Tensor]

    def _send_step(self, params: dict[str, Any], hessians: Any = None) -> bool: ...

    def resync(self) -> None: ...


def closure_step(opt: Worker, closure: Callable[[], Any] | None) -> Any:
    """One step of a closure optimizer, as ``torch.optim.LBFGS.step(closure)``: the loss of its first evaluation."""
    if closure is None:
        raise RuntimeError(f"run {opt.run!r} steps by closure evaluations (torch.LBFGS): step(closure) needs a closure")
    first: Any = None
    t = opt.t
    refusals = 0
    while True:
        k = int(opt.position.get("evaluate", 0))
        with torch.enable_grad():
            loss = closure()
        if first is None:
            first = loss
        if opt._send_step({"t": opt.t, "k": k, "loss": scalar(loss)}):
            refusals = 0
        else:  # refused: resynced to where the run is (another worker went on, or the step was done meanwhile)
            refusals += 1
            if refusals > MAX_REFUSALS:
                raise RuntimeError(f"run {opt.run!r}: evaluation k={k} of step t={t} was refused {refusals} times")
        if opt.t != t or "evaluate" not in opt.position:
            return first  # step t is done (by this worker's evaluations, or the run is past it)


def scalar(loss: Any) -> float:
    """A loss as the float torch's LBFGS takes of it (``float(closure())``), without autograd's warning."""
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def hessian_estimates(opt: Worker) -> dict[str, torch.Tensor]:
    """The Hessian-diagonal estimates the run's next step asks for, of the gradients' graph (``create_graph=True``)."""
    if "hessian" not in opt.position or int(json.loads(opt.position["hessian"])["t"]) != opt.t:
        opt.resync()  # the request of this step: from the service's last answer, or asked for now
    request = json.loads(opt.position["hessian"])
    return hutchinson(request, opt._by_name.items())
