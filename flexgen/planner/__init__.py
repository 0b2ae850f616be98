"""The planner: what this machine can do, what a policy costs on it, and which policy to run.

* :mod:`~flexgen.planner.hardware` — *what can this machine do?* Bandwidths of each link, the
  matmul and CPU-attention rates, memory per tier: measured once and cached, or a preset or
  file, with caps applied;
* :mod:`~flexgen.planner.costmodel` — *what does this policy cost here?* Tensor by tensor,
  as the engine moves and computes them: bytes per link, FLOPs, peak memory per tier, and the
  roofline bound and predicted throughput of a workload;
* :mod:`~flexgen.planner.optimizer` — *which policy is best?* The search behind
  ``policy: auto`` and ``flexgen policy``: the highest predicted throughput that fits.

It reads models' shapes and plugins' byte counts, never runs the engine, and knows nothing
of configs files, Lightning or the command line.
"""
