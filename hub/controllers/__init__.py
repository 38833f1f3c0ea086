"""Controllers: the hub's reconcile loops (docs/architecture.md, "Controllers"; rule 7).

A controller is two modules:

- a **planner** (``plan.py``), pure: rows and events in, decisions out; no I/O, no
  clock (``now`` is a parameter), no asyncio. It is tested as tables.
- a **driver** (``driver.py``), thin: reads the database (in a worker thread),
  runs the planner, commits the decisions in one transaction (or sends them to
  the broker) and signals delivery when it changed desired state (through
  :class:`hub.devices.desired.DesiredState`, as routes do).

Drivers run :class:`hub.controllers.loop.ControllerLoop` on the link's session
(:meth:`~hub.mqtt.session.MqttSession.while_connected`) and are woken by database
changes (the link's change fan-out), by reports (handlers they register on the
session) and by their own timers; never by a route. Every decision that matters
is in the database, so a restarted hub (or, at scale, a newly elected leader)
carries on where the last one stopped; what a driver keeps in memory is pacing.

Controllers:

- ``cutoff``: asks the broker to close decommissioned devices' connections until
  it confirms (Mosquitto's dynamic security plugin).
- ``placement``: places deployments on devices (``docs/orchestration.md``).
- ``jobs``: hands one-shot jobs out into devices' documents, follows their reports,
  deadlines and expiry, and stops a job whose failures cross its threshold
  (``docs/jobs.md``).
- ``liveness``: marks devices offline that missed ``offline_after_missed``
  heartbeats without a Will (online/offline otherwise come from births, status and
  the Will in the ingest rules, :mod:`hub.devices.rules`).
- ``rollout``: advances staged rollouts of deployment changes from the devices'
  evidence, gates, deadlines and operators' commands (``docs/rollouts.md``).
- ``schedules``: runs maintenance windows from the schedule table with APScheduler,
  each fire recorded once (``docs/windows.md``).
"""
