"""``python -m jobrunner``: the jobrunner command."""

from .cli import main

main()
