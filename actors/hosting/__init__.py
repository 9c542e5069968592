"""What hosts runs: the actor host and its work queue, heartbeats, the inbox sweeper, retention, the event router."""
