"""The projection: the pure fold of events into beliefs, and the worker that applies it to PostgreSQL."""
