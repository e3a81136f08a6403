"""Alembic migrations of the read model."""
