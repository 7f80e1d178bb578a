"""LocalReader against the gRPC Get, in one run on the embedded demo.

    python -m bench local-reader --json [--people 100000] [--gets 50000] [--rpcs 3000]

* LocalReader ``get`` latency from one thread (random people, every field,
  memberships included), timed per call;
* gRPC ``Get`` of the same keys from the same process, and the Noop floor;
* throughput of 1 and of 2 reader processes, each reading for ``--seconds``;
* the reader's latency while the server ingests ``--ingest-rate`` events/s
  (page views that move 10 audiences; sent by a separate process).

The server is ``qualify serve`` (bench/_server.py) on a temporary data dir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import random
import sys
import tempfile
import time
import uuid

from ._proc import machine_note
from ._server import Server, server_note
from ._stats import percentile

TARGETS = {"local_p50_us_max": 15.0, "local_p99_us_max": 50.0, "two_process_speedup_min": 1.6}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench local-reader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--people", type=int, default=100_000, help="demo people (default 100000)")
    p.add_argument("--gets", type=int, default=50_000, help="timed LocalReader gets (default 50000)")
    p.add_argument("--rpcs", type=int, default=3_000, help="timed gRPC Gets and Noops (default 3000)")
    p.add_argument("--seconds", type=float, default=3.0, help="each throughput run (default 3)")
    p.add_argument("--ingest-rate", type=int, default=5_000, help="events/s during the last phase (default 5000)")
    p.add_argument("--audiences", type=int, default=10, help="audiences created first (default 10)")
    p.add_argument("--seed", type=int, default=1)
    return p


def _us(times_ns: list[int]) -> dict:
    xs = [t / 1000 for t in times_ns]
    return {"p50_us": round(percentile(xs, 0.5), 2), "p90_us": round(percentile(xs, 0.9), 2),
            "p99_us": round(percentile(xs, 0.99), 2), "p999_us": round(percentile(xs, 0.999), 2),
            "mean_us": round(sum(xs) / len(xs), 2), "calls": len(xs)}


def _keys(people: int, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"user-{rng.randint(1, people)}" for _ in range(n)]


def time_local(data_dir: str, keys: list[str]) -> dict:
    from qualify.clients import LocalReader

    with LocalReader(data_dir) as reader:
        for k in keys[:2000]:  # warm: pages in, catalog loaded
            reader.get(k)
        perf = time.perf_counter_ns
        times = []
        members = 0
        for k in keys:
            t0 = perf()
            record = reader.get(k)
            times.append(perf() - t0)
            members += len(record.memberships)
    return {**_us(times), "memberships_per_record": round(members / len(keys), 2)}


def time_rpc(address: str, keys: list[str]) -> tuple[dict, dict]:
    from qualify.clients import Client

    perf = time.perf_counter_ns
    with Client(address) as client:
        for k in keys[:200]:
            client.get(k)
            client.noop()
        gets, noops = [], []
        for k in keys:
            t0 = perf()
            client.get(k)
            gets.append(perf() - t0)
            t0 = perf()
            client.noop()
            noops.append(perf() - t0)
    return _us(gets), _us(noops)


def _reader_proc(data_dir: str, people: int, seconds: float, seed: int, start, out) -> None:
    from qualify.clients import LocalReader

    keys = _keys(people, 10_000, seed)
    with LocalReader(data_dir) as reader:
        for k in keys[:1000]:
            reader.get(k)
        start.wait()
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            for k in keys[n % 9000:n % 9000 + 100]:
                reader.get(k)
            n += 100
    out.put(n / seconds)


def throughput(ctx, data_dir: str, people: int, procs: int, seconds: float) -> dict:
    start, out = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=_reader_proc, args=(data_dir, people, seconds, i, start, out)) for i in range(procs)]
    for p in ps:
        p.start()
    time.sleep(1.0)  # every child has opened the reader and warmed up
    start.set()
    rates = [out.get(timeout=seconds + 60) for _ in ps]
    for p in ps:
        p.join()
    return {"processes": procs, "gets_per_s": round(sum(rates)), "per_process": [round(r) for r in rates]}


def _ingest_proc(address: str, people: int, rate: int, seconds: float, out) -> None:
    import grpc

    from qualify.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc

    rng = random.Random(7)
    per_batch = max(1, rate // 50)  # 50 batches a second
    sent, t0 = 0, time.monotonic()
    with grpc.insecure_channel(address) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        while (now := time.monotonic()) - t0 < seconds:
            if sent > (now - t0) * rate:
                time.sleep(0.002)
                continue
            events = []
            for _ in range(per_batch):
                ev = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_PAGE, name="p",
                                     user_id=f"user-{rng.randint(1, people)}")
                ev.properties.update({"path": rng.choice(["/pricing", "/home", "/docs", "/blog", "/cart"])})
                ev.timestamp.GetCurrentTime()
                events.append(ev)
            stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=events), timeout=30)
            sent += per_batch
    out.put(sent / (time.monotonic() - t0))


def under_ingest(ctx, address: str, data_dir: str, keys: list[str], rate: int, seconds: float) -> dict:
    out = ctx.Queue()
    p = ctx.Process(target=_ingest_proc, args=(address, len(keys), rate, seconds + 2, out))
    p.start()
    time.sleep(1.0)
    from qualify.clients import LocalReader

    perf = time.perf_counter_ns
    times = []
    with LocalReader(data_dir) as reader:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            k = keys[i % len(keys)]
            i += 1
            t0 = perf()
            reader.get(k)
            times.append(perf() - t0)
    achieved = out.get(timeout=120)
    p.join()
    return {**_us(times), "ingest_events_per_s": round(achieved), "target_events_per_s": rate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = multiprocessing.get_context("spawn")  # children must not inherit grpc or an open environment
    out = {"scenario": "local-reader", "date": datetime.date.today().isoformat(),
           "config": {"people": args.people, "gets": args.gets, "rpcs": args.rpcs, "seconds": args.seconds,
                      "ingest_rate": args.ingest_rate, "audiences": args.audiences}}
    with tempfile.TemporaryDirectory(prefix="qualify-bench-lr-") as work, Server(work, args.people) as server:
        from ._audiences import create

        create(server.address, args.audiences, "lr")
        data_dir = f"{work}/data"
        keys = _keys(args.people, args.gets, args.seed)
        # A first pass of ingest so that people have memberships to decode.
        under_ingest(ctx, server.address, data_dir, keys[:1000], args.ingest_rate, 2.0)
        out["local_get"] = time_local(data_dir, keys)
        out["grpc_get"], out["noop"] = time_rpc(server.address, keys[:args.rpcs])
        out["throughput"] = [throughput(ctx, data_dir, args.people, n, args.seconds) for n in (1, 2)]
        out["under_ingest"] = under_ingest(ctx, server.address, data_dir, keys, args.ingest_rate, args.seconds)
        out["server"] = server_note(server)
    out["machine"] = machine_note()
    one, two = (t["gets_per_s"] for t in out["throughput"])
    out["targets"] = {**TARGETS, "pass": {
        "local_p50": out["local_get"]["p50_us"] <= TARGETS["local_p50_us_max"],
        "local_p99": out["local_get"]["p99_us"] <= TARGETS["local_p99_us_max"],
        "two_processes": two >= TARGETS["two_process_speedup_min"] * one}, "speedup": round(two / one, 2)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        lg, rg, nf, ui = out["local_get"], out["grpc_get"], out["noop"], out["under_ingest"]
        print(f"LocalReader get: p50 {lg['p50_us']} µs, p99 {lg['p99_us']} µs; gRPC Get p50 {rg['p50_us']} µs, "
              f"p99 {rg['p99_us']} µs; Noop p50 {nf['p50_us']} µs")
        print(f"throughput: 1 process {one:,}/s, 2 processes {two:,}/s ({out['targets']['speedup']}x)")
        print(f"while ingesting {ui['ingest_events_per_s']:,} events/s: p50 {ui['p50_us']} µs, p99 {ui['p99_us']} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
