"""The net as a picture: Mermaid, Graphviz DOT, and an SVG petribus lays out itself.

``graph_of(net)`` reads a :class:`~petribus.net.Net` into plain data: places (a location, its marker's
fields), transitions, and arcs (an input arc carries its count; an output arc says a firing *may* put
markers there). ``render`` writes that as text in one of ``FORMATS``; a marking (location -> number of
markers) is drawn as numbers in the places, so a session's state can be shown on its net.

No Graphviz is needed for the SVG. ``layout`` is a small layered (Sugiyama) drawing: cycles are broken by
reversing the back arcs a depth-first walk finds; each node gets its longest-path layer, bumped so that
places sit in even columns and transitions in odd ones; an arc that spans columns goes through one
invisible point per column; a few barycentre sweeps order each column to cut crossings (the best order
seen is kept); then nodes are pulled towards their neighbours' heights without overlapping. Every walk is
iterative, so a net of any size cannot exhaust the stack. The ``json`` format is that layout (node boxes,
arc polylines) for a browser to draw.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from xml.sax.saxutils import escape

from petribus.errors import UnknownLocation
from petribus.net import Net

Format = Literal["mermaid", "dot", "svg", "json"]
FORMATS: tuple[Format, ...] = ("mermaid", "dot", "svg", "json")

CHAR_W = 7.3  # width of one character of the 12px monospace font the SVG uses
LINE_H = 15.0
COLUMN_GAP = 70.0  # room between columns for arcs and their counts
ROW_GAP = 26.0
DUMMY_GAP = 10.0
MARGIN = 20.0
SWEEPS = 12


@dataclass(frozen=True)
class Place:
    id: str
    name: str
    expose: bool
    fields: tuple[str, ...]  # the marker model's field names
    description: str | None = None


@dataclass(frozen=True)
class Transition:
    id: str
    name: str
    expose: bool
    confirm: bool
    pool: str
    gpu: str | None
    gpu_count: int
    concurrency: int | None
    description: str | None = None

    def details(self) -> str:
        """One short line of what sets it apart: confirm, pool and GPUs, concurrency bound."""
        parts = ["confirm"] if self.confirm else []
        if self.pool != "cpu":
            parts.append(f"pool {self.pool}")
        if self.gpu_count:
            parts.append(f"{self.gpu_count}x {self.gpu or 'gpu'}")
        if self.concurrency is not None:
            parts.append(f"max {self.concurrency}")
        return " · ".join(parts)


@dataclass(frozen=True)
class Arc:
    source: str  # a node id
    target: str
    count: int = 1  # markers an input arc takes; 1 on output arcs (a firing decides how many it adds)


@dataclass(frozen=True)
class Graph:
    bot: str
    places: tuple[Place, ...]
    transitions: tuple[Transition, ...]
    arcs: tuple[Arc, ...]


def graph_of(net: Net) -> Graph:
    """The net's places, transitions and arcs, in declaration order. Node ids are ``p<i>`` and ``t<i>``."""
    pid = {name: f"p{i}" for i, name in enumerate(net.locations)}
    places = tuple(
        Place(pid[loc.name], loc.name, loc.expose, tuple(loc.model.model_fields), loc.description)
        for loc in net.locations.values())
    transitions, arcs = [], []
    for i, t in enumerate(net.transitions):
        tid = f"t{i}"
        transitions.append(Transition(tid, t.name, t.expose, t.confirm, t.pool, t.gpu, t.gpu_count,
                                      t.concurrency, t.description))
        arcs += [Arc(pid[loc], tid, n) for loc, n in t.inputs]
        arcs += [Arc(tid, pid[loc]) for loc in t.outputs]
    return Graph(net.bot, places, tuple(transitions), tuple(arcs))


def render(net: Net, fmt: Format = "mermaid", marking: dict[str, int] | None = None) -> str:
    """The net as text in ``fmt``; ``marking`` (location -> markers) is drawn in the places."""
    g = graph_of(net)
    counts = _marking(g, marking)
    if fmt == "mermaid":
        return mermaid(g, counts)
    if fmt == "dot":
        return dot(g, counts)
    if fmt == "svg":
        return svg(layout(g), counts)
    if fmt == "json":
        return json.dumps(layout(g).to_json(counts), indent=2)
    raise ValueError(f"unknown format {fmt!r}; the formats are {', '.join(FORMATS)}")


