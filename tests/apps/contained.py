"""Test app for the container sandbox: a transition that reports what its sandbox lets it see and do,
and one that allocates past its memory limit."""

import errno
import os
import resource
import socket

from pydantic import BaseModel

from petribus import Bot, BotLocation, Image

# The image the container tests build once (tests/test_container.py's BUILT has the same content, so the
# same tag): a package the executor's venv lacks, and a file only the build writes.
IMAGE = Image(python_packages=["six"], commands=["echo made-in-build > /opt/marker"])


class Probe(BaseModel):
    host_file: str  # a file on the executor's machine that a container must not see
    address: str  # host:port of a server on the executor's machine
    secret_name: str = ""


class Seen(BaseModel):
    host_file_visible: bool
    image_marker: str  # /opt/marker's text, written when the image was built ("" when absent)
    package: str  # the image's python package's version ("" when it cannot be imported)
    connect_error: str  # errno name of connecting to the address ("" when it connected)
    root_write_error: str  # errno name of writing under / ("" when it could be written)
    boot_file_left: bool
    secret: str
    cwd: str
    hostname: str


class Note(BaseModel):
    path: str  # where to write, relative to the run's folder or absolute
    text: str


class Noted(BaseModel):
    path: str  # where it was written, symlinks resolved


class Hog(BaseModel):
    mib: int


class Fed(BaseModel):
    mib: int


bot = Bot(name="contained", locations=[BotLocation(marker=m) for m in (Probe, Seen, Note, Noted, Hog, Fed)],
          description="What a container sandbox shows its transitions.")


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


@bot.transition(inputs={Probe: 1}, outputs=[Seen], sandbox="container", image=IMAGE)
def look(inputs):
    probe = inputs[Probe][0]
    try:
        with open("/opt/marker") as f:
            marker = f.read().strip()
    except OSError:
        marker = ""
    try:
        import six

        package = six.__version__
    except ImportError:
        package = ""
    host, _, port = probe.address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        connect_error = ""
    except OSError as exc:
        connect_error = _errno_name(exc)
    try:
        with open("/written-by-a-transition", "w") as f:
            f.write("x")
        root_write_error = ""
    except OSError as exc:
        root_write_error = _errno_name(exc)
    return {Seen: [Seen(host_file_visible=os.path.exists(probe.host_file), image_marker=marker, package=package,
                connect_error=connect_error, root_write_error=root_write_error,
                boot_file_left=os.path.exists("/petribus/boot.json"),
                secret=os.environ.get(probe.secret_name, "") if probe.secret_name else "",
                cwd=os.getcwd(), hostname=socket.gethostname())]}


@bot.transition(inputs={Note: 1}, outputs=[Noted], sandbox="container")
def note(inputs):
    note = inputs[Note][0]
    with open(note.path, "w") as f:
        f.write(note.text)
    return {Noted: [Noted(path=os.path.realpath(note.path))]}


@bot.transition(inputs={Hog: 1}, outputs=[Fed], sandbox="container", memory=64)
def hog(inputs):
    # A process limit is the worker's own to lift (hostile code can); the container's is not.
    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    mib = inputs[Hog][0].mib
    held = bytearray(mib * 1024 * 1024)
    for i in range(0, len(held), 4096):
        held[i] = 1
    return {Fed: [Fed(mib=mib)]}
