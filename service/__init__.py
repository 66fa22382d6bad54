"""Online serving: FastAPI app, engines, catalogue store, metrics. Never imports training.

OpenMP threads that wait for work sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`, unless
the environment sets it): a serving host is shared by the event loop, the decode process and
often other work, and spinning threads collapse under such contention. Measured on a 2-core AMD
EPYC with a load generator on one core: a batch-1 decode with 2 torch threads took 650 ms with
spinning waits (the default) and 30 ms with passive ones, the same as 1 thread. It must be set
before OpenMP starts, so here, before anything in the service imports torch.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
