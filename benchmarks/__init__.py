"""jobrunner's benchmarks: ``python -m benchmarks <name> [--quick] [--repeat N] [--json-out FILE]``.

Each benchmark is a module here with a ``run(bench)`` function (see :mod:`benchmarks._harness`
for the API); ``python -m benchmarks all`` runs every one that is present.
"""
