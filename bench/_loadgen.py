"""The load generator: one or more processes, each driven by the bench over a pipe.

It runs apart from the server (and from the bench's own bookkeeping) so the
measurement is not entangled with the server's GIL, and several of them run
when one Python process cannot send the rate. It uses gRPC's sync API with
futures rather than grpc.aio, measured on the 2-core machine:

* closed loop, 32 in flight: futures chained from their completion callbacks
  cost the client ~150 us of CPU per call; grpc.aio on uvloop ~170-200 us, on
  asyncio ~230-270 us, blocking calls from 32 threads ~220 us. On two cores the
  client's CPU is taken from the server's, so the cheapest client wins.
* open loop: a sender thread sleeping in ``time.sleep`` (nanosleep, with the
  timer slack cut to 1 us) keeps to the schedule within ~100 us at p50 and
  ~300 us at p99; asyncio and uvloop timers fire on a 1 ms grid, which put the
  generator ~1.0-1.5 ms behind at p99 and made the bench measure itself.

A phase is two commands: ``prepare`` builds every request (as bytes: no
protobuf work per call) and opens the streams, then ``run`` starts at an
instant the parent chose for all processes (``time.perf_counter`` is
CLOCK_MONOTONIC, shared by every process). Each completion is appended to a
list as (series, intended, sent, done, status); after the phase the process
turns the list into HDR histograms (whole run, and per interval for the
latency-over-time plot) and sends them encoded, so the parent can merge the
processes exactly.

The operations it sends (Unary, Stream, Membership) are in bench/_operations.py
and the histogram helpers it shares with the parent in bench/_histograms.py.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import random
import sys
import threading
import time
from functools import partial

from . import _inputs, _proc
from ._histograms import HIGHEST_US, LOWEST_US, encode, new_histogram
from ._operations import BATCH_GET, GET, INFO, METADATA, NOOP, TRACK, Membership, Stream, Unary
from ._schedule import Schedule

KEY_POOL = 1 << 16


def _tighten_timer_slack() -> None:
    """prctl(PR_SET_TIMERSLACK, 1 ns): nanosleep would otherwise overshoot by ~50 us."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


# The generator -------------------------------------------------------------


