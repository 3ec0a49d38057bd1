"""A gateway process over its life: the long-lived services a worker opens once,
the worker itself (listen, start, reload on SIGHUP, drain on SIGTERM) and the
supervisor of several workers.

May import: anything in :mod:`gateway` (it wires the parts together). Public
aiohttp only.
"""
