"""The load generator: a separate process driven over a pipe.

It runs apart from the server (and from the bench's own bookkeeping) so the
measurement is not entangled with the server's GIL. It uses gRPC's sync API
with futures rather than grpc.aio, measured on the 2-core machine:

* closed loop, 32 in flight: futures chained from their completion callbacks
  cost the client ~150 us of CPU per call; grpc.aio on uvloop ~170-200 us, on
  asyncio ~230-270 us, blocking calls from 32 threads ~220 us. On two cores the
  client's CPU is taken from the server's, so the cheapest client wins.
* open loop: a sender thread sleeping in ``time.sleep`` (nanosleep, with the
  timer slack cut to 1 us) keeps to the schedule within ~100 us at p50 and
  ~300 us at p99; asyncio and uvloop timers fire on a 1 ms grid, which put the
  generator ~1.0-1.5 ms behind at p99 and made the bench measure itself.

Requests are serialized once, before any phase, and responses are taken as
bytes (no per-call protobuf work in the client); every 997th Get response is
decoded and its key checked, so a server answering the wrong record is caught.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import math
import os
import random
import sys
import threading
import time
from array import array
from functools import partial

from . import _proc

GET = "/qualify.v1.PersonalizeService/Get"
NOOP = "/qualify.v1.DiagnosticsService/Noop"
INFO = "/qualify.v1.DiagnosticsService/GetServerInfo"
CHECK_EVERY = 997


def _tighten_timer_slack() -> None:
    """prctl(PR_SET_TIMERSLACK, 1 ns): nanosleep would otherwise overshoot by ~50 us."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Generator:
    def __init__(self, address: str, channels: int, people: int, seed: int, collection: str,
                 key_pool: int = 1 << 17, timeout: float = 5.0):
        import grpc

        from qualify.v1 import personalize_pb2

        self.grpc = grpc
        self.personalize_pb2 = personalize_pb2
        self.timeout = timeout
        # A local subchannel pool per channel: each channel gets its own TCP
        # connection, so SO_REUSEPORT can spread them over the serving processes.
        options = [("grpc.use_local_subchannel_pool", 1)] if channels > 1 else []
        self.channels = [grpc.insecure_channel(address, options=options) for _ in range(channels)]
        rng = random.Random(seed)
        self.keys = [f"user-{rng.randint(1, people)}" for _ in range(key_pool)]
        self.get_requests = [personalize_pb2.GetRequest(collection=collection, key=k).SerializeToString()
                             for k in self.keys]
        self.calls = {
            "get": [ch.unary_unary(GET) for ch in self.channels],
            "noop": [ch.unary_unary(NOOP) for ch in self.channels],
        }
        self.cursor = itertools.count()

    # Requests -------------------------------------------------------------

    def _request(self, method: str, idx: int) -> bytes:
        if method == "noop":
            return b""  # NoopRequest{} is the empty message
        return self.get_requests[idx % len(self.get_requests)]

    def _bad_response(self, method: str, idx: int, future) -> bool:
        """Checks one Get reply in CHECK_EVERY: the record must be the key asked for."""
        if method != "get" or idx % CHECK_EVERY:
            return False
        try:
            reply = self.personalize_pb2.GetResponse.FromString(future.result())
        except Exception:  # noqa: BLE001 - any failure to decode is a bad response
            return True
        return reply.record.key != self.keys[idx % len(self.keys)] or not reply.record.fields.fields

    # Commands -------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """The serving process behind each channel (GetServerInfo.worker_pid)."""
        from qualify.v1 import diagnostics_pb2

        pids = []
        for ch in self.channels:
            raw = ch.unary_unary(INFO)(b"", timeout=self.timeout)
            pids.append(diagnostics_pb2.GetServerInfoResponse.FromString(raw).worker_pid)
        return pids

    def closed(self, method: str, concurrency: int, duration: float, server_pids: list[int],
               ramp: float = 0.25) -> dict:
        """``concurrency`` calls always in flight; counts completions inside the window."""
        calls = self.calls[method]
        OK = self.grpc.StatusCode.OK
        pc = time.perf_counter
        t_start = pc() + ramp
        t_end = t_start + duration
        counts = [0] * concurrency  # each slot is one chain of calls, touched by one thread
        errors = [0] * concurrency
        bad = [0] * concurrency
        codes: dict[str, int] = {}
        remaining = [concurrency]
        lock = threading.Lock()
        finished = threading.Event()
        cursor = self.cursor
        timeout = self.timeout

        def launch(slot: int) -> None:
            idx = next(cursor)
            f = calls[slot % len(calls)].future(self._request(method, idx), timeout=timeout)
            f.add_done_callback(partial(on_done, slot, idx))

        def on_done(slot: int, idx: int, f) -> None:
            t = pc()
            if t_start <= t < t_end:
                counts[slot] += 1
                code = f.code()
                if code is not OK:
                    errors[slot] += 1
                    with lock:
                        codes[code.name] = codes.get(code.name, 0) + 1
                elif self._bad_response(method, idx, f):
                    bad[slot] += 1
            if t < t_end:
                launch(slot)
            else:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        finished.set()

        for slot in range(concurrency):
            launch(slot)
        time.sleep(max(0.0, t_start - pc()))
        before = _proc.CpuSnapshot.take(server_pids)
        time.sleep(max(0.0, t_end - pc()))
        after = _proc.CpuSnapshot.take(server_pids)
        drained = finished.wait(timeout + 5.0)
        calls_done = sum(counts)
        wall = after.wall - before.wall
        return {
            "mode": "closed", "method": method, "concurrency": concurrency,
            "seconds": wall, "calls": calls_done, "errors": sum(errors), "error_codes": codes,
            "bad_responses": sum(bad), "drained": drained,
            "server_cpu_seconds": after.server - before.server,
            "client_cpu_seconds": after.client - before.client,
            "machine_busy_seconds": after.machine_busy - before.machine_busy,
        }

    def open(self, method: str, rate: float, duration: float, server_pids: list[int]) -> dict:
        """Sends on a fixed schedule whatever the replies do; latency from the intended send time."""
        calls = self.calls[method]
        OK = self.grpc.StatusCode.OK
        pc = time.perf_counter
        n = max(1, int(rate * duration))
        interval = 1.0 / rate
        latency = array("d", [math.nan]) * n
        lag = array("d", [0.0]) * n
        failed = bytearray(n)
        futures = [None] * n
        codes: dict[str, int] = {}
        lock = threading.Lock()
        bad = [0]

        def on_done(i: int, intended: float, f) -> None:
            latency[i] = pc() - intended
            idx = base + i
            code = f.code()
            if code is not OK:
                failed[i] = 1
                with lock:
                    codes[code.name] = codes.get(code.name, 0) + 1
            elif self._bad_response(method, idx, f):
                with lock:
                    bad[0] += 1

        base = next(self.cursor)
        for _ in range(n):  # keep the key cursor moving past this phase's keys
            next(self.cursor)
        t0 = pc() + 0.05
        before = _proc.CpuSnapshot.take(server_pids)
        sleep = time.sleep
        for i in range(n):
            intended = t0 + i * interval
            delay = intended - pc()
            if delay > 0:
                sleep(delay)
            lag[i] = pc() - intended
            f = calls[i % len(calls)].future(self._request(method, base + i), timeout=self.timeout)
            f.add_done_callback(partial(on_done, i, intended))
            futures[i] = f
        last_send = pc()
        deadline = last_send + self.timeout + 5.0
        for f in futures:
            try:
                f.exception(timeout=max(0.0, deadline - pc()))
            except Exception:  # noqa: BLE001 - a future that never finished is counted below
                pass
        # Replies can land a little after the sends end: count CPU up to the last reply.
        after = _proc.CpuSnapshot.take(server_pids)
        unfinished = sum(1 for x in latency if math.isnan(x))
        done = [x for x in latency if not math.isnan(x)]
        return {
            "mode": "open", "method": method, "rate": rate, "calls": n,
            "send_seconds": last_send - t0,
            "achieved_rps": n / (last_send - t0 + interval),
            "errors": sum(failed) + unfinished, "unfinished": unfinished, "error_codes": codes,
            "bad_responses": bad[0],
            "latency_s": array("d", done).tobytes(),
            "lag_s": lag.tobytes(),
            "seconds": after.wall - before.wall,
            "server_cpu_seconds": after.server - before.server,
            "client_cpu_seconds": after.client - before.client,
            "machine_busy_seconds": after.machine_busy - before.machine_busy,
        }

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


