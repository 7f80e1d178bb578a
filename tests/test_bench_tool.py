"""The load bench (qualify bench / python -m bench) against real servers.

The stall test freezes a real server process with SIGSTOP for 200 ms in the
middle of a run: no hook in the server, and nothing a load generator with
coordinated omission could hide from an open loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import grpc
import pytest

from conftest import SMALL_DEMO
from qualify.bench import _inputs, report, tool
from qualify.bench._schedule import Schedule, ScheduleError
from qualify.v1 import audience_pb2, audience_pb2_grpc, diagnostics_pb2, diagnostics_pb2_grpc, ingest_pb2

STALL = 0.2


def bench(*argv: str, **kw) -> dict:
    """Runs the bench in this process, as `python -m bench` would, and returns its result."""
    return tool.run(tool.build_parser().parse_args(list(argv)), **kw)


def scenario(result: dict) -> dict:
    return report.scenario_phase(result)


def count_at_least(encoded: str, us: int) -> int:
    hist = report.decode(encoded)
    return hist.get_total_count() - report._count_below(hist, us)


# Inputs and schedules: no server ----------------------------------------------


def test_schedules_place_every_request_and_reject_nonsense():
    const = Schedule.parse("constant:100").offsets(2.0)
    assert len(const) == 200 and const[1] - const[0] == pytest.approx(0.01)
    step = Schedule.parse("step:100,300").offsets(2.0)
    assert len(step) == 400 and (step < 1.0).sum() == 100 and (step >= 1.0).sum() == 300
    ramp = Schedule.parse("ramp:0:200").offsets(2.0)
    assert len(ramp) == 200 and all(b > a for a, b in zip(ramp, ramp[1:])) and ramp[-1] < 2.0
    # The rate rises: the second half holds three times the requests of the first.
    assert (ramp >= 1.0).sum() == pytest.approx(3 * (ramp < 1.0).sum(), rel=0.05)
    for bad in ("constant:-1", "ramp:5", "poisson:3", "step:"):
        with pytest.raises(ScheduleError):
            Schedule.parse(bad)


def test_keys_are_seeded_and_zipf_is_skewed():
    inputs = _inputs.Inputs(key_count=1000, distribution="zipf", zipf_exponent=1.1)
    a, b = _inputs.Keys(inputs, 7).sample(20_000), _inputs.Keys(inputs, 7).sample(20_000)
    assert a == b and a != _inputs.Keys(inputs, 8).sample(20_000)
    zipf_top = Counter(a).most_common(1)[0][1]
    uniform_top = Counter(_inputs.Keys(_inputs.Inputs(key_count=1000), 7).sample(20_000)).most_common(1)[0][1]
    assert zipf_top > 10 * uniform_top
    assert all(k.startswith("user-") and 1 <= int(k[5:]) <= 1000 for k in a)


def test_spliced_events_parse_as_one_stream_batch_with_unique_ids():
    inputs = _inputs.load_inputs()
    events = _inputs.Events(inputs, _inputs.Keys(inputs, 1), 1, pool=64)
    req = ingest_pb2.StreamEventsRequest.FromString(_inputs.stream_request(300, events.batch(100)))
    assert req.batch_number == 300 and len(req.events) == 100
    assert len({e.message_id for e in req.events}) == 100
    assert all(e.user_id.startswith("user-") and e.timestamp.seconds > 0 for e in req.events)
    assert {e.type for e in req.events} <= {1, 2}
    assert any(e.properties["path"] for e in req.events if e.type == 2)


def test_inputs_file_mistakes_are_named(tmp_path):
    bad = tmp_path / "inputs.toml"
    bad.write_text('[keys]\ndistribution = "pareto"\n')
    with pytest.raises(_inputs.InputsError, match="keys.distribution"):
        _inputs.load_inputs(bad)
    bad.write_text('[mix]\nget = 1\ndelete = 2\n')
    with pytest.raises(_inputs.InputsError, match="delete"):
        _inputs.load_inputs(bad)
    with pytest.raises(_inputs.InputsError, match="NAME=RATIO"):
        _inputs.parse_mix("get:9")


# The stall: open loop shows it, closed loop says what it left out ------------------


def _stall_at(pid: int, offset: float):
    """A progress hook that freezes ``pid`` for STALL seconds ``offset`` s into the measured phase."""
    timers = []

    def hook(event, **kw):
        if event == "phase_start" and kw["name"] != "warmup":
            def stall():
                os.kill(pid, signal.SIGSTOP)
                time.sleep(STALL)
                os.kill(pid, signal.SIGCONT)

            t = threading.Timer(max(0.0, kw["t0"] + offset - time.perf_counter()), stall)
            t.start()
            timers.append(t)

    return hook, timers


def test_a_stalled_server_shows_in_the_open_loop_tail_and_the_closed_loop_reports_fewer_requests(server_factory):
    server = server_factory("--demo-people", str(SMALL_DEMO))
    rate, duration = "400", "3"
    common = ("personalize", "--target", server.address, "--rate", rate, "--duration", duration, "--warmup", "0.5",
              "--people", str(SMALL_DEMO), "--timeout", "5")

    hook, timers = _stall_at(server.proc.pid, 1.5)
    opened = bench(*common, progress=hook)
    closed = bench(*common, "--concurrency", "1", progress=_stall_at(server.proc.pid, 1.5)[0])
    for t in timers:
        t.join()

    o, c = scenario(opened), scenario(closed)
    o_lat = o["series"]["get"]["latency_us"]
    # Every scheduled request was sent and answered, and the ones due during the
    # stall waited for it: the open loop's p99.9 and max show the 200 ms.
    assert o["scheduled"] == o["sent"] == o["completed"] == 1200 and o["errors"] == 0
    assert o_lat["p99_9"] >= 0.9 * STALL * 1e6 and o_lat["max"] >= 0.9 * STALL * 1e6
    assert count_at_least(o["series"]["get"]["hist"], 100_000) >= 20  # ~80 requests were due in the stall
    assert max(p["max_us"] for p in o["series"]["get"]["timeline"]) >= 0.9 * STALL * 1e6

    # The closed loop (one in flight, paced to the same rate) sent nothing while
    # its one request hung, so it completed fewer requests, and says so.
    assert c["mode"] == "closed" and c["scheduled"] == 1200
    assert c["completed"] < o["completed"] and c["dropped"] >= 40
    assert any("never sent" in w and "coordinated omission" in w for w in c["warnings"])
    # Its tail hides the stall: one request saw it, where the open loop had dozens.
    assert count_at_least(c["series"]["get"]["hist"], 100_000) <= 2
    summary = report.text(closed)
    assert "dropped" in summary and "coordinated omission" in summary


# The command line against a running server ----------------------------------------


def run_cli(*argv: str, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "qualify.server.cli", "bench", *argv], capture_output=True,
                          text=True, timeout=180, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_json_two_load_processes_floor_report_and_compare(demo_server, tmp_path):
    target = ("--target", demo_server.address, "--people", str(SMALL_DEMO), "--warmup", "0.3")
    first = run_cli("personalize", *target, "--rate", "300", "--duration", "1.5", "--processes", "2",
                    "--floor", "--json")
    run = json.loads(first.stdout)
    ph = scenario(run)
    get = ph["series"]["get"]
    # Two processes, one schedule: every request counted once, histograms merged.
    assert ph["scheduled"] == ph["sent"] == ph["completed"] == get["count"] == 450
    assert report.decode(get["hist"]).get_total_count() == 450
    lat = get["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["p99_99"] <= lat["max"]
    assert sum(p["count"] for p in get["timeline"]) == 450
    assert ph["cpu"]["measured"] and ph["cpu"]["server_us_per_request"] > 0  # a local server: found through GetServerInfo
    floor = next(p for p in run["phases"] if p["role"] == "floor")
    assert floor["series"]["noop"]["count"] == 450 and floor["errors"] == 0

    old = tmp_path / "old.json"
    old.write_text(first.stdout)
    html = tmp_path / "run.html"
    second = run_cli("personalize", *target, "--rate", "300", "--duration", "1", "--compare", str(old),
                     "--report", str(html))
    text = second.stdout
    for part in ("Summary:", "Requests/sec:", "Latency distribution", "p99.9", "Status code distribution",
                 "[OK]", "Server CPU:", "Compared with"):
        assert part in text, text
    page = html.read_text()
    assert "<svg" in page and "Latency by percentile" in page and "Latency over time" in page

    # An earlier run that was much faster: the regression is flagged, in text, HTML and the exit code.
    fast = json.loads(first.stdout)
    for key in ("p50", "p90", "p99", "p99_9", "p99_99", "max"):
        scenario(fast)["series"]["get"]["latency_us"][key] = 1
    old.write_text(json.dumps(fast))
    png = tmp_path / "run.png"
    third = run_cli("personalize", *target, "--rate", "300", "--duration", "1", "--compare", str(old),
                    "--report", str(png), "--fail-on-regression", check=False)
    assert third.returncode == 3, third.stderr
    assert "REGRESSION" in third.stdout and "regression(s)" in third.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_mixed_closed_loop_and_a_generator_that_cannot_keep_up(demo_server):
    target = ("--target", demo_server.address, "--people", str(SMALL_DEMO), "--warmup", "0")
    mixed = bench("mixed", *target, "--mix", "get=3,track=1", "--concurrency", "4", "--duration", "1.5")
    ph = scenario(mixed)
    s = ph["series"]
    assert ph["mode"] == "closed" and ph["errors"] == 0
    assert s["all"]["count"] == s["get"]["count"] + s["track"]["count"] == ph["completed"]
    assert 2 < s["get"]["count"] / s["track"]["count"] < 4.5
    # 20,000 requests/s is beyond one Python process: the bench says so.
    behind = bench("noop", *target, "--rate", "20000", "--duration", "1")
    assert any("fell behind the schedule" in w for w in scenario(behind)["warnings"])


def test_ingest_streams_durable_batches_and_cleans_up_its_audiences(demo_server):
    ch = grpc.insecure_channel(demo_server.address)
    info = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).GetServerInfo
    logged = info(diagnostics_pb2.GetServerInfoRequest()).events_logged
    result = bench("ingest", "--target", demo_server.address, "--people", str(SMALL_DEMO), "--warmup", "0",
                   "--rate", "50", "--duration", "1", "--batch", "40", "--audiences", "3")
    ph = scenario(result)
    assert result["target"]["audiences_created"] == 3
    assert ph["completed"] == 50 and ph["errors"] == 0 and ph["rejected_events"] == 0
    assert ph["items"] == 2000 and ph["items_per_request"] == 40
    # Acknowledged means logged: the server's event log grew by every event.
    assert info(diagnostics_pb2.GetServerInfoRequest()).events_logged - logged == 2000
    ids = [a.id for a in audience_pb2_grpc.AudienceServiceStub(ch).ListAudiences(
        audience_pb2.ListAudiencesRequest()).audiences]
    assert not [a for a in ids if a.startswith("bench_")]
    ch.close()


def test_http_scenarios_read_and_ingest_durably_over_the_http_api(demo_server):
    http = f"127.0.0.1:{demo_server.http_port}"
    target = ("--target", demo_server.address, "--http-target", http, "--people", str(SMALL_DEMO), "--warmup", "0")
    reads = scenario(bench("personalize-http", *target, "--rate", "100", "--duration", "1"))
    assert reads["completed"] == 100 and reads["errors"] == 0 and reads["series"]["get-http"]["latency_us"]["p50"] > 0
    with grpc.insecure_channel(demo_server.address) as ch:
        info = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).GetServerInfo
        logged = info(diagnostics_pb2.GetServerInfoRequest()).events_logged
        ph = scenario(bench("ingest-http", *target, "--rate", "40", "--duration", "1", "--batch", "25"))
        assert ph["completed"] == 40 and ph["errors"] == 0 and ph["rejected_events"] == 0
        assert ph["items"] == 1000 and ph["items_per_request"] == 25
        # Answered 200 means logged: every event is in the log once the bench returns.
        assert info(diagnostics_pb2.GetServerInfoRequest()).events_logged - logged == 1000


@pytest.mark.parametrize("via", ["watch", "get"])
def test_e2e_times_each_event_to_its_membership_change(demo_server, via):
    result = bench("e2e", "--target", demo_server.address, "--people", str(SMALL_DEMO), "--rate", "50",
                   "--duration", "1", "--via", via)
    ph = scenario(result)
    primary = {"watch": "change", "get": "visible_in_get"}[via]
    assert ("WatchMemberships" in result["target"]["e2e_measures"]) == (via == "watch")
    assert ph["primary"] == primary and ph["completed"] == 50 and ph["errors"] == 0
    assert ph["series"]["ack"]["count"] == 50
    if via == "get":  # the first Get goes out after the acknowledgement
        assert ph["series"][primary]["latency_us"]["min"] > ph["series"]["ack"]["latency_us"]["min"]
    with grpc.insecure_channel(demo_server.address) as ch:
        ids = [a.id for a in audience_pb2_grpc.AudienceServiceStub(ch).ListAudiences(
            audience_pb2.ListAudiencesRequest()).audiences]
    assert not [a for a in ids if a.startswith("bench_e2e_")]


def test_python_m_bench_starts_its_own_server_and_explains_mistakes(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench", "noop", "--people", "500", "--rate", "100",
                           "--duration", "0.5", "--warmup", "0", "--json"],
                          capture_output=True, text=True, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert run["target"]["started_by_bench"] and run["target"]["exit_code"] == 0
    assert scenario(run)["completed"] == 50
    bad = run_cli("personalize", "--target", "127.0.0.1:1", "--schedule", "ramp:5", check=False)
    assert bad.returncode == 1 and "ramp:R0:R1" in bad.stderr


def test_retention_soak_sees_the_log_level_off_and_a_stalled_sync_hold_the_changelog(tmp_path):
    """python -m bench retention-soak, scaled down to seconds: retention 3 s, a receiver refusing for 3 s."""
    proc = subprocess.run([sys.executable, "-m", "bench", "retention-soak", "--json", "--duration", "10",
                           "--event-retention", "3", "--changelog-retention", "2", "--stall", "3",
                           "--sample-every", "0.5", "--rate", "200", "--people", "500", "--persons", "500",
                           "--workdir", str(tmp_path)],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("{"), proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    samples = out["samples"]
    assert samples and samples[-1]["t_s"] >= 9, proc.stderr[-2000:]
    sent = 200 * samples[-1]["t_s"]
    assert max(s["events_entries"] for s in samples) < 0.6 * sent  # the log kept about its retention, not all
    assert out["pass"]["changelog_held_back_while_stalled"], out["changelog"]
    assert out["changelog"]["sync_caught_up_at_s"] is not None and out["pass"]["nothing_dead_lettered"]
    assert out["changelog"]["entries_at_end"] < out["changelog"]["entries_max"], out["changelog"]
    assert set(out["pass"]) == {"event_log_levels_off", "changelog_held_back_while_stalled",
                                "changelog_compacted_after_catch_up", "nothing_dead_lettered"}
