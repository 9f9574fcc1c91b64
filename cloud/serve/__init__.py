"""The long-running cloud side: the round daemon, its job store, artifact delivery, config,
metrics and the event log.
"""