class Generator:
    def __init__(self, address: str, connections: int, index: int, processes: int, timeout: float):
        import grpc

        self.grpc = grpc
        self.index, self.processes, self.timeout = index, processes, timeout
        # A local subchannel pool per channel: each channel gets its own TCP
        # connection, so SO_REUSEPORT can spread them over the serving processes.
        options = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
        self.channels = [grpc.insecure_channel(address, options=options) for _ in range(connections)]
        self.ops: list = []
        self.pick: list[int] = [0]
        self.spec: dict = {}

    def worker_pids(self) -> list[int]:
        """The serving process behind each connection (GetServerInfo.worker_pid)."""
        from qualify.v1 import diagnostics_pb2

        return [diagnostics_pb2.GetServerInfoResponse.FromString(
                    ch.unary_unary(INFO)(b"", timeout=self.timeout, metadata=METADATA)).worker_pid for ch in self.channels]

    # prepare -------------------------------------------------------------

    def prepare(self, spec: dict) -> dict:
        """Builds the phase's requests and opens its streams; nothing is sent."""
        from qualify.v1 import personalize_pb2

        self.spec = spec
        inputs: _inputs.Inputs = spec["inputs"]
        seed = spec["seed"] * 1000 + self.index
        keys = _inputs.Keys(inputs, seed)
        ch = self.channels
        timeout = self.timeout
        if {"track", "ingest", "e2e", "ingest-http"} & set(spec["mix"]):
            events = _inputs.Events(inputs, keys, seed, id_prefix=spec.get("id_prefix", "") + f"{self.index:02x}-")
        ops: dict[str, object] = {}

        def unary(series: str, method: str, requests, items=1, check=None):
            ops[series] = Unary(series, [c.unary_unary(method) for c in ch], requests, timeout, items, check)

        for name in spec["mix"]:
            if name == "noop":
                unary("noop", NOOP, [b""])  # NoopRequest{} is the empty message
            elif name == "get":
                pool = keys.sample(KEY_POOL)

                def check_get(i: int, raw: bytes, pool=pool) -> bool:
                    reply = personalize_pb2.GetResponse.FromString(raw)
                    return reply.record.key == pool[i] and len(reply.record.fields.fields) > 0

                unary("get", GET, _inputs.get_requests(inputs.collection, pool), check=check_get)
            elif name == "batch-get":
                size = spec["batch"]

                def check_batch(i: int, raw: bytes, size=size) -> bool:
                    reply = personalize_pb2.BatchGetResponse.FromString(raw)
                    return len(reply.records) + len(reply.missing_keys) == size

                requests = _inputs.batch_get_requests(inputs.collection, keys.sample(max(64, KEY_POOL // size) * size), size)
                unary("batch-get", BATCH_GET, requests, size, check_batch)
            elif name == "track":
                unary("track", TRACK, [_inputs.track_request(e) for e in events.batch(KEY_POOL)])
            elif name == "ingest":
                ops["ingest"] = Stream(ch, events, spec["batch"])
            elif name in ("get-http", "ingest-http"):
                from . import _http  # aiohttp's client, only for the HTTP scenarios
                ops[name] = _http.make_op(name, spec, inputs, keys.sample(KEY_POOL),
                                         events if name == "ingest-http" else None, timeout)
            elif name == "e2e":
                e2e = spec["e2e"]
                persons = [keys.key(e2e["person_base"] + g) for g in range(self.index, e2e["persons"], self.processes)]
                ops["e2e"] = Membership(ch, events, persons, e2e["audience_id"], e2e["path"], inputs.collection,
                                        e2e["mode"], e2e["after_sequence"], timeout)
            else:
                raise ValueError(f"unknown operation {name!r}")
        self.ops = [ops[name] for name in spec["mix"]]
        weights = list(spec["mix"].values())
        self.pick = random.Random(seed).choices(range(len(self.ops)), weights=weights, k=10_007) \
            if len(self.ops) > 1 else [0]
        for op in self.ops:
            op.open()
        return {"series": [op.series for op in self.ops]}

    # run -----------------------------------------------------------------

    def run(self, t0: float, drained=lambda: None) -> dict:
        """Runs the prepared phase from ``t0``; ``drained()`` once every reply is in, before the bookkeeping."""
        spec = self.spec
        pc = time.perf_counter
        duration = spec["duration"]
        main: list[tuple] = []
        sub: list[tuple] = []
        cpu0 = os.times()
        time.sleep(max(0.0, t0 - pc()))
        if spec["schedule"] is not None:
            sched = Schedule.parse(spec["schedule"])
            offsets = sched.offsets(duration)[self.index::self.processes]
            sent, dropped, lags, late = self._scheduled(offsets, t0, spec.get("concurrency"), main, sub,
                                                        self.processes / max(1e-9, sched.total(duration) / duration),
                                                        t0 + duration)
        else:
            sent, dropped, lags, late = self._closed(t0, duration, spec["concurrency"], main, sub), 0, None, 0
        last_send = pc()
        deadline = last_send + self.timeout + 2.0
        acks = sent if any(isinstance(op, Membership) for op in self.ops) else 0  # e2e: one "ack" per request too
        while (len(main) < sent or len(sub) < acks) and pc() < deadline:
            time.sleep(0.005)
        t_end = pc()
        drained()
        for op in self.ops:
            op.close()
        cpu1 = os.times()
        result = self._summarize(list(main), list(sub), t0, duration, spec["interval"], lags)
        result.update(sent=sent, dropped=dropped, sent_after_window=late, no_reply=max(0, sent - len(main)),
                      client_cpu_seconds=(cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
                      drain_seconds=t_end - last_send,
                      rejected_events=sum(getattr(op, "rejected", 0) for op in self.ops))
        return result

    def _scheduled(self, offsets, t0: float, limit: int | None, main: list, sub: list, spacing: float, t_end: float):
        """Sends at each intended time; with ``limit``, at most that many in flight (paced closed loop)."""
        pc = time.perf_counter
        sleep = time.sleep
        ops, pick = self.ops, self.pick
        sem = threading.Semaphore(limit) if limit else None
        grace = max(spacing, 0.001)
        lags = []

        def finish(series: int, intended: float, sent: float, status: str, part: str | None = None) -> None:
            if part is None:
                main.append((series, intended, sent, pc(), status))
                if sem is not None:
                    sem.release()
            else:
                sub.append((part, intended, sent, pc(), status))

        n = dropped = 0
        for j, off in enumerate(offsets.tolist()):
            intended = t0 + off
            if sem is not None:
                sem.acquire()
                if pc() > intended + grace:
                    # Every slot was busy when this request was due: a closed
                    # loop drops the tick (as ghz and wrk do) and says so.
                    sem.release()
                    dropped += 1
                    continue
            delay = intended - pc()
            if delay > 0:
                sleep(delay)
            sent = pc()
            lags.append(sent - intended)
            k = pick[j % len(pick)]
            # A closed loop measures from the actual send; an open loop from the intended time.
            ops[k].send(j, partial(finish, k, sent if sem is not None else intended, sent))
            n += 1
        late = sum(1 for off, lag in zip(offsets.tolist(), lags) if t0 + off + lag > t_end) if sem is None else 0
        return n, dropped, lags, late

    def _closed(self, t0: float, duration: float, concurrency: int, main: list, sub: list) -> int:
        """``concurrency`` requests always in flight, each sent when the previous one of its slot returns."""
        pc = time.perf_counter
        t_end = t0 + duration
        ops, pick = self.ops, self.pick
        counter = itertools.count()
        sent = itertools.count()

        def launch(slot: int) -> None:
            j = next(counter)
            k = pick[j % len(pick)]
            t = pc()
            next(sent)
            ops[k].send(j, partial(done, slot, k, t))

        def done(slot: int, k: int, t_sent: float, status: str, part: str | None = None) -> None:
            t = pc()
            if part is not None:
                sub.append((part, t_sent, t_sent, t, status))
                return
            main.append((k, t_sent, t_sent, t, status))
            if t < t_end:
                launch(slot)

        for slot in range(concurrency):
            launch(slot)
        time.sleep(max(0.0, t_end - pc()))
        return next(sent)  # launches after t_end still happen from callbacks only while t < t_end

    def _summarize(self, main: list, sub: list, t0: float, duration: float, interval: float, lags) -> dict:
        series_names = [op.series for op in self.ops]
        out: dict = {"series": {}}
        groups: dict[str, list] = {}
        for k, intended, sent, done, status in main:
            groups.setdefault(series_names[k], []).append((intended, sent, done, status))
        for part, intended, sent, done, status in sub:
            groups.setdefault(part, []).append((intended, sent, done, status))
        t_end = t0 + duration
        for name, rows in groups.items():
            whole = new_histogram()
            per: dict[int, list] = {}
            codes: dict[str, int] = {}
            in_window = 0
            for intended, sent, done, status in rows:
                us = max(LOWEST_US, min(HIGHEST_US, int((done - intended) * 1e6)))
                whole.record_value(us)
                slot = per.get(int((intended - t0) / interval))
                if slot is None:
                    slot = per[int((intended - t0) / interval)] = [new_histogram(2), 0, 0]
                slot[0].record_value(us)
                slot[1] += 1
                if status != "OK":
                    codes[status] = codes.get(status, 0) + 1
                    slot[2] += 1
                if done <= t_end:
                    in_window += 1
            out["series"][name] = {
                "hist": encode(whole), "codes": codes, "count": len(rows), "completed_in_window": in_window,
                "intervals": {i: {"hist": encode(h), "count": c, "errors": e} for i, (h, c, e) in per.items()},
            }
        if lags:
            lag = new_histogram()
            for x in lags:
                lag.record_value(max(LOWEST_US, min(HIGHEST_US, int(x * 1e6))))
            out["lag"] = encode(lag)
        return out

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


def run(conn, address: str, connections: int, index: int, processes: int, timeout: float, nice: int = 0) -> None:
    """Entry point of a generator process: answers commands until told to stop."""
    if nice:
        os.nice(nice)  # before gRPC starts its threads, which inherit it
    _tighten_timer_slack()
    # The sender thread and gRPC's callback thread share the GIL; a waiting
    # thread would otherwise wait up to the 5 ms default switch interval.
    sys.setswitchinterval(0.0002)
    try:
        gen = Generator(address, connections, index, processes, timeout)
        conn.send({"ok": True, "worker_pids": gen.worker_pids(), "pid": os.getpid()})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops
        conn.send({"ok": False, "error": repr(exc)})
        return
    try:
        while True:
            cmd = conn.recv()
            if cmd["op"] == "stop":
                break
            try:
                if cmd["op"] == "prepare":
                    result = gen.prepare(cmd["spec"])
                    gc.collect()
                    gc.freeze()  # the requests are never garbage: keep them out of every collection
                else:
                    # No garbage collection inside a phase: a full collection
                    # stalls the sender and the callback thread for tens of ms,
                    # which showed up as a 45 ms p99.9 (and a generator behind
                    # schedule) that the server had nothing to do with.
                    gc.disable()
                    try:
                        # The parent stops counting the server's CPU when every
                        # process has drained, not after the histograms are built.
                        result = gen.run(cmd["t0"], lambda: conn.send({"ok": True, "drained": True}))
                    finally:
                        gc.enable()
                        gc.unfreeze()
                    result["client_rss_mb"] = round(sum(_proc.rss_split_kib(os.getpid())) / 1024, 1)
                conn.send({"ok": True, "result": result})
            except Exception as exc:  # noqa: BLE001
                conn.send({"ok": False, "error": repr(exc)})
    finally:
        gen.close()


class LoadProcess:
    """The parent's handle on one generator process."""

    def __init__(self, address: str, connections: int, index: int, processes: int, timeout: float, nice: int = 0):
        import multiprocessing

        # spawn, not fork: the parent has touched gRPC (health check), and gRPC
        # state must not cross fork().
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run, args=(child, address, connections, index, processes, timeout, nice),
                                name=f"qualify-bench-load-{index}", daemon=True)
        self.proc.start()
        child.close()
        hello = self.recv(120.0)
        self.worker_pids = hello["worker_pids"]
        self.pid = hello["pid"]

    def recv(self, timeout: float):
        if not self.conn.poll(timeout):
            raise RuntimeError(f"load generator did not answer in {timeout:.0f}s")
        try:
            msg = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"load generator process exited with {self.proc.exitcode}") from None
        if not msg.get("ok"):
            raise RuntimeError(f"load generator failed: {msg.get('error')}")
        return msg

    def send(self, op: str, **args) -> None:
        self.conn.send({"op": op, **args})

    def stop(self) -> None:
        try:
            self.conn.send({"op": "stop"})
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
