"""Alembic environment: the URL from the config (set by the service) or OPTIM_DATABASE_URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from service.settings import Settings
from service.storage.database import make_engine
from service.storage.models import Base

config = context.config
target_metadata = Base.metadata
url = config.get_main_option("sqlalchemy.url") or Settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    if url.startswith("sqlite"):
        # the service's engine: its pragmas (64 KiB pages, WAL) must be set before the first table creates the file
        connectable = make_engine(Settings(database_url=url))
    else:
        connectable = engine_from_config({"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
