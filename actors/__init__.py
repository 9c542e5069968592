"""Bide's runtime: actor host, history log, timers, activation queue, wire format, embedded server."""
