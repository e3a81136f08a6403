"""Alembic environment: runs on the connection handed over by :func:`beliefstore.db.migrate`."""

from alembic import context

from beliefstore.projector.tables import metadata

connection = context.config.attributes["connection"]
schema = context.config.attributes.get("schema", "public")
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table_schema=schema,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
