"""``petribus replay``: fold a recorded session with an app's net and report where it would decide
differently. Filled in by issue 11."""

from __future__ import annotations

import typer

replay_app = typer.Typer(help="Check a recorded session against an app's net, without running anything.")
