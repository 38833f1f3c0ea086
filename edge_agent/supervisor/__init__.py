"""The workload supervisor: runs a device's workloads as supervised processes.

Its I/O layer (this package's modules import nothing heavy: no asyncio, urllib,
paho or cryptography, so an idle agent pays little for them):

- ``processes``: the process table: spawn (own session, limits, logs), stop (the
  group: signal, grace, SIGKILL), a watcher thread on pidfds that reports exits,
  re-adoption after an agent restart (``processes.json`` plus a marker variable).
- ``logs``: ``logs/<workload>/current.log``, size-bounded copy-then-truncate
  rotation, bounded tails for failure reports.
- ``probes``: health probes as blocking I/O with hard timeouts (HTTP GET on a
  local port, a command in its own process group).
- ``limits``: rlimits via prlimit(1), cgroup v2 detection and writing.

The decisions (restart policy, health verdicts, the workload spec) are pure
modules beside it, which the simulator runs too; ``docs/runtime.md`` describes
the whole runtime. Import the modules themselves: this file imports nothing.
"""
