"""Beam's transition and bot options, with Beam's names: each judged by ``Bot.net()``, each problem
naming the option, its value and what to do; options petribus does not implement are refused, never
ignored."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import petribus
from petribus import Bot, BotLocation, Image, TaskPolicy, Volume

from .test_sdk import one_problem, problems_of


class A(BaseModel):
    x: int = 0


class B(BaseModel):
    y: int = 0


def make_bot(**kw: Any) -> Bot:
    kw.setdefault("name", "beamish")
    kw.setdefault("locations", [BotLocation(marker=A), BotLocation(marker=B)])
    return Bot(**kw)


def with_transition(**options: Any) -> Bot:
    bot = make_bot()
    options.setdefault("inputs", {A: 1})
    options.setdefault("outputs", [B])

    @bot.transition(**options)
    def step(inputs):
        return {}

    return bot


def built(**options: Any) -> petribus.net.TransitionDef:
    return with_transition(**options).net().transition("step")


# --- a Beam bot, as Beam's docs write it ---------------------------------------------------------


def test_beam_shaped_transition_builds_the_right_definition():
    bot = make_bot()

    @bot.transition(inputs={A: 1}, outputs=[B], cpu=2, memory=512, gpu="A10G", secrets=["API_TOKEN"],
                    callback_url="https://example.com/hook",
                    task_policy=TaskPolicy(max_retries=2, timeout=30, ttl=600),
                    image=Image(python_packages=["requests"]))
    def fetch(inputs):
        return {}

    t = bot.net().transition("fetch")
    assert (t.cpu, t.memory) == (2.0, 512)
    assert (t.gpu, t.gpu_count, t.pool) == ("A10G", 1, "gpu-a10g")
    assert t.secrets == ("API_TOKEN",)
    assert t.callback_url == "https://example.com/hook"
    assert (t.retries, t.timeout, t.ttl) == (2, 30, 600.0)
    assert isinstance(t.image, Image) and tuple(t.image.python_packages) == ("requests",)
    assert t.python_packages == ("requests",)
    assert t.sandbox == "container"  # an image exists only in a container
    assert t.network is False


def test_sdk_exports_beams_resource_classes():
    assert {"Image", "Volume", "TaskPolicy"} <= set(petribus.__all__)
    assert petribus.Image is Image and petribus.Volume is Volume and petribus.TaskPolicy is TaskPolicy


def test_defaults_are_a_cpu_process_transition_with_nothing_extra():
    t = built()
    assert (t.cpu, t.memory, t.gpu, t.gpu_count, t.pool) == (1.0, 128, None, 0, "cpu")
    assert (t.image, t.python_packages, t.secrets, t.network, t.callback_url) == (None, (), (), False, None)
    assert (t.retries, t.timeout, t.ttl, t.sandbox) == (0, None, None, "process")


# --- cpu and memory, with Beam's strings -----------------------------------------------------------


@pytest.mark.parametrize("cpu, cores", [(2, 2.0), (0.5, 0.5), ("500m", 0.5), ("2000m", 2.0)])
def test_cpu_takes_cores_or_beams_millicores(cpu, cores):
    assert built(cpu=cpu).cpu == cores


@pytest.mark.parametrize("cpu", ["0m", "1.5m", "two", "2", None, [1]])
def test_bad_cpu_is_named_with_its_value(cpu):
    one_problem(with_transition(cpu=cpu), "'step'", f"cpu={cpu!r}", "'500m'")


@pytest.mark.parametrize("memory, mib", [(512, 512), ("512", 512), ("512Mi", 512), ("2Gi", 2048), ("1GB", 1000),
                                         ("1.5gi", 1536)])
def test_memory_takes_mib_or_beams_size_strings(memory, mib):
    assert built(memory=memory).memory == mib


@pytest.mark.parametrize("memory", ["2TB", "lots", "", "-1Gi", 0, None])
def test_bad_memory_is_named_with_its_value(memory):
    one_problem(with_transition(memory=memory), f"memory={memory!r}", "'2Gi'")


# --- gpu, gpu_count and pool -----------------------------------------------------------------------


@pytest.mark.parametrize("gpu, expected", [
    ("A10G", ("A10G", 1, "gpu-a10g")),
    ("a10g", ("A10G", 1, "gpu-a10g")),  # Beam's spelling, whatever the case
    ("NVIDIA H100", ("H100", 1, "gpu-h100")),
    ("A100-80", ("A100-80", 1, "gpu-a100-80")),
    ("any", (None, 1, "gpu")),
    ("", (None, 0, "cpu")),  # Beam's GpuType.NoGPU
    (["A10G"], ("A10G", 1, "gpu-a10g")),
    (["A10G", "T4", "a10g"], ("A10G,T4", 1, "gpu")),  # one of several types: the any-type pool
    (["T4", "any"], (None, 1, "gpu")),
    ([], (None, 0, "cpu")),
    (2, (None, 2, "gpu")),  # petribus's older gpu=<count>
    (0, (None, 0, "cpu")),
])
def test_gpu_takes_beams_types_lists_and_counts(gpu, expected):
    t = built(gpu=gpu)
    assert (t.gpu, t.gpu_count, t.pool) == expected


def test_gpu_count_is_beams_count_of_the_type():
    t = built(gpu="H100", gpu_count=4)
    assert (t.gpu, t.gpu_count, t.pool) == ("H100", 4, "gpu-h100")
    t = built(gpu_count=2)  # no type named: any type
    assert (t.gpu, t.gpu_count, t.pool) == (None, 2, "gpu")


def test_unknown_gpu_type_lists_the_known_ones():
    problem = one_problem(with_transition(gpu="K80"), "gpu='K80'", "not a GPU type", "A10G", "'any'")
    assert "H200" in problem


@pytest.mark.parametrize("options, needles", [
    (dict(gpu=True), ("gpu=True",)),
    (dict(gpu=1.5), ("gpu=1.5",)),
    (dict(gpu=-1), ("gpu=-1", ">= 0")),
    (dict(gpu=["A10G", 3]), ("gpu=3", "not a GPU type")),
    (dict(gpu_count=-1), ("gpu_count=-1", ">= 0")),
    (dict(gpu_count=True), ("gpu_count=True",)),
    (dict(gpu=2, gpu_count=3), ("gpu=2", "gpu_count=3", "disagree")),
    (dict(gpu="", gpu_count=2), ("gpu_count=2", "no GPU")),
])
def test_bad_gpu_options_are_named(options, needles):
    one_problem(with_transition(**options), *needles)


def test_explicit_pool_wins_over_the_gpu_rule():
    assert built(pool="big-box").pool == "big-box"
    assert (built(pool="a100s", gpu="A100").pool, built(pool="a100s", gpu="A100").gpu) == ("a100s", "A100")


@pytest.mark.parametrize("pool", ["", "gpu.a10g", "has space", "*", ">", "x" * 65, 3])
def test_pool_that_is_not_a_subject_token_is_named(pool):
    one_problem(with_transition(pool=pool), f"pool={pool!r}", "pool name")


# --- image and python_packages ---------------------------------------------------------------------


def test_python_packages_alone_keep_working_in_a_process():
    t = built(python_packages=["requests", "httpx"])
    assert (t.image, t.python_packages, t.sandbox) == (None, ("requests", "httpx"), "process")


def test_python_packages_of_a_container_without_an_image_go_into_one():
    t = built(python_packages=["httpx"], sandbox="container")
    assert (t.image, t.python_packages, t.sandbox) == (Image(python_packages=("httpx",)), ("httpx",), "container")


def test_python_packages_join_the_images_packages():
    t = built(image=Image(python_packages=["requests"]), python_packages=["httpx", "requests"])
    assert t.python_packages == ("requests", "httpx")
    assert tuple(t.image.python_packages) == ("requests", "httpx")


def test_image_tag_is_a_container_image():
    t = built(image="python:3.11-slim")
    assert (t.image, t.sandbox) == ("python:3.11-slim", "container")


def test_images_builders_return_a_new_image_with_beams_forms():
    base = Image.from_registry("nvcr.io/nvidia/pytorch:24.01-py3")
    img = base.add_python_packages(["numpy"]).add_commands(["echo hi"]).with_envs(["MODE=fast", "LEVEL=2"])
    assert base.python_packages == () and base.base_image == "nvcr.io/nvidia/pytorch:24.01-py3"
    t = built(image=img)
    assert t.image.env_vars == {"MODE": "fast", "LEVEL": "2"}
    assert (tuple(t.image.python_packages), tuple(t.image.commands)) == (("numpy",), ("echo hi",))
    assert hash(t.image) == hash(img) and t.image == img.add_python_packages([])


@pytest.mark.parametrize("image, needles", [
    (Image(python_version="3.11"), ("python_version='3.11'", "'python3.11'")),
    (Image(python_packages="requirements.txt"), ("requirements", "as a list")),
    (Image(python_packages=["ok", ""]), ("python_packages", "non-empty strings")),
    (Image(commands="apt-get install x"), ("commands", "list")),
    (Image(base_image="not an image"), ("base_image='not an image'",)),
    (Image(env_vars={"1BAD": "x"}), ("env_vars", "'1BAD'")),
    (Image(env_vars=["NO_EQUALS"]), ("env_vars", "'NO_EQUALS'", "NAME=value")),
    (Image(base_image_creds={"DOCKERHUB_USERNAME": "u"}), ("base_image_creds", "docker login")),
    ("has space:latest", ("image='has space:latest'", "tag")),
    ({"python_packages": ["requests"]}, ("image=", "Image(...)")),
])
def test_bad_image_is_named(image, needles):
    one_problem(with_transition(image=image), "'step'", *needles)


@pytest.mark.parametrize("method, hint", [("with_secrets", "secrets=['NAME']"), ("from_dockerfile", "image='")])
def test_beams_image_methods_petribus_lacks_say_what_to_do(method, hint):
    with pytest.raises(AttributeError, match=f"Image.{method} is Beam's and not supported") as info:
        getattr(Image(), method)
    assert hint in str(info.value)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        Image().nonsense  # noqa: B018


def test_bad_python_packages_are_named():
    one_problem(with_transition(python_packages="requests"), "python_packages='requests'", "list")


def test_image_in_a_process_sandbox_is_refused():
    one_problem(with_transition(image=Image(), sandbox="process"), "image=", "sandbox='process'", "container")


def test_explicit_container_without_an_image_is_kept():
    assert built(sandbox="container").sandbox == "container"


# --- secrets, network, callback_url ----------------------------------------------------------------


def test_secrets_are_kept_in_order():
    assert built(secrets=["API_TOKEN", "db_password", "_X1"]).secrets == ("API_TOKEN", "db_password", "_X1")
    assert built(secrets=()).secrets == ()


@pytest.mark.parametrize("secrets, needles", [
    ("API_TOKEN", ("secrets='API_TOKEN'", "list of secret names")),
    (["API-TOKEN"], ("'API-TOKEN'", "not a secret name")),
    (["1TOKEN"], ("'1TOKEN'", "not a secret name")),
    (["API TOKEN"], ("'API TOKEN'",)),
    ([""], ("''", "not a secret name")),
    ([42], ("42", "not a secret name")),
    (["API_TOKEN", "API_TOKEN"], ("'API_TOKEN'", "listed twice")),
    (["PATH"], ("'PATH'", "the worker itself needs")),
    (["PETRIBUS_NATS_URL"], ("'PETRIBUS_NATS_URL'", "the worker itself needs")),
])
def test_bad_secrets_are_named(secrets, needles):
    one_problem(with_transition(secrets=secrets), "'step'", *needles)


def test_network_is_a_bool():
    assert built(network=True).network is True
    one_problem(with_transition(network="yes"), "network='yes'", "True or False")


@pytest.mark.parametrize("url", ["https://example.com/hook", "http://127.0.0.1:8080/cb?x=1"])
def test_callback_url_is_kept(url):
    assert built(callback_url=url).callback_url == url


def test_beams_empty_callback_url_is_none():
    assert built(callback_url="").callback_url is None


@pytest.mark.parametrize("url", ["example.com/hook", "ftp://example.com/x", "https://", "https://exa mple.com", 3])
def test_bad_callback_url_is_named(url):
    one_problem(with_transition(callback_url=url), f"callback_url={url!r}", "http(s) URL")


# --- task_policy -----------------------------------------------------------------------------------


def test_task_policy_maps_onto_retries_timeout_and_ttl():
    t = built(task_policy=TaskPolicy(max_retries=3, timeout=45.5, ttl=120))
    assert (t.retries, t.timeout, t.ttl) == (3, 45.5, 120.0)


def test_task_policy_zero_means_not_set_as_in_beam():
    t = built(task_policy=TaskPolicy(max_retries=0, timeout=0, ttl=0), timeout=10, retries=0)
    assert (t.retries, t.timeout, t.ttl) == (0, 10, None)


def test_task_policy_timeout_minus_one_is_no_limit():
    assert built(task_policy=TaskPolicy(timeout=-1)).timeout is None


def test_task_policy_agreeing_with_explicit_options_is_fine():
    t = built(task_policy=TaskPolicy(max_retries=2, timeout=30), retries=2, timeout=30)
    assert (t.retries, t.timeout) == (2, 30)


@pytest.mark.parametrize("options, needles", [
    (dict(task_policy=TaskPolicy(max_retries=2), retries=1), ("retries=1", "max_retries=2", "disagree")),
    (dict(task_policy=TaskPolicy(timeout=30), timeout=10), ("timeout=10", "task_policy timeout=30", "disagree")),
    (dict(task_policy=TaskPolicy(timeout=-1), timeout=10), ("timeout=10", "timeout=-1", "disagree")),
    (dict(task_policy=TaskPolicy(max_retries=-1)), ("max_retries=-1", ">= 0")),
    (dict(task_policy=TaskPolicy(max_retries=1.5)), ("max_retries=1.5",)),
    (dict(task_policy=TaskPolicy(timeout=-5)), ("task_policy timeout=-5", "-1 (no time limit)")),
    (dict(task_policy=TaskPolicy(ttl=-1)), ("ttl=-1", "0 (not set)")),
    (dict(task_policy=TaskPolicy(ttl=float("inf"))), ("ttl=inf",)),
    (dict(task_policy="retry-thrice"), ("task_policy='retry-thrice'", "TaskPolicy(")),
])
def test_bad_task_policy_is_named(options, needles):
    one_problem(with_transition(**options), "'step'", *needles)


# --- volumes ---------------------------------------------------------------------------------------


def test_bot_volumes_become_the_nets():
    vols = [Volume(name="weights", mount_path="./weights"), Volume(name="cache.v2", mount_path="/data/cache")]
    bot = make_bot(volumes=vols)

    @bot.transition(inputs={A: 1}, outputs=[B])
    def step(inputs):
        return {}

    assert bot.net().volumes == tuple(vols)
    assert with_transition().net().volumes == ()


@pytest.mark.parametrize("volumes, needles", [
    (Volume(name="w", mount_path="./w"), ("Bot(volumes=", "give a list")),
    (["weights"], ("[0]", "'weights'", "not a petribus Volume")),
    ([Volume(name="../up", mount_path="./w")], ("name='../up'", "volume name")),
    ([Volume(name="..", mount_path="./w")], ("name='..'",)),
    ([Volume(name="w", mount_path="../outside")], ("mount_path='../outside'", "without '..'")),
    ([Volume(name="w", mount_path="")], ("mount_path=''",)),
    ([Volume(name="w", mount_path="/")], ("mount_path='/'",)),
    ([Volume(name="a", mount_path="./w"), Volume(name="b", mount_path="./w/")], ("[1]", "used by another")),
])
def test_bad_volumes_are_named(volumes, needles):
    bot = make_bot(volumes=volumes)

    @bot.transition(inputs={A: 1}, outputs=[B])
    def step(inputs):
        return {}

    one_problem(bot, *needles)


# --- options petribus does not have are refused, never ignored --------------------------------------


@pytest.mark.parametrize("option, hint", [
    ("keep_warm", "PETRIBUS_CONTAINER_WARM"),
    ("max_pending", "TaskPolicy(ttl"),
    ("volumes", "Bot(volumes="),
    ("handler", "decorated function"),
    ("env", "secrets="),
    ("block_network", "network=True"),
])
def test_beam_transition_options_petribus_lacks_are_refused_with_what_to_do(option, hint):
    one_problem(with_transition(**{option: 1}), "'step'", f"{option}=", "not supported by petribus", hint)


def test_unknown_transition_keyword_is_refused_listing_the_options():
    problem = one_problem(with_transition(cpus=2), "'step'", "cpus=", "not supported", "the options are")
    assert "cpu, memory, gpu" in problem and "task_policy" in problem


def test_unknown_bot_keywords_are_all_refused_at_net_time():
    bot = make_bot(disks=[object()], temperature=0.2)  # stored, not raised: the decorator style

    @bot.transition(inputs={A: 1}, outputs=[B])
    def step(inputs):
        return {}

    problems = problems_of(bot)
    assert len(problems) == 2, problems
    assert any("Bot(disks=...)" in p and "volumes=[Volume(" in p for p in problems)
    assert any("Bot(temperature=...)" in p and "the options are" in p and "volumes" in p for p in problems)


def test_every_bad_option_of_a_transition_is_reported_at_once():
    problems = problems_of(with_transition(
        cpu="lots", memory="2TB", gpu="K80", pool="a.b", image=3, secrets=["A", "A"], network=1,
        callback_url="nope", task_policy=TaskPolicy(ttl=-1), keep_warm=10,
    ))
    for option in ("cpu=", "memory=", "gpu=", "pool=", "image=", "secrets", "network=", "callback_url=",
                   "ttl=", "keep_warm="):
        assert any(option in p for p in problems), (option, problems)
    assert len(problems) == 10, problems