def _marking(g: Graph, marking: dict[str, int] | None) -> dict[str, int]:
    """Place id -> markers; a location the net does not have is refused by name."""
    pid = {p.name: p.id for p in g.places}
    unknown = sorted(set(marking or {}) - set(pid))
    if unknown:
        raise UnknownLocation(f"the marking names {unknown}, which bot {g.bot!r} does not have; "
                              f"its locations are {sorted(pid)}")
    return {pid[name]: n for name, n in (marking or {}).items()}


# --- text formats ---------------------------------------------------------------------------------------


def mermaid(g: Graph, marking: dict[str, int] | None = None) -> str:
    """A ``flowchart LR``: places are circles, transitions boxes, input counts above 1 label their arcs."""
    marking = marking or {}

    def text(*lines: str) -> str:
        return '"' + "<br/>".join(s.replace('"', "#quot;") for s in lines if s) + '"'

    out = ["flowchart LR"]
    for p in g.places:
        n = marking.get(p.id)
        out.append(f"    {p.id}(({text(p.name, f'● {n}' if n else '')}))")
    for t in g.transitions:
        out.append(f"    {t.id}[{text(t.name, t.details())}]")
    for a in g.arcs:
        out.append(f"    {a.source} -->|{a.count}| {a.target}" if a.count > 1 else f"    {a.source} --> {a.target}")
    hidden = [n.id for n in (*g.places, *g.transitions) if not n.expose]
    if hidden:
        out.append("    classDef hidden stroke-dasharray: 4 3")
        out.append(f"    class {','.join(hidden)} hidden")
    return "\n".join(out) + "\n"


def dot(g: Graph, marking: dict[str, int] | None = None) -> str:
    """Graphviz text: places ``shape=circle``, transitions ``shape=box``, input counts above 1 as labels."""
    marking = marking or {}

    def attrs(**kv: Any) -> str:
        return ", ".join(f"{k}={_dot_str(v)}" for k, v in kv.items() if v not in (None, ""))

    out = [f"digraph {_dot_str(g.bot)} {{", "    rankdir=LR;", '    node [fontname="monospace"];']
    for p in g.places:
        n = marking.get(p.id)
        label = "\n".join(filter(None, (p.name, f"● {n}" if n else "")))
        kv = attrs(shape="circle", label=label, style=None if p.expose else "dashed", tooltip=_fields(p))
        out.append(f"    {p.id} [{kv}];")
    for t in g.transitions:
        label = "\n".join(filter(None, (t.name, t.details())))
        kv = attrs(shape="box", label=label, style=None if t.expose else "dashed", tooltip=t.description)
        out.append(f"    {t.id} [{kv}];")
    for a in g.arcs:
        out.append(f"    {a.source} -> {a.target} [label={_dot_str(a.count)}];" if a.count > 1
                   else f"    {a.source} -> {a.target};")
    return "\n".join(out + ["}"]) + "\n"


def _dot_str(value: object) -> str:
    s = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def _fields(p: Place) -> str:
    head = f"{p.name}({', '.join(p.fields)})"
    return f"{head}: {p.description}" if p.description else head


# --- layout ---------------------------------------------------------------------------------------------


@dataclass
class Node:
    id: str
    kind: Literal["place", "transition", "bend"]  # a bend is an invisible point of an arc spanning columns
    lines: tuple[str, ...] = ()
    width: float = 0.0
    height: float = 0.0
    layer: int = 0
    x: float = 0.0  # centre
    y: float = 0.0


@dataclass
class Edge:
    arc: Arc
    points: list[tuple[float, float]] = field(default_factory=list)  # from the source's border to the target's
    back: bool = False  # drawn against the columns' direction (it closes a cycle)


@dataclass
class Layout:
    graph: Graph
    nodes: dict[str, Node]  # places and transitions only
    edges: list[Edge]
    width: float
    height: float

    def to_json(self, marking: dict[str, int] | None = None) -> dict[str, Any]:
        marking = marking or {}
        info = {n.id: n for n in (*self.graph.places, *self.graph.transitions)}
        return {
            "bot": self.graph.bot, "width": round(self.width, 1), "height": round(self.height, 1),
            "nodes": [{**asdict(info[n.id]), "kind": n.kind, "shape": "circle" if n.kind == "place" else "box",
                       "x": round(n.x, 1), "y": round(n.y, 1), "width": round(n.width, 1),
                       "height": round(n.height, 1), "column": n.layer,
                       **({"markers": marking.get(n.id, 0)} if n.kind == "place" else {})}
                      for n in self.nodes.values()],
            "edges": [{"source": e.arc.source, "target": e.arc.target, "count": e.arc.count, "back": e.back,
                       "points": [[round(x, 1), round(y, 1)] for x, y in e.points]} for e in self.edges],
        }


