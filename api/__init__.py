"""The HTTP API: handoff reads, traces and observation ingest."""
