"""The broker cut-off of decommissioned devices: the hub's first controller.

``plan`` is the planner (pure: which pending devices to ask now, the command, what
an answer confirms); ``driver`` reads the pending devices, runs the planner, asks
the broker on the link's session and records the confirmations.
"""
