"""The benchmark's parts run and measure what they say (not their speed: that is bench/'s business).

The RPC peer's parameters are checked bitwise against the same optimizer in-process, each echo against
the bytes sent, and a quick run of ``bench/run.py`` writes the JSON the README's table is made from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import baselines  # noqa: E402


def _timings(times: list[float], n: int) -> None:
    assert isinstance(times, list) and len(times) == n
    assert all(isinstance(t, float) and t > 0 for t in times)


@pytest.mark.parametrize("store", [False, True])
def test_tcp_echo_times_and_echoes_the_bytes(store: bool) -> None:
    # check=True: one untimed extra round with a fresh random payload, compared byte for byte
    _timings(baselines.tcp_echo(1 << 20, repeats=2, check=True, store=store), 2)


def test_rpc_peer_matches_the_in_process_optimizer_bitwise() -> None:
    info: dict[str, object] = {}
    # check=True: the worker asserts the parameters the server returned are bitwise those of an in-process AdamW
    times = baselines.rpc_peer(1, tensors=10, repeats=2, transport="tcp", check=True, info=info)
    _timings(times, 2)
    assert info["checked"] is True and info["returned_type"] == "Parameter"


def test_torch_save_load_round_trip(tmp_path: Path) -> None:
    saves, loads = baselines.torch_save_load(baselines.adamw_state(1, tensors=3), str(tmp_path / "s.pt"), repeats=2, warmup=0)
    _timings(saves, 2)
    _timings(loads, 2)


def test_a_quick_run_writes_every_figure_of_its_sections(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/run.py", "--quick", "--sections", "transport", "memory", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [r["mb"] for r in results["transport"]] == [1, 10, 40, 100, 200]
    for r in results["transport"]:
        for kind in ("tcp_echo", "tcp_stream", "http_echo"):
            assert 0 < r[kind]["min_ms"] <= r[kind]["median_ms"] <= r[kind]["max_ms"], (r["mb"], kind)
    (memory,) = results["memory"]
    assert memory["params_m"] == 1 and memory["peak_rss_mb"] >= memory["idle_rss_mb"] > 0
    assert memory["state_mb"] == pytest.approx(12.0)
    # every target these sections measure, each from its own figures, and the README's tables
    by_name = {t["target"]: t for t in results["targets"]}
    for r in results["transport"]:
        echo = by_name[f"HTTP echo / TCP echo, {r['mb']} MB"]
        assert echo["measured"] == pytest.approx(r["http_echo"]["median_ms"] / r["tcp_echo"]["median_ms"])
        assert echo["met"] == (echo["measured"] <= 1.5)
    assert by_name["server peak memory per run / state bytes, 1M"]["measured"] == memory["ratio"]
    assert len(by_name) == len(results["transport"]) + 1
    table = out.with_suffix(".md").read_text()
    assert "| HTTP echo / TCP echo, 200 MB |" in table and results["machine"]["platform"] in table
