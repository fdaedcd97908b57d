"""optim-service: the HTTP service around ``optim_core``.

torch's CPU kernels run on OpenMP, and libgomp gives every thread that opens a parallel region a
team of its own. The service steps runs in a pool of worker threads, so with torch's default (one
OpenMP thread per core) each worker thread grows a team, and the idle teams spin on the cores the
step, the event loop and the log writer need. Measured on 2 vCPUs, AdamW over 10M parameters
(``bench/``): 17 ms in a process's main thread, 102 ms in a pool thread with the default wait policy,
84 ms with ``OMP_WAIT_POLICY=PASSIVE`` (every one of the step's ~1000 parallel regions then wakes its
threads through the kernel), 21 ms with one OpenMP thread. Every thread therefore gets one OpenMP
thread, unless ``OMP_NUM_THREADS`` is set in the environment, except the steppers (``service.stepper``),
which step with a team of every core. This is set here, before torch is imported: libgomp reads it
once, when it loads.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
