"""Running beliefstore's processes: what ``up``, ``demo`` and the tests start.

* :mod:`~beliefstore.runtime.startup` — start the embedded services for whatever the
  settings leave unset, apply migrations, create the topics;
* :mod:`~beliefstore.runtime.serve` — the projector (following the active projection)
  and the API server, in threads of one process.
"""
