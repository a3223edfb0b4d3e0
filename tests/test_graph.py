"""The net as a picture (``petribus.graph``, ``petribus graph``, ``Bot.visualize``): every format holds
every place, transition and arc with its count; the SVG is well-formed, its nodes do not overlap and
every arc runs from its source's border to its target's."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydantic import BaseModel, create_model
from typer.testing import CliRunner

from petribus import Bot, BotLocation
from petribus.errors import UnknownLocation
from petribus.graph import FORMATS, graph_of, layout, render
from petribus.loader import load_net
from petribus.net import Net
from petribus_cli.main import app as cli_app

ORDER_BOT = f"{Path(__file__).parent.parent / 'examples' / 'order_bot.py'}:bot"
SVG = "{http://www.w3.org/2000/svg}"


def generated_net(transitions: int = 50, seed: int = 7) -> Net:
    """A net of ``transitions`` transitions over 40 places, flowing mostly forward like a real pipeline:
    fan-outs, joins with counts, and every seventh transition feeding an earlier place (a cycle)."""
    rng = random.Random(seed)
    models = [create_model(f"P{i}", v=(int, 0)) for i in range(40)]
    bot = Bot(name="big", locations=[BotLocation(marker=m, expose=i % 7 != 3) for i, m in enumerate(models)])
    for k in range(transitions):
        at = k * 36 // transitions
        ins = rng.sample(models[max(0, at - 3):at + 1], min(at + 1, rng.choice((1, 1, 2, 3))))
        later = models[at + 1:at + 6] if k % 7 else models[max(0, at - 6):at]
        outs = rng.sample(later, min(len(later), rng.choice((0, 1, 1, 2))))
        bot.transition(lambda inputs: {}, name=f"t_{k}", inputs={m: rng.choice((1, 1, 2, 5)) for m in ins},
                       outputs=outs, confirm=k % 11 == 0, concurrency=4 if k % 9 == 0 else None)
    return bot.net()


NETS = {"order_bot": lambda: load_net(ORDER_BOT), "generated": generated_net}


def expected_arcs(net: Net) -> set[tuple[str, str, int]]:
    """(from, to, count) by name: inputs carry their count, outputs 1."""
    arcs = set()
    for t in net.transitions:
        arcs |= {(loc, t.name, n) for loc, n in t.inputs} | {(t.name, loc, 1) for loc in t.outputs}
    return arcs


@pytest.fixture(params=sorted(NETS))
def net(request) -> Net:
    return NETS[request.param]()


# --- text formats -------------------------------------------------------------------------------------


def test_mermaid_holds_every_place_transition_and_arc_with_its_count(net: Net) -> None:
    text = render(net, "mermaid")
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"

    places = dict(re.findall(r'^\s+(\w+)\(\("([^"<]+)', text, re.MULTILINE))
    boxes = dict(re.findall(r'^\s+(\w+)\["([^"<]+)', text, re.MULTILINE))
    arcs = {(a, b, int(n or 1)) for a, n, b in re.findall(r"^\s+(\w+) -->(?:\|(\d+)\|)? (\w+)$", text, re.MULTILINE)}
    names = places | boxes

    assert sorted(places.values()) == sorted(net.locations)
    assert sorted(boxes.values()) == sorted(t.name for t in net.transitions)
    assert {(names[a], names[b], n) for a, b, n in arcs} == expected_arcs(net)
    assert len(arcs) == sum(len(t.inputs) + len(t.outputs) for t in net.transitions)


def test_dot_holds_every_place_transition_and_arc_with_its_count(net: Net) -> None:
    text = render(net, "dot")
    assert text.startswith(f'digraph "{net.bot}" {{') and text.rstrip().endswith("}")

    nodes = {nid: (shape, label.split("\\n")[0])
             for nid, shape, label in re.findall(r'^\s+(\w+) \[shape="(\w+)", label="([^"]*)"', text, re.MULTILINE)}
    arcs = {(a, b, int(n or 1)) for a, b, n in re.findall(r'^\s+(\w+) -> (\w+)(?: \[label="(\d+)"\])?;$', text, re.MULTILINE)}

    assert sorted(label for shape, label in nodes.values() if shape == "circle") == sorted(net.locations)
    assert sorted(label for shape, label in nodes.values() if shape == "box") == sorted(t.name for t in net.transitions)
    assert {(nodes[a][1], nodes[b][1], n) for a, b, n in arcs} == expected_arcs(net)


def test_marking_is_drawn_in_its_places_and_an_unknown_location_is_refused() -> None:
    net = load_net(ORDER_BOT)
    assert '(("UserName<br/>● 3"))' in render(net, "mermaid", {"UserName": 3})
    assert 'label="OrderStatus\\n● 1"' in render(net, "dot", {"OrderStatus": 1})
    shown = ET.fromstring(render(net, "svg", {"RefundStatus": 2}))
    [group] = [g for g in shown.iter(f"{SVG}g") if g.findtext(f"{SVG}text") == "RefundStatus"]
    assert [t.text for t in group.iter(f"{SVG}text") if t.get("class") == "markers"] == ["2"]
    laid = json.loads(render(net, "json", {"UserName": 1}))
    assert {n["name"]: n["markers"] for n in laid["nodes"] if n["kind"] == "place"} == {
        "UserName": 1, "OrderStatus": 0, "RefundStatus": 0}

    with pytest.raises(UnknownLocation, match="'Nope'.*UserName"):
        render(net, "svg", {"Nope": 1})


def test_unexposed_nodes_and_transition_options_are_shown() -> None:
    net = generated_net()
    text = render(net, "mermaid")
    hidden = {loc for loc, d in net.locations.items() if not d.expose}
    [classes] = re.findall(r"^\s+class ([\w,]+) hidden$", text, re.MULTILINE)
    ids = dict(re.findall(r'^\s+(\w+)\(\("([^"<]+)', text, re.MULTILINE))
    assert {ids[i] for i in classes.split(",")} == hidden
    assert '["t_0<br/>confirm · max 4"]' in text


# --- SVG and its layout -------------------------------------------------------------------------------


def _shapes(root: ET.Element) -> dict[str, tuple[str, float, float, float, float]]:
    """Node id -> (kind, centre x, centre y, half width, half height), read back from the SVG."""
    out = {}
    for g in root.iter(f"{SVG}g"):
        circle, rect = g.find(f"{SVG}circle"), g.find(f"{SVG}rect")
        if circle is not None:
            r = float(circle.get("r"))
            out[g.get("id")] = ("place", float(circle.get("cx")), float(circle.get("cy")), r, r)
        else:
            w, h = float(rect.get("width")), float(rect.get("height"))
            out[g.get("id")] = ("transition", float(rect.get("x")) + w / 2, float(rect.get("y")) + h / 2, w / 2, h / 2)
    return out


def _on_border(shape: tuple[str, float, float, float, float], x: float, y: float) -> bool:
    kind, cx, cy, hw, hh = shape
    if kind == "place":
        return abs(math.hypot(x - cx, y - cy) - hw) < 0.5
    inside = abs(x - cx) <= hw + 0.5 and abs(y - cy) <= hh + 0.5
    return inside and (abs(abs(x - cx) - hw) < 0.5 or abs(abs(y - cy) - hh) < 0.5)


def test_svg_is_well_formed_one_group_per_node_none_overlapping(net: Net) -> None:
    root = ET.fromstring(render(net, "svg"))
    shapes = _shapes(root)
    groups = list(root.iter(f"{SVG}g"))

    assert root.tag == f"{SVG}svg"
    assert sorted(g.findtext(f"{SVG}text") for g in groups if g.get("class") == "place") == sorted(net.locations)
    assert sorted(g.findtext(f"{SVG}text") for g in groups if g.get("class") == "transition") == sorted(
        t.name for t in net.transitions)
    assert len(groups) == len(shapes) == len(net.locations) + len(net.transitions)
    for (a, sa), (b, sb) in itertools.combinations(shapes.items(), 2):
        apart = abs(sa[1] - sb[1]) >= sa[3] + sb[3] or abs(sa[2] - sb[2]) >= sa[4] + sb[4]
        assert apart, f"{a} and {b} overlap"
    width, height = float(root.get("width")), float(root.get("height"))
    assert all(0 <= x - hw and x + hw <= width and 0 <= y - hh and y + hh <= height
               for _, x, y, hw, hh in shapes.values())


def test_every_svg_arc_runs_from_its_source_border_to_its_target_border(net: Net) -> None:
    root = ET.fromstring(render(net, "svg"))
    shapes = _shapes(root)
    paths = [p for p in root.iter(f"{SVG}path") if p.get("class") == "arc"]

    assert len(paths) == sum(len(t.inputs) + len(t.outputs) for t in net.transitions)
    for p in paths:
        points = [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", p.get("d"))]
        assert p.get("marker-end") == "url(#arrow)"
        assert _on_border(shapes[p.get("data-source")], *points[0]), p.attrib
        assert _on_border(shapes[p.get("data-target")], *points[-1]), p.attrib
    counts = sorted(int(t.text) for t in root.iter(f"{SVG}text") if t.get("class") == "count")
    assert counts == sorted(n for t in net.transitions for _, n in t.inputs if n > 1)


def test_json_is_the_svgs_layout_for_a_browser_to_draw(net: Net) -> None:
    laid = json.loads(render(net, "json"))
    shapes = _shapes(ET.fromstring(render(net, "svg")))

    nodes = {n["id"]: n for n in laid["nodes"]}
    assert {(n["kind"], n["name"]) for n in laid["nodes"]} == (
        {("place", loc) for loc in net.locations} | {("transition", t.name) for t in net.transitions})
    for nid, (kind, x, y, hw, hh) in shapes.items():
        n = nodes[nid]
        assert n["kind"] == kind and (n["x"], n["y"]) == pytest.approx((x, y), abs=0.2)
        assert (n["width"], n["height"]) == pytest.approx((2 * hw, 2 * hh), abs=0.3)
    names = {n["id"]: n["name"] for n in laid["nodes"]}
    assert {(names[e["source"]], names[e["target"]], e["count"]) for e in laid["edges"]} == expected_arcs(net)
    for e in laid["edges"]:
        assert _on_border(shapes[e["source"]], *e["points"][0]) and _on_border(shapes[e["target"]], *e["points"][-1])


def test_places_and_transitions_alternate_in_columns_left_to_right() -> None:
    lay = layout(graph_of(generated_net()))
    for arc in lay.graph.arcs:
        source, target = lay.nodes[arc.source], lay.nodes[arc.target]
        assert source.layer != target.layer
    assert {n.layer % 2 for n in lay.nodes.values() if n.kind == "place"} == {0}
    assert {n.layer % 2 for n in lay.nodes.values() if n.kind == "transition"} == {1}
    forward = [e for e in lay.edges if not e.back]
    assert len(forward) > len(lay.edges) // 2
    assert all(e.points[0][0] < e.points[-1][0] for e in forward)


def _segments_cross(p: tuple, q: tuple, r: tuple, s: tuple) -> bool:
    def side(a: tuple, b: tuple, c: tuple) -> float:
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return side(p, q, r) * side(p, q, s) < 0 and side(r, s, p) * side(r, s, q) < 0


def test_columns_are_ordered_so_that_arcs_declared_crosswise_do_not_cross() -> None:
    class A(BaseModel):
        pass

    class B(BaseModel):
        pass

    class OutA(BaseModel):
        pass

    class OutB(BaseModel):
        pass

    bot = Bot(name="crosswise", locations=[BotLocation(marker=m) for m in (A, B, OutB, OutA)])
    bot.transition(lambda inputs: {}, name="from_b", inputs={B: 1}, outputs=[OutA])
    bot.transition(lambda inputs: {}, name="from_a", inputs={A: 1}, outputs=[OutB])
    lay = layout(graph_of(bot.net()))

    segments = [(e.points[k], e.points[k + 1]) for e in lay.edges for k in range(len(e.points) - 1)]
    assert not any(_segments_cross(*s, *t) for s, t in itertools.combinations(segments, 2))


def test_a_place_that_is_input_and_output_of_one_transition_gets_two_separate_arcs() -> None:
    class Count(BaseModel):
        n: int

    bot = Bot(name="loop", locations=[BotLocation(marker=Count)])
    bot.transition(lambda inputs: {}, name="tick_with_a_long_name_and_options", inputs={Count: 2},
                   outputs=[Count], confirm=True, concurrency=2)
    lay = layout(graph_of(bot.net()))

    there, back = sorted(lay.edges, key=lambda e: e.back)
    assert (there.arc.source, back.arc.source) == ("p0", "t0") and back.back
    assert there.points[1] != back.points[1]  # bowed apart, not drawn on top of each other
    place, box = lay.nodes["p0"], lay.nodes["t0"]
    for e in lay.edges:  # the bend lies between the two, outside both
        assert place.x + place.width / 2 < e.points[1][0] < box.x - box.width / 2


# --- the command and the notebook ---------------------------------------------------------------------


def graph_cli(*args: str):
    return CliRunner().invoke(cli_app, ["graph", *args])


def test_command_prints_mermaid_by_default() -> None:
    done = graph_cli(ORDER_BOT)
    assert done.exit_code == 0, done.output
    assert done.output == render(load_net(ORDER_BOT), "mermaid")


@pytest.mark.parametrize("fmt", FORMATS)
def test_command_writes_each_format_to_a_file(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"net.{fmt}"
    done = graph_cli(ORDER_BOT, "--format", fmt, "--output", str(out))
    assert done.exit_code == 0, done.output
    assert out.read_text() == render(load_net(ORDER_BOT), fmt)  # type: ignore[arg-type]
    assert str(out) in done.output


def test_command_refuses_an_unknown_format_and_a_bad_app(tmp_path: Path) -> None:
    bad_format = graph_cli(ORDER_BOT, "--format", "png")
    missing = graph_cli(str(tmp_path / "nope.py:bot"))
    (tmp_path / "broken.py").write_text("from petribus import Bot\nbot = Bot(name='broken')\n"
                                        "@bot.transition(inputs={})\ndef t(inputs): pass\n")
    broken = graph_cli(f"{tmp_path / 'broken.py'}:bot")

    assert bad_format.exit_code == 2 and "png" in bad_format.output and "mermaid" in bad_format.output
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert broken.exit_code == 2 and "has no inputs" in broken.output


def test_command_refuses_an_unwritable_output(tmp_path: Path) -> None:
    done = graph_cli(ORDER_BOT, "--output", str(tmp_path / "no" / "such" / "dir" / "x.svg"))
    assert done.exit_code == 1 and "cannot write" in done.output


def test_visualize_shows_in_a_notebook() -> None:
    from petribus.loader import load_bot

    bot = load_bot(ORDER_BOT)
    picture = bot.visualize(marking={"UserName": 1})
    chart = bot.visualize(format="mermaid")

    assert ET.fromstring(picture._repr_svg_()).tag == f"{SVG}svg"
    assert str(picture) == render(bot.net(), "svg", {"UserName": 1})
    assert picture._repr_markdown_() is None
    assert chart._repr_markdown_() == f"```mermaid\n{chart}```\n" and chart._repr_svg_() is None
    with pytest.raises(ValueError, match="formats are mermaid, dot, svg, json"):
        bot.visualize(format="png")


def test_visualize_draws_a_bot_made_in_a_notebook_before_it_has_a_name() -> None:
    class Note(BaseModel):
        text: str

    bot = Bot(locations=[BotLocation(marker=Note)])
    bot.transition(lambda inputs: {}, name="read", inputs={Note: 1})

    assert ET.fromstring(bot.visualize()._repr_svg_()).findtext(f"{SVG}title") == "bot"
    assert bot.name is None
