"""Step round trip of AdamW: in-process ``optimizer.step()`` vs ``RemoteOptimizer.step()`` over loopback.

    .venv/bin/python bench/step_latency.py [--sizes 1 10] [--steps 15]

A first measurement, not yet the full benchmark (see the benchmarks issue): medians with min and max of
``--steps`` steps after two warm-up steps, every ratio against the in-process step measured in the same run.
Prints a table and writes bench/results/step_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optim_client import RemoteOptimizer  # noqa: E402


def params(millions: int, tensors: int = 100) -> list[torch.nn.Parameter]:
    n = millions * 1_000_000 // tensors
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, generator=g) * 0.02) for _ in range(tensors)]


def grads_for(ps: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(p.shape, generator=g) for p in ps]


def timed(step, grads: list[torch.Tensor], ps: list[torch.nn.Parameter], steps: int) -> list[float]:
    out = []
    for k in range(steps + 2):
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        start = time.perf_counter()
        step()
        if k >= 2:
            out.append(time.perf_counter() - start)
    return out


def summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3}


class Service:
    def __init__(self, workdir: Path, blob_store: str) -> None:
        self.port = 18000 + os.getpid() % 1000
        url = f"sqlite:///{workdir / 'bench.db'}"
        env = {**os.environ, "OPTIM_DATABASE_URL": url, "OPTIM_DATA_DIR": str(workdir), "OPTIM_BLOB_STORE": blob_store}
        subprocess.run([sys.executable, "-m", "service.cli", "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--log-level", "warning"],
            env=env,
            cwd=ROOT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if httpx.get(self.url + "/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the service did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10], help="millions of float32 parameters")
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # leave a core for the service
    rows = []
    for blob_store in ("database", "directory"):
        with tempfile.TemporaryDirectory() as tmp:
            service = Service(Path(tmp), blob_store)
            try:
                for millions in args.sizes:
                    ps = params(millions)
                    grads = grads_for(ps)
                    local = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in ps], lr=1e-3)
                    local_ps = [p for g in local.param_groups for p in g["params"]]
                    base = summary(timed(local.step, grads, local_ps, args.steps))
                    configs = [("log", f"log, SQLite, {blob_store} blobs")]
                    if blob_store == "database":
                        configs.append(("snapshot", "durability off (snapshot every 1000)"))
                    for durability, label in configs:
                        opt = RemoteOptimizer(
                            ((str(i), p) for i, p in enumerate(ps)),
                            url=service.url,
                            run=f"bench-{uuid.uuid4().hex[:6]}",
                            optimizer="torch.AdamW",
                            lr=1e-3,
                            groups={"filter_bias_and_bn": False},
                            durability=durability,
                            snapshot_every=1000,
                        )
                        remote = summary(timed(opt.step, grads, ps, args.steps))
                        opt.close()
                        rows.append(
                            {
                                "params_m": millions,
                                "config": label,
                                "in_process": base,
                                "remote": remote,
                                "ratio": remote["median_ms"] / base["median_ms"],
                            }
                        )
                        print(
                            f"{millions:>3}M  {label:<40} in-process {base['median_ms']:7.1f} ms   "
                            f"remote {remote['median_ms']:7.1f} ms (min {remote['min_ms']:.1f}, max {remote['max_ms']:.1f})"
                            f"   x{rows[-1]['ratio']:.1f}",
                            flush=True,
                        )
            finally:
                service.stop()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_latency.json").write_text(
        json.dumps(
            {
                "machine": dict(zip(("sysname", "nodename", "release", "version", "machine"), os.uname(), strict=True)),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
