"""Where a Go program spent its CPU, from a pprof profile: the functions with the most samples.

    .venv/bin/python bench/pprof_top.py PROFILE [--top 25]

nats-server serves one at ``/debug/pprof/profile?seconds=N`` when started with ``prof_port``
(``petribus.embedded.NatsServer(prof_port=...)``; ``bench/bench_core.py --server-profile`` does it for
the sustained run). The file is a gzipped ``profile.proto``; this reads the few fields it needs (samples,
locations, functions, strings) without Go's toolchain, and prints each function's share of the samples,
on its own ("self") and with what it called ("inclusive").
"""

from __future__ import annotations

import argparse
import gzip
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one protobuf message."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"not a pprof profile: wire type {wire} at byte {i}")
        yield number, wire, value


def _ints(value: int | bytes, wire: int) -> list[int]:
    """A repeated integer field: one value, or a packed run of them."""
    if wire == 0:
        return [value]  # type: ignore[list-item]
    out, i = [], 0
    while i < len(value):  # type: ignore[arg-type]
        n, i = _varint(value, i)  # type: ignore[arg-type]
        out.append(n)
    return out


def top(profile: bytes) -> tuple[int, Counter[str], Counter[str]]:
    """Total samples, then samples per function on its own and inclusive (first sample type: CPU)."""
    data = gzip.decompress(profile) if profile[:2] == b"\x1f\x8b" else profile
    strings: list[str] = []
    samples: list[tuple[list[int], int]] = []
    locations: dict[int, list[int]] = {}  # location id -> function ids, innermost first
    functions: dict[int, int] = {}  # function id -> index of its name in strings
    for number, wire, value in _fields(data):
        if number == 6:  # string_table
            strings.append(value.decode())  # type: ignore[union-attr]
        elif number == 2:  # sample: location ids, values
            ids: list[int] = []
            values: list[int] = []
            for n, w, v in _fields(value):  # type: ignore[arg-type]
                if n == 1:
                    ids += _ints(v, w)
                elif n == 2:
                    values += _ints(v, w)
            samples.append((ids, values[0] if values else 0))
        elif number == 4:  # location: id, lines (each naming a function)
            location, funcs = 0, []
            for n, _, v in _fields(value):  # type: ignore[arg-type]
                if n == 1:
                    location = v  # type: ignore[assignment]
                elif n == 4:
                    funcs += [fv for fn, _, fv in _fields(v) if fn == 1]  # type: ignore[arg-type, misc]
            locations[location] = funcs
        elif number == 5:  # function: id, name
            fields = {n: v for n, _, v in _fields(value)}  # type: ignore[arg-type]
            functions[fields.get(1, 0)] = fields.get(2, 0)  # type: ignore[index, assignment]
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for ids, count in samples:
        total += count
        names = [strings[functions[f]] for loc in ids for f in locations.get(loc, [])]
        if names:
            own[names[0]] += count
            for name in set(names):
                inclusive[name] += count
    return total, own, inclusive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    total, own, inclusive = top(args.profile.read_bytes())
    print(f"{total} samples")
    for title, counts in (("self", own), ("inclusive", inclusive)):
        print(f"--- {title}")
        for name, count in counts.most_common(args.top):
            print(f"{100 * count / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
