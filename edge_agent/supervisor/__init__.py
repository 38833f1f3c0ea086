"""The workload supervisor: processes, health checks and limits on the device.

Pure decision modules (no I/O, no clock): ``spec`` (the workload's
specification), ``restart`` (the restart policy), ``health`` (health
verdicts), ``machine`` (the sans-I/O supervisor of one device). The I/O
layer (process table, logs, probes, limits) and ``runtime`` (the
``SupervisingRuntime`` the agent runs) carry out their decisions.
"""
