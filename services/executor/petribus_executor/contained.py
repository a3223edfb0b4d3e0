"""The entry of a container worker: ``python -m petribus_executor.contained --socket PATH --boot FILE APP...``.

It connects to the executor's unix socket (bind-mounted into the container with its scratch folder),
reads the boot file and deletes it at once (it holds the secret values, which must not stay readable
to the firings), puts the profile's secrets and the variables the apps read into its environment and runs the ordinary worker
(``worker.main``) over the socket. The worker exits when the socket closes (``exit_on_eof``): a
container has no parent process to watch.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys


class Socket:
    """What ``worker.main`` uses of a connection: the fd, read and written raw in frames."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="petribus_executor.contained")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--boot", required=True)
    parser.add_argument("apps", nargs="*")
    args = parser.parse_args(argv)
    with open(args.boot) as f:
        boot = json.load(f)
    os.unlink(args.boot)
    os.environ.update(boot.get("environ") or {})
    os.environ.update({key: value for key, value in boot["profile"]["env"]})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    from petribus_executor import worker  # after the secrets are set: what the apps import may read them

    worker.main(Socket(sock), args.apps, boot)


if __name__ == "__main__":
    main(sys.argv[1:])
