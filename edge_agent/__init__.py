"""The edge agent: pure cores, its on-disk store, the workload runtime and the paho driver.

Rules: only ``edge_agent/transport.py`` imports paho; the cores do no I/O and are
shared with the simulator: ``core.py`` (the reconciler and the connection
lifecycle), ``plan.py`` (the apply planner and its steps), ``outbox.py``,
``executors.py``, ``fetch_job.py`` and ``bundle_transfer.py``.
"""
