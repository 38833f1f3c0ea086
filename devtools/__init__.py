"""Development and test tooling: a real Mosquitto on loopback, child processes, the demo.

Rule: nothing in hub/, edge_agent/ or protocols/ imports this; benchmarks, tests and
the demo do. It may import every package below the command line.
"""
