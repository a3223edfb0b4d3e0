"""``petribus keys``: API keys for the gateway (create, list, revoke). Filled in by issue 12."""

from __future__ import annotations

import typer

keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys; only hashes are stored.")
