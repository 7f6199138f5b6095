"""Alembic environment for jobrunner's own tables, run by ``jobrunner migrate``.

Revisions record themselves in ``jobrunner_alembic_version``, apart from the
application's own Alembic history, and autogenerate looks at ``jobrunner_*`` tables
only. :func:`jobrunner.migrate` hands this script its connection through
``config.attributes``; run by the plain ``alembic`` command (maintainers adding a
revision), it connects to ``JOBRUNNER_DATABASE_URL`` or ``sqlalchemy.url``::

    alembic -c jobrunner/migrations/alembic.ini revision --autogenerate \\
        --rev-id jobrunner_0002 -m "what changed"
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from jobrunner._engine import database_url, make_sync_engine, parse_url
from jobrunner._migrate import context_options

config = context.config


def _configured_url() -> str:
    """For the plain ``alembic`` command: the environment first, then alembic.ini."""
    return str(
        database_url(
            os.environ.get("JOBRUNNER_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
        )
    )


def _run_online(connection: Connection) -> None:
    context.configure(
        connection=connection,
        on_version_apply=config.attributes.get("on_version_apply", ()),
        **context_options(connection.dialect.name),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_offline() -> None:
    url = config.attributes.get("url") or parse_url(_configured_url(), is_async=False)
    context.configure(url=url, literal_binds=True, **context_options(url.get_backend_name()))
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        _run_offline()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_online(connection)
        return
    engine = make_sync_engine(_configured_url())
    try:
        with engine.connect() as connection:
            _run_online(connection)
            connection.commit()
    finally:
        engine.dispose()


_main()
