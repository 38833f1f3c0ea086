"""The fleet simulator: the real agent core on simulated devices over real MQTT connections.

Rule: nothing here changes what a device does; only the runtime (the applier)
and the disk (state kept in memory) are simulated.
"""
