"""The engine: pure, no I/O.

The wire format, a run's history, child ids, the replay of a turn and the router's wait
index. It imports nothing else of ``actors`` (only sdk's definitions: errors, conditions,
the context interface, CEL), so it runs with no server (``sdk.testing.replay``).
"""
