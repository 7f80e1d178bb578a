"""A steady ingest stream beside other work: the acknowledgement latencies it sees.

``Steady(address, rate)`` sends small TrackBatch calls from a thread of its
own (10 events each, at ``rate`` events/s in total) and records each call's
round trip; ``window()`` gives the latencies recorded since the last call, so
one stream measures a quiet period and a busy one in the same run.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

from ._stats import percentile

BATCH = 10


def stream_paced(address: str, rate: float, interval: float, stop: threading.Event,
                 fill: Callable[[object, int, int], None]) -> None:
    """Page views over one StreamEvents at ``rate`` events/s, a batch every ``interval`` s, until ``stop``.

    ``fill(event, batch_number, i)`` sets each event's ids and properties.
    A rejected event ends the stream with RuntimeError.
    """
    import grpc

    from qualify.clients.emitter import new_message_id
    from qualify.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc

    per_batch = max(1, round(rate * interval))

    def requests():
        n, t = 0, time.perf_counter()
        while not stop.is_set():
            n += 1
            req = ingest_pb2.StreamEventsRequest(batch_number=n)
            for i in range(per_batch):
                e = req.events.add(message_id=new_message_id(), type=event_pb2.EVENT_TYPE_PAGE)
                fill(e, n, i)
                e.timestamp.GetCurrentTime()
            yield req
            t += interval
            time.sleep(max(0.0, t - time.perf_counter()))

    with grpc.insecure_channel(address) as channel:
        for reply in ingest_pb2_grpc.IngestServiceStub(channel).StreamEvents(requests()):
            if reply.rejections:
                raise RuntimeError(f"events rejected: {reply.rejections[0]}")


class Steady:
    def __init__(self, address: str, rate: int = 1000, persons: int = 100_000):
        import grpc

        from qualify.v1 import ingest_pb2_grpc

        self.channel = grpc.insecure_channel(address)
        self.stub = ingest_pb2_grpc.IngestServiceStub(self.channel)
        self.interval = BATCH / rate
        self.persons = persons
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="steady-ingest", daemon=True)

    def __enter__(self) -> "Steady":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.channel.close()

    def _run(self) -> None:
        from qualify.v1 import event_pb2, ingest_pb2

        n, due = 0, time.perf_counter()
        while not self._stop.is_set():
            events = []
            for _ in range(BATCH):
                e = event_pb2.Event(message_id=uuid.uuid4().hex, type=event_pb2.EVENT_TYPE_PAGE, name="/steady",
                                    user_id=f"user-{n * 7919 % self.persons}")
                e.timestamp.FromMicroseconds(int(time.time() * 1e6))
                e.properties.update({"path": "/steady"})
                events.append(e)
                n += 1
            t0 = time.perf_counter()
            try:
                self.stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=events), timeout=30)
            except Exception:  # noqa: BLE001 - counted; the bench reports it
                self.errors += 1
            with self._lock:
                self.latencies.append(time.perf_counter() - t0)
            due += self.interval
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            else:
                due = time.perf_counter()  # behind: no burst to catch up (an open loop would hide the stall)

    def take(self) -> list[float]:
        """The calls' round trips (seconds) since the last take or window."""
        with self._lock:
            xs, self.latencies = self.latencies, []
        return xs

    def window(self) -> dict:
        """Acknowledgement p50/p99/max in ms of the calls since the last window, and how many."""
        xs = self.take()
        if not xs:
            return {"calls": 0}
        ms = [x * 1000 for x in xs]
        return {"calls": len(ms), "p50_ms": round(percentile(ms, 0.5), 2), "p99_ms": round(percentile(ms, 0.99), 2),
                "max_ms": round(max(ms), 2)}
