"""optim_client: the worker's side of optim-service (RemoteOptimizer arrives with issue 4).

It needs torch, httpx and safetensors only, never the server's dependencies.
"""
