"""Alembic environment: run by the server on its own connection, or by the `alembic` command line."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from models.jobs.store import Base, make_engine

config = context.config
connection = config.attributes.get("connection")


def run_on(connection) -> None:  # noqa: ANN001 - a SQLAlchemy Connection
    # Batch mode makes ALTER TABLE work on SQLite (copy and move) and changes nothing elsewhere.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run_on(connection)
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from models.settings import get_settings

        url = get_settings().resolved_database_url()
    engine = make_engine(url)
    with engine.connect() as cli_connection:
        run_on(cli_connection)
        cli_connection.commit()