def layout(g: Graph) -> Layout:
    nodes: dict[str, Node] = {}
    for p in g.places:
        d = max(44.0, _text_w(p.name) + 18)
        nodes[p.id] = Node(p.id, "place", (p.name,), d, d)
    for t in g.transitions:
        lines = tuple(filter(None, (t.name, t.details())))
        nodes[t.id] = Node(t.id, "transition", lines, max(_text_w(s) for s in lines) + 18, 12 + LINE_H * len(lines))

    order = [n.id for n in nodes.values()]
    reversed_arcs = _back_arcs(order, g.arcs)
    dag = [(a.target, a.source) if a in reversed_arcs else (a.source, a.target) for a in g.arcs]
    _assign_layers(nodes, order, dag)

    # One bend per column an arc crosses; chains[i] runs from arc i's start to its end in column order.
    layers: list[list[str]] = [[] for _ in range(max((n.layer for n in nodes.values()), default=0) + 1)]
    for nid in order:
        layers[nodes[nid].layer].append(nid)
    chains: list[list[str]] = []
    for i, (u, v) in enumerate(dag):
        chain = [u]
        for layer in range(nodes[u].layer + 1, nodes[v].layer):
            bend = Node(f"b{i}_{layer}", "bend", (), 0.0, 0.0, layer)
            nodes[bend.id] = bend
            layers[layer].append(bend.id)
            chain.append(bend.id)
        chains.append(chain + [v])

    _order_columns(layers, chains)
    width, height = _place(nodes, layers, chains)

    edges = []
    for arc, chain in zip(g.arcs, chains):
        back = arc in reversed_arcs
        path = list(reversed(chain)) if back else chain
        pts = [(nodes[n].x, nodes[n].y) for n in path]
        if len(path) == 2 and _twin(arc, g.arcs):  # a place both input and output: bow the two apart
            a, b = nodes[path[0]], nodes[path[1]]
            side = 1 if b.x > a.x else -1  # the bend sits in the gap between the two, not inside either
            x = (a.x + side * a.width / 2 + b.x - side * b.width / 2) / 2
            pts.insert(1, (x, (a.y + b.y) / 2 + (14.0 if back else -14.0)))
        pts[0] = _border(nodes[path[0]], pts[1])
        pts[-1] = _border(nodes[path[-1]], pts[-2])
        edges.append(Edge(arc, pts, back))
    real = {nid: n for nid, n in nodes.items() if n.kind != "bend"}
    return Layout(g, real, edges, width, height)


def _text_w(s: str) -> float:
    return len(s) * CHAR_W


def _twin(arc: Arc, arcs: tuple[Arc, ...]) -> bool:
    return any(a.source == arc.target and a.target == arc.source for a in arcs)


def _back_arcs(order: list[str], arcs: tuple[Arc, ...]) -> set[Arc]:
    """The arcs a depth-first walk finds pointing back into its own path: reversed, they leave no cycle."""
    out: dict[str, list[Arc]] = {nid: [] for nid in order}
    has_input = set()
    for a in arcs:
        out[a.source].append(a)
        has_input.add(a.target)
    state: dict[str, int] = {}  # 1 on the path, 2 done
    back: set[Arc] = set()
    starts = [n for n in order if n not in has_input] + order  # sources first: the net reads from them
    for start in starts:
        if start in state:
            continue
        state[start] = 1
        stack = [(start, iter(out[start]))]
        while stack:
            nid, it = stack[-1]
            arc = next(it, None)
            if arc is None:
                state[nid] = 2
                stack.pop()
            elif state.get(arc.target) == 1:
                back.add(arc)
            elif arc.target not in state:
                state[arc.target] = 1
                stack.append((arc.target, iter(out[arc.target])))
    return back


def _assign_layers(nodes: dict[str, Node], order: list[str], dag: list[tuple[str, str]]) -> None:
    """Longest-path layers over the acyclic arcs; places even, transitions odd. A node nothing leads to
    then moves right, next to the first node it feeds, rather than sending long arcs from column 0."""
    succ: dict[str, list[str]] = {nid: [] for nid in order}
    indeg = dict.fromkeys(order, 0)
    for u, v in dag:
        succ[u].append(v)
        indeg[v] += 1
    sources = [nid for nid in order if indeg[nid] == 0]
    ready = list(sources)
    for nid in ready:
        nodes[nid].layer = 0
    while ready:
        nid = ready.pop(0)
        node = nodes[nid]
        if (node.layer % 2 == 1) != (node.kind == "transition"):
            node.layer += 1
        for nxt in succ[nid]:
            nodes[nxt].layer = max(nodes[nxt].layer, node.layer + 1)
            indeg[nxt] -= 1
            if indeg[nxt] == 0:
                ready.append(nxt)
    for nid in sources:
        if succ[nid]:  # its successors alternate with it, so one column before them keeps the parity
            nodes[nid].layer = min(nodes[m].layer for m in succ[nid]) - 1


