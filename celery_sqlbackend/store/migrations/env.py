"""Alembic environment for the store: the connection and prefix come from the caller.

``celery_sqlbackend.admin`` builds the ``Config`` in code and passes the open
connection (``attributes["connection"]``) and the table prefix
(``attributes["table_prefix"]``); offline mode (``--sql``) renders the DDL
for ``attributes["url"]`` instead.
"""
from alembic import context

from celery_sqlbackend.store.schema import DEFAULT_PREFIX, tables

config = context.config
prefix = config.attributes.get("table_prefix", DEFAULT_PREFIX)
options = dict(
    target_metadata=tables(prefix).metadata,
    version_table=f"{prefix}alembic_version",
)

if context.is_offline_mode():
    context.configure(url=config.attributes["url"], literal_binds=True, **options)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes["connection"]
    context.configure(connection=connection, **options)
    with context.begin_transaction():
        context.run_migrations()
