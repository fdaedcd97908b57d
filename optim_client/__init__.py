"""optim_client: the worker's side of optim-service. Needs torch and safetensors only."""

from .remote import RemoteOptimizer, RemoteScheduler
from .transport import OptimServiceError

__all__ = ["OptimServiceError", "RemoteOptimizer", "RemoteScheduler"]
