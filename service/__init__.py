"""optim-service: the HTTP service around ``optim_core``.

OpenMP's threads (torch's intra-op pool) spin for a while after each parallel region by default.
The service's own threads (the event loop, the log writer, snapshots) and any worker on the same
host then wait for a core while torch's idle threads spin: on 2 cores a 1M-parameter AdamW step
went from 4 ms to 100–700 ms. Sleeping instead is set here, before torch is imported (libgomp
reads it once, when it loads); an explicit ``OMP_WAIT_POLICY`` in the environment wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
