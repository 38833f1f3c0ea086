"""Liveness: marks devices offline that stopped talking without a Last Will.

``plan`` is the planner (pure: which online devices have been silent past their
missed heartbeats, and when to look again); ``driver`` reads the online devices,
runs the planner and commits the flips (``online`` false, an ``offline`` event)
under a re-check, on the link's session.
"""
