"""Deterministic inputs: which keys, which events, which operations.

An inputs file (``storefront.toml`` beside this module is the default) names the
key space, the key distribution (uniform or Zipf), the event mix and the
read/write mix. Everything is drawn from ``random.Random(seed)`` or a numpy
generator seeded the same way, so a run can be repeated request for request.

Requests are built here once, before a phase, as wire bytes: the generator
sends bytes and never builds a protobuf object per call. Events need a fresh
``message_id`` per send (the server deduplicates ids for 24 hours), so their
bodies are serialized once and the id and timestamp are spliced in front: a
protobuf message is a sequence of fields in any order, so the bytes of
``message_id`` + ``timestamp`` + body parse as one Event.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - tomli is a dependency on 3.10
    import tomli as tomllib

DEFAULT_INPUTS = Path(__file__).with_name("storefront.toml")
OPERATIONS = ("get", "batch-get", "track", "noop")
EVENT_TYPES = {"track": 1, "page": 2, "screen": 3, "identify": 4, "alias": 5}


class InputsError(ValueError):
    pass


@dataclass(frozen=True)
class EventKind:
    weight: float
    type: str
    name: str
    properties: dict


@dataclass(frozen=True)
class Inputs:
    collection: str = "customers"
    key_format: str = "user-{}"
    key_count: int = 100_000
    key_file: str | None = None
    distribution: str = "uniform"
    zipf_exponent: float = 1.0
    mix: dict = field(default_factory=lambda: {"get": 1.0})
    events: tuple = ()
    source: str = ""


def load_inputs(path: str | os.PathLike | None = None) -> Inputs:
    """Reads an inputs file, naming the key and the problem on any mistake."""
    path = Path(path) if path else DEFAULT_INPUTS
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputsError(f"{path}: {exc}") from None
    keys = doc.get("keys", {})
    distribution = keys.get("distribution", "uniform")
    if distribution not in ("uniform", "zipf"):
        raise InputsError(f"{path}: keys.distribution = {distribution!r}: must be uniform or zipf")
    key_file = keys.get("file")
    if key_file is not None:
        key_file = str((path.parent / key_file).resolve())
    events = []
    for i, e in enumerate(doc.get("events", [])):
        kind = e.get("type", "track")
        if kind not in EVENT_TYPES:
            raise InputsError(f"{path}: events[{i}].type = {kind!r}: must be one of {', '.join(EVENT_TYPES)}")
        events.append(EventKind(float(e.get("weight", 1)), kind, e.get("name", ""), dict(e.get("properties", {}))))
    mix = {str(k): float(v) for k, v in doc.get("mix", {"get": 1}).items()}
    check_mix(mix, str(path))
    return Inputs(collection=doc.get("collection", "customers"), key_format=keys.get("format", "user-{}"),
                  key_count=int(keys.get("count", 100_000)), key_file=key_file, distribution=distribution,
                  zipf_exponent=float(keys.get("zipf_exponent", 1.0)), mix=mix, events=tuple(events),
                  source=str(path))


def check_mix(mix: dict, where: str) -> None:
    unknown = sorted(set(mix) - set(OPERATIONS))
    if unknown:
        raise InputsError(f"{where}: mix has {', '.join(unknown)}: operations are {', '.join(OPERATIONS)}")
    if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise InputsError(f"{where}: mix ratios must be non-negative and not all zero")


def parse_mix(text: str) -> dict:
    """``get=90,track=10`` -> {"get": 90.0, "track": 10.0}."""
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            mix[name.strip()] = float(value)
        except ValueError:
            raise InputsError(f"--mix {text!r}: expected NAME=RATIO pairs, e.g. get=90,track=10") from None
    check_mix(mix, "--mix")
    return mix


# Keys ----------------------------------------------------------------------


class Keys:
    """Seeded key choice over the inputs' key space, uniform or Zipf."""

    def __init__(self, inputs: Inputs, seed: int):
        import numpy as np

        if inputs.key_file:
            with open(inputs.key_file) as f:
                self.space = [line.strip() for line in f if line.strip()]
            if not self.space:
                raise InputsError(f"{inputs.key_file}: no keys")
        else:
            self.space = None
        self.n = len(self.space) if self.space is not None else inputs.key_count
        self.fmt = inputs.key_format
        self.rng = np.random.default_rng(seed)
        self.cdf = None
        if inputs.distribution == "zipf":
            weights = 1.0 / np.arange(1, self.n + 1, dtype=np.float64) ** inputs.zipf_exponent
            self.cdf = np.cumsum(weights)
            self.cdf /= self.cdf[-1]
            self.rank_to_index = self.rng.permutation(self.n)  # which keys are hot: seeded too

    def key(self, index: int) -> str:
        """The key at a 0-based position of the key space."""
        return self.space[index] if self.space is not None else self.fmt.format(index + 1)

    def sample(self, count: int) -> list[str]:
        if self.cdf is None:
            idx = self.rng.integers(0, self.n, count)
        else:
            idx = self.rank_to_index[self.cdf.searchsorted(self.rng.random(count), side="right").clip(0, self.n - 1)]
        return [self.key(int(i)) for i in idx]


