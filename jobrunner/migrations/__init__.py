"""jobrunner's Alembic migrations (``env.py`` and ``versions/``); run them with
``jobrunner migrate`` or :func:`jobrunner.migrate`."""