def _order_columns(layers: list[list[str]], chains: list[list[str]]) -> None:
    """Barycentre sweeps, left to right then right to left; each column keeps the order of least crossings."""
    left: dict[str, list[str]] = {n: [] for col in layers for n in col}
    right: dict[str, list[str]] = {n: [] for col in layers for n in col}
    for chain in chains:
        for u, v in itertools.pairwise(chain):
            right[u].append(v)
            left[v].append(u)
    best = [list(col) for col in layers]
    best_crossings = _crossings(layers, right)
    for sweep in range(SWEEPS):
        forward = sweep % 2 == 0
        for i in (range(1, len(layers)) if forward else range(len(layers) - 2, -1, -1)):
            fixed = layers[i - 1] if forward else layers[i + 1]
            pos = {n: k for k, n in enumerate(fixed)}
            neighbours = left if forward else right
            key: dict[str, tuple[float, int]] = {}
            for k, n in enumerate(layers[i]):
                ks = [pos[m] for m in neighbours[n]]
                key[n] = (sum(ks) / len(ks) if ks else k, k)  # a node without neighbours there stays put
            layers[i].sort(key=key.__getitem__)
        crossings = _crossings(layers, right)
        if crossings < best_crossings:
            best, best_crossings = [list(col) for col in layers], crossings
    layers[:] = best


def _crossings(layers: list[list[str]], right: dict[str, list[str]]) -> int:
    total = 0
    for i in range(len(layers) - 1):
        pos = {n: k for k, n in enumerate(layers[i + 1])}
        pairs = [(a, pos[b]) for a, n in enumerate(layers[i]) for b in right[n]]
        total += sum(1 for k, (a1, b1) in enumerate(pairs) for a2, b2 in pairs[k + 1:]
                     if (a1 - a2) * (b1 - b2) < 0)
    return total


def _place(nodes: dict[str, Node], layers: list[list[str]], chains: list[list[str]]) -> tuple[float, float]:
    """Coordinates: columns left to right; in each column nodes keep their order, spaced, near their
    neighbours' heights. Returns the drawing's width and height."""
    neighbours: dict[str, list[str]] = {n: [] for col in layers for n in col}
    for chain in chains:
        for u, v in itertools.pairwise(chain):
            neighbours[u].append(v)
            neighbours[v].append(u)

    def gap(a: Node, b: Node) -> float:
        spacing = DUMMY_GAP if "bend" in (a.kind, b.kind) else ROW_GAP
        return (a.height + b.height) / 2 + spacing

    for col in layers:
        y = 0.0
        for k, nid in enumerate(col):
            if k:
                y += gap(nodes[col[k - 1]], nodes[nid])
            nodes[nid].y = y
    for _ in range(6):
        for col in layers:
            wanted = [sum(nodes[m].y for m in neighbours[n]) / len(neighbours[n]) if neighbours[n] else nodes[n].y
                      for n in col]
            ys: list[float] = []
            for k, nid in enumerate(col):  # as wanted, pushed down past the one above
                ys.append(wanted[k] if not k else max(wanted[k], ys[-1] + gap(nodes[col[k - 1]], nodes[nid])))
            shift = sum(w - y for w, y in zip(wanted, ys)) / len(col) if col else 0.0  # re-centre the pushed block
            for nid, y in zip(col, ys):
                nodes[nid].y = y + shift

    top = min((n.y - n.height / 2 for n in nodes.values()), default=0.0)
    x = MARGIN
    for col in layers:
        w = max((nodes[n].width for n in col), default=0.0)
        for nid in col:
            nodes[nid].x = x + w / 2
            nodes[nid].y += MARGIN - top
        x += w + COLUMN_GAP
    width = max(x - COLUMN_GAP + MARGIN, 2 * MARGIN)
    height = max((n.y + n.height / 2 for n in nodes.values()), default=0.0) + MARGIN
    return width, height


