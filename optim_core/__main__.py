"""``python -m optim_core``: print the catalogue (what this machine can run, and why not)."""

from __future__ import annotations

import json
import sys

from . import describe_schedulers, list_optimizers


def main() -> None:
    if "--json" in sys.argv:
        json.dump(
            {"optimizers": [e.describe() for e in list_optimizers()], "schedulers": describe_schedulers()},
            sys.stdout,
            indent=2,
        )
        return
    entries = list_optimizers()
    available = [e.name for e in entries if e.available]
    print(f"{len(entries)} optimizers, {len(available)} available here:")
    print("  " + ", ".join(available))
    for e in entries:
        if not e.available:
            print(f"  unavailable: {e.name}: {e.reason}")
    print(f"{len(describe_schedulers())} schedulers: " + ", ".join(s["name"] for s in describe_schedulers()))


if __name__ == "__main__":
    main()
