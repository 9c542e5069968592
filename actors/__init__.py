"""Bide's runtime, in layers; each imports only the ones before it.

- ``engine``: pure, no I/O (wire format, histories, the replay of a turn, the wait index);
- ``observe``: tracing (an observer the engine is handed, never imports);
- ``store``: what talks to JetStream (streams, the history log, protocol writes, timers);
- ``hosting``: what hosts runs (the actor host, the event router, retention);
- ``apps``: the applications on top (the ``bide`` command line, the HTTP API).

``sdk`` is what users import: its definitions (errors, conditions, the context interface,
CEL) sit under the engine, its client (runs, events, workers, the testing kit) above
``store``; ``sdk.worker`` loads ``hosting`` only when a worker starts.
"""
