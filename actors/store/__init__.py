"""What talks to JetStream.

Connections and streams, the history log, the protocol writes every part shares, timers,
the embedded server, and starting child runs.
"""