def _border(node: Node, toward: tuple[float, float]) -> tuple[float, float]:
    """Where the straight line from ``node``'s centre to ``toward`` leaves its shape."""
    dx, dy = toward[0] - node.x, toward[1] - node.y
    if node.kind == "bend" or (dx == 0 and dy == 0):
        return node.x, node.y
    if node.kind == "place":
        r = node.width / 2
        d = math.hypot(dx, dy)
        return node.x + dx * r / d, node.y + dy * r / d
    t = min(node.width / 2 / abs(dx) if dx else math.inf, node.height / 2 / abs(dy) if dy else math.inf)
    return node.x + dx * t, node.y + dy * t


# --- SVG ------------------------------------------------------------------------------------------------


def svg(lay: Layout, marking: dict[str, int] | None = None) -> str:
    """The laid-out net as a standalone SVG document; hidden (unexposed) nodes are dashed."""
    marking = marking or {}
    info = {n.id: n for n in (*lay.graph.places, *lay.graph.transitions)}
    out = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{lay.width:.0f}" height="{lay.height:.0f}" '
         f'viewBox="0 0 {lay.width:.1f} {lay.height:.1f}" font-family="monospace" font-size="12">'),
        f"<title>{escape(lay.graph.bot)}</title>",
        ('<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" '
         'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#444"/></marker></defs>'),
        '<rect width="100%" height="100%" fill="white"/>',
    ]
    for e in lay.edges:
        d = " ".join(f"{'M' if k == 0 else 'L'}{x:.1f},{y:.1f}" for k, (x, y) in enumerate(e.points))
        out.append(f'<path class="arc" data-source="{e.arc.source}" data-target="{e.arc.target}" d="{d}" '
                   f'fill="none" stroke="#444" stroke-width="1.2" marker-end="url(#arrow)"/>')
        if e.arc.count > 1:  # by the transition's end: a place may feed many, a transition has few inputs
            (x0, y0), (x1, y1) = (e.points[-2], e.points[-1]) if not e.back else (e.points[1], e.points[0])
            out.append(f'<text class="count" x="{(x0 + x1) / 2:.1f}" y="{(y0 + y1) / 2 - 4:.1f}" '
                       f'text-anchor="middle" font-weight="bold">{e.arc.count}</text>')
    for n in lay.nodes.values():
        node = info[n.id]
        dash = "" if node.expose else ' stroke-dasharray="4 3"'
        tip = _fields(node) if isinstance(node, Place) else (node.description or node.name)
        out.append(f'<g class="{n.kind}" id="{n.id}"><title>{escape(tip)}</title>')
        if isinstance(node, Place):
            count = marking.get(n.id, 0)
            fill = "#fff3c4" if count else "#f4f7fb"
            out.append(f'<circle cx="{n.x:.1f}" cy="{n.y:.1f}" r="{n.width / 2:.1f}" fill="{fill}" '
                       f'stroke="#2b4c7e" stroke-width="1.5"{dash}/>')
            out.append(_text(n.x, n.y - (6 if count else -4), node.name))
            if count:
                out.append(_text(n.x, n.y + 12, str(count), 'class="markers" font-weight="bold" font-size="14"'))
        else:
            out.append(f'<rect x="{n.x - n.width / 2:.1f}" y="{n.y - n.height / 2:.1f}" width="{n.width:.1f}" '
                       f'height="{n.height:.1f}" rx="3" fill="#eef6ee" stroke="#2e6b34" stroke-width="1.5"{dash}/>')
            first = n.y - LINE_H * (len(n.lines) - 1) / 2 + 4
            for k, line in enumerate(n.lines):
                out.append(_text(n.x, first + k * LINE_H, line, "" if k == 0 else 'fill="#555" font-size="10"'))
        out.append("</g>")
    return "\n".join(out + ["</svg>"]) + "\n"


def _text(x: float, y: float, s: str, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle"{" " + extra if extra else ""}>{escape(s)}</text>'


# --- in a notebook --------------------------------------------------------------------------------------


class Picture:
    """What ``Bot.visualize()`` returns: ``str()`` is the text; Jupyter shows the SVG (``_repr_svg_``) or
    the Mermaid chart (``_repr_markdown_``, a fenced ``mermaid`` block)."""

    def __init__(self, text: str, fmt: Format) -> None:
        self.text = text
        self.format = fmt

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"<petribus {self.format} picture, {len(self.text)} characters>"

    def _repr_svg_(self) -> str | None:
        return self.text if self.format == "svg" else None

    def _repr_markdown_(self) -> str | None:
        return f"```mermaid\n{self.text}```\n" if self.format == "mermaid" else None

    def _repr_json_(self) -> Any:
        return json.loads(self.text) if self.format == "json" else None
