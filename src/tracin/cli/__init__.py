"""The ``tracin`` command line (Typer): each subcommand parses, then calls one library function.

A new command goes in `_app` and calls a library function; tables go through `write_table`.
"""

from tracin.cli._app import app, main
from tracin.cli._output import write_table

__all__ = ["app", "main", "write_table"]
