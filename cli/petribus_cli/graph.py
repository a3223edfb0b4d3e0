"""``petribus graph APP``: the app's net as a picture (``petribus.graph``), with no service running.

Mermaid to stdout by default (paste it into a Markdown file); ``--format dot`` for Graphviz, ``svg`` drawn
by petribus itself, ``json`` the laid-out graph for a browser. ``--output FILE`` writes it there.

Exit codes: 0 written, 1 the file cannot be written, 2 a bad APP or option.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from petribus import graph

graph_app = typer.Typer(
    name="graph", add_completion=False, pretty_exceptions_enable=False,
    # A group (main.py adds it with add_typer) whose callback is the command, as ``petribus replay``.
    context_settings={"allow_interspersed_args": True}, subcommand_metavar="",
    help="Draw an app's net: Mermaid, Graphviz DOT, SVG or laid-out JSON.",
)

class Format(StrEnum):  # graph.FORMATS
    mermaid = "mermaid"
    dot = "dot"
    svg = "svg"
    json = "json"


@graph_app.callback(invoke_without_command=True)
def graph_command(
    app_spec: Annotated[str, typer.Argument(
        metavar="APP", help="The bot to draw: path/to/app.py:bot or package.module:bot.")],
    fmt: Annotated[Format, typer.Option(
        "--format", help="mermaid (a flowchart), dot (Graphviz), svg, or json (node boxes and arc paths).",
    )] = Format.mermaid,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print APP's net: places as circles, transitions as boxes, arcs with the markers they take."""
    from petribus_cli.main import CliError, _load, _run  # at call time: main imports this module

    def body() -> int:
        [net] = _load([app_spec])
        text = graph.render(net, fmt.value)
        if output is None:
            typer.echo(text, nl=False)
            return 0
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {output} ({exc.strerror or exc})") from None
        typer.echo(f"wrote {output} ({fmt.value}, {len(net.locations)} places, "
                   f"{len(net.transitions)} transitions)")
        return 0

    _run(body)
