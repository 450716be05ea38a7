"""``python -m tracin``."""

from tracin.cli._app import main

main()