# Wire helpers --------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def length_delimited(field_number: int, data: bytes) -> bytes:
    return varint(field_number << 3 | 2) + varint(len(data)) + data


class Events:
    """Pre-serialized event bodies (no id, no timestamp) drawn from the event mix."""

    def __init__(self, inputs: Inputs, keys: Keys, seed: int, pool: int = 8192, id_prefix: str = ""):
        from qualify.v1 import event_pb2

        kinds = inputs.events or (EventKind(1.0, "page", "Page Viewed", {"path": "/"}),)
        rng = random.Random(seed)
        users = keys.sample(pool)
        chosen = rng.choices(kinds, weights=[k.weight for k in kinds], k=pool)
        self.bodies = []
        for kind, user in zip(chosen, users):
            e = event_pb2.Event(type=EVENT_TYPES[kind.type], name=kind.name, user_id=user)
            e.properties.update({k: rng.choice(v) if isinstance(v, list) else v for k, v in kind.properties.items()})
            self.bodies.append(e.SerializeToString())
        # Ids are a per-run prefix and a counter: unique, increasing, and cheap
        # (a UUIDv7 per event costs the generator ~3 us).
        self.prefix = id_prefix or f"{time.time_ns() // 1_000_000:012x}-{os.getpid():x}-"
        self.counter = 0
        self._ts_second = -1
        self._ts = b""

    def timestamp(self) -> bytes:
        now = int(time.time())
        if now != self._ts_second:
            self._ts_second, self._ts = now, length_delimited(6, b"\x08" + varint(now))
        return self._ts

    def next_id(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter:010x}"

    def event(self, body: bytes, message_id: str) -> bytes:
        return length_delimited(1, message_id.encode()) + self.timestamp() + body

    def batch(self, count: int) -> list[bytes]:
        """``count`` events with fresh ids, each the bytes of one Event."""
        n = len(self.bodies)
        start = self.counter
        return [self.event(self.bodies[(start + j) % n], self.next_id()) for j in range(count)]


def stream_request(batch_number: int, events: list[bytes]) -> bytes:
    """StreamEventsRequest{batch_number, events}."""
    return b"\x08" + varint(batch_number) + b"".join(length_delimited(2, e) for e in events)


def track_request(event: bytes) -> bytes:
    """TrackRequest{event}."""
    return length_delimited(1, event)


def get_requests(collection: str, keys: list[str]) -> list[bytes]:
    from qualify.v1 import personalize_pb2

    return [personalize_pb2.GetRequest(collection=collection, key=k).SerializeToString() for k in keys]


def batch_get_requests(collection: str, keys: list[str], size: int) -> list[bytes]:
    from qualify.v1 import personalize_pb2

    return [personalize_pb2.BatchGetRequest(collection=collection, keys=keys[i:i + size]).SerializeToString()
            for i in range(0, len(keys) - size + 1, size)]
