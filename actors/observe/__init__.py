"""Tracing: OpenTelemetry spans of runs, and their export out of the host's process."""
