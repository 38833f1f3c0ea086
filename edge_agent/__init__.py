"""The edge agent: a pure reconcile core, its on-disk store, an applier and the paho driver.

Rule: only ``edge_agent/transport.py``/``driver.py`` import paho; ``core.py`` does no I/O.
"""
