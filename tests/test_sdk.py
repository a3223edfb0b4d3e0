"""The SDK: ``@bot.transition`` records, ``Bot.net()`` judges the whole net at once and freezes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation, NetDefinitionError
from petribus.errors import AppLoadError, InvalidInput, UnknownLocation
from petribus.loader import load_bot

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class Order(BaseModel):
    """An order to cancel."""

    id: int
    items: list[str] = []


class Status(BaseModel):
    message: str


class Address(BaseModel):
    street: str
    zip: int


class Customer(BaseModel):
    name: str
    address: Address
    tags: list[int]
    score: float


class Stray(BaseModel):
    """A model with no location in the bot."""

    x: int


def make_bot(**kw: Any) -> Bot:
    kw.setdefault("name", "shop")
    kw.setdefault("locations", [BotLocation(marker=Order), BotLocation(marker=Status),
                                BotLocation(marker=Customer, expose=False)])
    return Bot(**kw)


def problems_of(bot: Bot) -> list[str]:
    with pytest.raises(NetDefinitionError) as info:
        bot.net()
    return info.value.problems


def one_problem(bot: Bot, *needles: str) -> str:
    """The net has exactly one problem and its message names every needle."""
    problems = problems_of(bot)
    assert len(problems) == 1, problems
    for needle in needles:
        assert needle in problems[0], (needle, problems[0])
    return problems[0]


def with_transition(**options: Any) -> Bot:
    bot = make_bot()
    options.setdefault("inputs", {Order: 1})
    options.setdefault("outputs", [Status])

    @bot.transition(**options)
    def cancel(inputs):
        return {}

    return bot


# --- every problem is reported -------------------------------------------------------------------


def test_input_model_without_location_is_named():
    one_problem(with_transition(inputs={Stray: 1}), "cancel", "Stray", "no location", "BotLocation(marker=Stray)")


def test_input_that_is_not_a_model_is_named():
    one_problem(with_transition(inputs={str: 1}), "cancel", "str", "not a marker type")


def test_output_model_without_location_is_named():
    one_problem(with_transition(outputs=[Status, Stray]), "cancel", "outputs", "Stray", "no location")


def test_output_that_is_not_a_model_is_named():
    one_problem(with_transition(outputs=[Status, "Status"]), "cancel", "outputs", "'Status'", "not a marker type")


def test_unhashable_output_is_a_problem_not_a_crash():
    one_problem(with_transition(outputs=[[Status]]), "cancel", "outputs", "not a marker type")


def test_outputs_that_are_not_a_list_are_named():
    one_problem(with_transition(outputs=Status), "cancel", "outputs must be a list")


def test_duplicate_transition_names_are_named():
    bot = make_bot()

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def cancel(inputs):
        return {}

    @bot.transition(inputs={Order: 1}, outputs=[Status], name="cancel")
    def cancel_again(inputs):
        return {}

    one_problem(bot, "'cancel'", "declared twice")


def test_duplicate_locations_are_named():
    bot = make_bot(locations=[BotLocation(marker=Order), BotLocation(marker=Order), BotLocation(marker=Status)])
    one_problem(bot, "'Order'", "declared twice")


def test_location_that_is_not_a_model_is_named():
    bot = make_bot(locations=[BotLocation(marker=Order), BotLocation(marker=dict)])  # type: ignore[arg-type]
    one_problem(bot, "locations[1]", "not a pydantic BaseModel")


@pytest.mark.parametrize("inputs", [{}, None])
def test_empty_inputs_are_named(inputs):
    one_problem(with_transition(inputs=inputs), "cancel", "no inputs")


@pytest.mark.parametrize("count", [0, -1, 1.5, True, "1"])
def test_bad_input_count_is_named(count):
    one_problem(with_transition(inputs={Order: count}), "cancel", "count for Order", repr(count), ">= 1")


@pytest.mark.parametrize("option, value", [
    ("cpu", 0), ("cpu", -1), ("cpu", True), ("cpu", "2"), ("cpu", float("nan")), ("cpu", float("inf")),
    ("memory", 0), ("memory", -128), ("memory", 1.5), ("memory", True), ("memory", "128 bytes"),
    ("timeout", 0), ("timeout", -5), ("timeout", True), ("timeout", "10"), ("timeout", float("nan")),
    ("retries", -1), ("retries", 1.5), ("retries", True),
    ("concurrency", 0), ("concurrency", -1), ("concurrency", 2.0), ("concurrency", True),
])
def test_bad_resource_option_is_named_with_its_value(option, value):
    one_problem(with_transition(**{option: value}), "cancel", f"{option}={value!r}")


def test_whole_numbered_float_memory_is_accepted():
    assert with_transition(memory=256.0).net().transitions[0].memory == 256


def test_uncallable_guard_and_unknown_sandbox_are_named():
    problems = problems_of(with_transition(when=True, sandbox="vm"))
    assert len(problems) == 2, problems
    assert any("when=True" in p for p in problems)
    assert any("sandbox='vm'" in p for p in problems)


def test_transition_with_too_many_parameters_is_named():
    bot = make_bot()

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def cancel(context, inputs, extra):
        return {}

    one_problem(bot, "cancel", "['inputs', 'extra']", "(context, inputs)")


def test_transition_with_no_parameter_for_its_inputs_is_named():
    bot = make_bot()

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def cancel(context):
        return {}

    one_problem(bot, "cancel", "no parameter for its inputs")


def test_context_after_inputs_is_named():
    bot = make_bot()

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def cancel(inputs, context):
        return {}

    one_problem(bot, "cancel", "'context' must be the first parameter")


def test_bot_without_a_name_is_named():
    bot = make_bot(name=None)

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def cancel(inputs):
        return {}

    one_problem(bot, "no name")


def test_five_problems_are_all_reported_at_once():
    bot = make_bot(locations=[BotLocation(marker=Order), BotLocation(marker=Status), BotLocation(marker=Order)])

    @bot.transition(inputs={Stray: 1}, outputs=[Status])  # 2: input without a location
    def first(inputs):
        return {}

    @bot.transition(inputs={Order: 0}, outputs=[Status])  # 3: bad count
    def second(inputs):
        return {}

    @bot.transition(inputs={Order: 1}, outputs=[Status], cpu=-1)  # 4: bad cpu
    def third(inputs):
        return {}

    @bot.transition(inputs={Order: 1}, outputs=[Status], name="third")  # 5: duplicate name
    def fourth(inputs):
        return {}

    with pytest.raises(NetDefinitionError) as info:
        bot.net()
    problems = info.value.problems
    expected = [
        ("'Order'", "declared twice"),
        ("'first'", "Stray", "no location"),
        ("'second'", "count for Order is 0"),
        ("'third'", "cpu=-1"),
        ("'third'", "declared twice"),
    ]
    assert len(problems) == len(expected), problems
    for needles in expected:
        assert any(all(n in p for n in needles) for p in problems), (needles, problems)
    message = str(info.value)
    assert "5 problem(s)" in message
    assert all(p in message for p in problems)
    assert isinstance(info.value, ValueError) and info.value.code == "net_definition"


def test_decorator_only_records():
    bot = make_bot()

    @bot.transition(inputs={Stray: 0}, outputs="nonsense", cpu=-1)
    def broken(inputs):
        return {}

    assert broken.__name__ == "broken"  # the function is returned unchanged, nothing raised yet
    with pytest.raises(NetDefinitionError):
        bot.net()


# --- a valid net ---------------------------------------------------------------------------------


def test_sync_and_async_transitions_are_both_accepted():
    bot = make_bot()

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def sync_one(inputs):
        return {}

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    async def async_one(inputs):
        return {}

    net = bot.net()
    assert net.transition("sync_one").is_async is False
    assert net.transition("async_one").is_async is True


def test_context_is_detected_by_name_and_by_annotation():
    bot = make_bot()

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def by_name(context, inputs):
        return {}

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def by_annotation(ctx: BotContext, inputs):
        return {}

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def without(inputs):
        return {}

    net = bot.net()
    assert net.transition("by_name").wants_context
    assert net.transition("by_annotation").wants_context
    assert not net.transition("without").wants_context


def test_description_comes_from_the_docstring_unless_given():
    bot = make_bot()

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def documented(inputs):
        """Cancels the order.

        More detail.
        """
        return {}

    @bot.transition(inputs={Order: 1}, outputs=[Status], description="Given.")
    def described(inputs):
        """Ignored."""
        return {}

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def bare(inputs):
        return {}

    net = bot.net()
    assert net.transition("documented").description == "Cancels the order.\n\nMore detail."
    assert net.transition("described").description == "Given."
    assert net.transition("bare").description is None


def test_location_description_is_the_models_own_docstring_only():
    net = with_transition().net()
    assert net.locations["Order"].description == "An order to cancel."
    assert net.locations["Status"].description is None  # not pydantic's BaseModel docstring


def test_gpu_transition_goes_to_its_types_gpu_pool():
    bot = make_bot()

    @bot.transition(inputs={Order: 1}, outputs=[Status], gpu="A100")
    def on_gpu(inputs):
        return {}

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def on_cpu(inputs):
        return {}

    net = bot.net()
    assert (net.transition("on_gpu").pool, net.transition("on_gpu").gpu) == ("gpu-a100", "A100")
    assert (net.transition("on_cpu").pool, net.transition("on_cpu").gpu) == ("cpu", None)


def test_transition_definition_keeps_its_options():
    bot = make_bot()

    @bot.transition(inputs={Order: 2, Customer: 1}, outputs=[Status, Status], cpu=0.5, memory=512,
                    timeout=30, retries=2, concurrency=4, confirm=True, expose=False)
    def combine(context, inputs):
        return {}

    t = bot.net().transition("combine")
    assert t.inputs == (("Order", 2), ("Customer", 1))
    assert t.outputs == ("Status",)
    assert (t.cpu, t.memory, t.timeout, t.retries, t.concurrency) == (0.5, 512, 30, 2, 4)
    assert t.confirm and not t.expose


def test_net_is_frozen_and_cached_until_the_bot_changes():
    bot = with_transition()
    net = bot.net()
    assert bot.net() is net
    with pytest.raises(dataclasses.FrozenInstanceError):
        net.bot = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        net.transitions[0].cpu = 8  # type: ignore[misc]
    assert isinstance(net.transitions, tuple)

    @bot.transition(inputs={Order: 1}, outputs=[Status])
    def later(inputs):
        return {}

    rebuilt = bot.net()
    assert rebuilt is not net and rebuilt.has_transition("later")


def test_shape_is_what_the_core_needs():
    bot = make_bot()

    @bot.transition(inputs={Order: 1, Customer: 2}, outputs=[Status], concurrency=3, confirm=True)
    def pair(inputs):
        return {}

    (shape,) = bot.net().shape().transitions
    assert (shape.name, shape.inputs, shape.concurrency, shape.confirm) == (
        "pair", (("Order", 1), ("Customer", 2)), 3, True)


# --- marker validation ---------------------------------------------------------------------------


def test_validate_marker_keeps_real_types():
    net = with_transition().net()
    data = net.validate_marker("Customer", {
        "name": "ada", "address": {"street": "Main", "zip": 12345}, "tags": [1, 2, 3], "score": 2.5,
    })
    assert data == {"name": "ada", "address": {"street": "Main", "zip": 12345}, "tags": [1, 2, 3], "score": 2.5}
    assert type(data["address"]["zip"]) is int
    assert type(data["tags"]) is list and all(type(t) is int for t in data["tags"])
    assert type(data["score"]) is float


def test_validate_marker_fills_defaults():
    net = with_transition().net()
    assert net.validate_marker("Order", {"id": 7}) == {"id": 7, "items": []}


def test_validate_marker_rejects_unknown_location():
    net = with_transition().net()
    with pytest.raises(UnknownLocation) as info:
        net.validate_marker("Refund", {"x": 1})
    assert "'Refund'" in str(info.value) and "Order" in str(info.value)


def test_validate_marker_rejects_unexposed_location_when_asked():
    net = with_transition().net()
    good = {"name": "a", "address": {"street": "s", "zip": 1}, "tags": [], "score": 0}
    assert net.validate_marker("Customer", good)["name"] == "a"
    with pytest.raises(UnknownLocation) as info:
        net.validate_marker("Customer", good, exposed_only=True)
    assert "Customer" not in str(info.value).split(";")[1]  # the hint lists only exposed locations


@pytest.mark.parametrize("data, field", [
    ({"name": "a", "address": {"street": "s", "zip": "not a zip"}, "tags": [], "score": 1}, "address.zip"),
    ({"name": "a", "address": {"street": "s", "zip": 1}, "tags": ["x"], "score": 1}, "tags.0"),
    ({"address": {"street": "s", "zip": 1}, "tags": [], "score": 1}, "name"),
])
def test_validate_marker_rejects_invalid_data_naming_the_field(data, field):
    net = with_transition().net()
    with pytest.raises(InvalidInput) as info:
        net.validate_marker("Customer", data)
    assert f"{field}:" in str(info.value) and "Customer" in str(info.value)


def test_validate_marker_rejects_data_that_is_not_an_object():
    net = with_transition().net()
    with pytest.raises(InvalidInput, match="JSON object"):
        net.validate_marker("Order", [1, 2])


# --- loading -------------------------------------------------------------------------------------


def test_load_bot_names_the_bot_after_its_file():
    bot = load_bot(f"{EXAMPLES / 'order_bot.py'}:bot")
    net = bot.net()
    assert net.bot == "order_bot"
    assert [t.name for t in net.transitions] == ["cancel_order", "offer_refund"]
    assert all(t.wants_context for t in net.transitions)
    assert set(net.locations) == {"UserName", "OrderStatus", "RefundStatus"}


def test_load_bot_defaults_to_the_bot_attribute():
    assert load_bot(str(EXAMPLES / "order_bot.py")).net().bot == "order_bot"


def test_load_bot_with_missing_file_says_so(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(AppLoadError, match="does not exist") as info:
        load_bot(f"{missing}:bot")
    assert str(missing) in str(info.value)


def test_load_bot_with_missing_attribute_says_what_to_write():
    with pytest.raises(AppLoadError, match="'robot' is missing, not a petribus Bot"):
        load_bot(f"{EXAMPLES / 'order_bot.py'}:robot")


def test_load_bot_with_unimportable_module_names_it():
    with pytest.raises(AppLoadError, match="cannot import 'no_such_petribus_app'"):
        load_bot("no_such_petribus_app:bot")


def test_two_app_files_with_one_name_are_two_modules(tmp_path):
    """``a/bot.py`` and ``b/bot.py`` each get their own module (they once shared the first one's)."""
    for folder, name in (("a", "alpha"), ("b", "beta")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "bot.py").write_text(
            "from petribus import Bot\n"
            f"bot = Bot(name={name!r}, locations=[], description='x')\n")
    first, second = load_bot(f"{tmp_path / 'a' / 'bot.py'}:bot"), load_bot(f"{tmp_path / 'b' / 'bot.py'}:bot")
    assert (first.name, second.name) == ("alpha", "beta")
    assert load_bot(f"{tmp_path / 'a' / 'bot.py'}:bot") is first  # the same file is imported once


def test_an_app_that_failed_to_import_is_imported_again(tmp_path):
    app = tmp_path / "flaky_app.py"
    app.write_text("raise RuntimeError('not yet')\n")
    with pytest.raises(AppLoadError, match="not yet"):
        load_bot(f"{app}:bot")
    app.write_text("from petribus import Bot\nbot = Bot(name='flaky', locations=[], description='x')\n")
    assert load_bot(f"{app}:bot").name == "flaky"


def test_a_file_that_is_not_python_is_named_as_such(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# not an app\n")
    with pytest.raises(AppLoadError, match="is not a Python module") as info:
        load_bot(f"{readme}:bot")
    assert "README.md" in str(info.value) and "app.py:bot" in str(info.value)


def test_a_folder_named_as_the_app_is_named_as_such(tmp_path):
    with pytest.raises(AppLoadError, match="is a folder, not a Python module") as info:
        load_bot(f"{tmp_path}:bot")
    assert "app.py:bot" in str(info.value)


def test_settings_refuse_a_port_out_of_range():
    from pydantic import ValidationError

    from petribus.settings import Settings

    with pytest.raises(ValidationError, match="65535"):
        Settings(port=99999)
