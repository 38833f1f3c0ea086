"""Benchmark scenarios that run the simulator against a real broker and hub on loopback."""