def run(conn, address: str, channels: int, people: int, seed: int, collection: str, nice: int = 0) -> None:
    """Entry point of the generator process: answers commands until told to stop."""
    if nice:
        os.nice(nice)  # before gRPC starts its threads, which inherit it
    _tighten_timer_slack()
    # The sender thread and gRPC's callback thread share the GIL; a waiting
    # thread would otherwise wait up to the 5 ms default switch interval.
    sys.setswitchinterval(0.0002)
    try:
        gen = Generator(address, channels, people, seed, collection)
        gc.collect()
        gc.freeze()  # the key pool and the channels are never garbage: keep them out of every collection
        conn.send({"ok": True, "worker_pids": gen.worker_pids()})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops
        conn.send({"ok": False, "error": repr(exc)})
        return
    try:
        while True:
            cmd = conn.recv()
            if cmd["op"] == "stop":
                break
            # No garbage collection inside a phase: a full collection stalls the
            # sender and the callback thread for tens of ms, which showed up as
            # a 45 ms p99.9 (and a generator behind schedule) that the server
            # had nothing to do with. Collect between phases instead.
            gc.collect()
            gc.disable()
            try:
                result = getattr(gen, cmd["op"])(**cmd["args"])
                result["client_rss_mb"] = round(sum(_proc.rss_split_kib(os.getpid())) / 1024, 1)
                conn.send({"ok": True, "result": result})
            except Exception as exc:  # noqa: BLE001
                conn.send({"ok": False, "error": repr(exc)})
            finally:
                gc.enable()
    finally:
        gen.close()


class LoadProcess:
    """The parent's handle on the generator process."""

    def __init__(self, address: str, channels: int, people: int, seed: int, collection: str = "customers",
                 nice: int = 0):
        import multiprocessing

        # spawn, not fork: the parent has touched gRPC (health check), and gRPC
        # state must not cross fork().
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run, args=(child, address, channels, people, seed, collection, nice),
                                name="qualify-bench-loadgen", daemon=True)
        self.proc.start()
        child.close()
        hello = self._recv(120.0)
        self.worker_pids = hello["worker_pids"]

    def _recv(self, timeout: float):
        if not self.conn.poll(timeout):
            raise RuntimeError(f"load generator did not answer in {timeout:.0f}s")
        msg = self.conn.recv()
        if not msg.get("ok"):
            raise RuntimeError(f"load generator failed: {msg.get('error')}")
        return msg

    def call(self, op: str, timeout: float, **args) -> dict:
        self.conn.send({"op": op, "args": args})
        return self._recv(timeout)["result"]

    def stop(self) -> None:
        try:
            self.conn.send({"op": "stop"})
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
