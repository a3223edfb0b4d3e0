"""``petribus sessions``: move sessions between deployments (export, import). Filled in by issue 11."""

from __future__ import annotations

import typer

sessions_app = typer.Typer(no_args_is_help=True, help="Export and import sessions as JSON lines files.")
