"""The applications on top: the ``bide`` command line and the HTTP API."""
