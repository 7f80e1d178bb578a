"""[cluster] in qualify.toml, and the partition hash every process must agree on."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qualify.server.cluster.partitioning import partition_of, partitions_of
from qualify.server.config import ProjectError, parse_project
from qualify.server.domain.events import Event, EventType, MatchedEvent

BASE = {
    "warehouse": {"type": "postgres", "dsn": "host=x"},
    "parent_model": {"query": "SELECT 1", "primary_key": "user_id"},
}


def parse(cluster) -> object:
    return parse_project({**BASE, "cluster": cluster}, base=Path.cwd())


def problems(cluster) -> list[str]:
    with pytest.raises(ProjectError) as info:
        parse(cluster)
    return [str(p) for p in info.value.problems]


def test_absent_means_one_node():
    assert parse_project(dict(BASE), base=Path.cwd()).cluster is None


def test_defaults_and_a_list_of_urls():
    c = parse({"nats_url": ["nats://a:4222", "nats://b:4222"], "node_id": "n-1"}).cluster
    assert c.nats_urls == ("nats://a:4222", "nats://b:4222")
    assert (c.node_id, c.partitions, c.replicas, c.lease_ttl, c.snapshot_interval, c.event_retention,
            c.batch_events) == ("n-1", 64, 3, 5.0, 60.0, 86400.0, True)


def test_one_url_as_a_string_and_every_setting():
    c = parse({"nats_url": "nats://127.0.0.1:4222", "node_id": "a", "partitions": 8, "replicas": 1,
               "lease_ttl": "3s", "snapshot_interval": "10s", "event_retention": "1h", "batch_events": False}).cluster
    assert c.nats_urls == ("nats://127.0.0.1:4222",)
    assert (c.partitions, c.replicas, c.lease_ttl, c.snapshot_interval, c.event_retention, c.batch_events) == \
        (8, 1, 3.0, 10.0, 3600.0, False)


def test_every_problem_is_named():
    found = problems({"nats_url": ["http://x", 3], "node_id": "bad id!", "partitions": 0, "replicas": 9,
                      "lease_ttl": "0.5s", "snapshot_interval": "1h", "event_retention": "2h", "nodes": 3,
                      "batch_events": "yes"})
    text = "\n".join(found)
    assert "cluster.nats_url = ['http://x', 3]: must be a nats:// URL or a non-empty list of them" in text
    assert "cluster.node_id = 'bad id!': must be 1 to 64 letters, digits, _ or -" in text
    assert "cluster.partitions = 0: must be an integer from 1 to 4096" in text
    assert "cluster.replicas = 9: must be an integer from 1 to 5" in text
    assert "cluster.lease_ttl = '0.5s': must be at least 1s" in text
    assert "cluster.event_retention = '2h': must cover at least 4 snapshot intervals" in text
    assert "cluster.nodes: unknown key" in text
    assert "cluster.batch_events = 'yes': must be true or false" in text


def test_missing_url_and_bad_url():
    assert problems({"node_id": "a"}) == [
        "cluster.nats_url: is required (a nats:// URL, or a list of them for a NATS cluster)"]
    assert problems({"nats_url": "nats://a b"}) == [
        "cluster.nats_url = 'nats://a b': must look like nats://host:4222 (or tls://host:4222)"]


# -------------------------------------------------------------- the partition hash


def test_partition_is_blake2b_of_the_key_modulo_the_count():
    for key in ("user-1", "anon:8f0e", "ü-ß", ""):
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        assert partition_of(key, 64) == int.from_bytes(digest, "big") % 64
    # Pinned: a change here would move every person of every running cluster.
    assert [partition_of(k, 64) for k in ("user-1", "user-2", "anon:a1", "ü")] == [8, 8, 13, 55]
    assert [partition_of(k, 1000) for k in ("user-1", "user-2")] == [768, 864]


def test_every_process_agrees_whatever_its_hash_seed():
    code = textwrap.dedent("""\
        from qualify.server.cluster.partitioning import partition_of
        print([partition_of(f"user-{i}", 64) for i in range(200)])
        """)
    runs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("0", "1", "12345")}
    assert runs == {str([partition_of(f"user-{i}", 64) for i in range(200)]) + "\n"}


def test_spread_over_partitions_is_even():
    counts = [0] * 64
    for i in range(64_000):
        counts[partition_of(f"user-{i}", 64)] += 1
    assert max(counts) / (64_000 / 64) < 1.15


def test_an_event_goes_to_its_primary_partition_then_to_the_people_it_names():
    e = Event(message_id="m", type=EventType.IDENTIFY, user_id="user-1", anonymous_id="a1")
    targets = partitions_of(MatchedEvent(e, ()), 64)
    assert targets[0] == partition_of("user-1", 64)
    assert set(targets) == {partition_of("user-1", 64), partition_of("anon:a1", 64)}
    anon = Event(message_id="m2", type=EventType.TRACK, anonymous_id="a1")
    assert partitions_of(MatchedEvent(anon, ((0, ("anonymous", "a1")),)), 64) == [partition_of("anon:a1", 64)]


# -------------------------------------------------------------- the share each node claims


@pytest.mark.parametrize("partitions,nodes", [(16, 3), (64, 3), (64, 5), (1024, 128), (7, 7), (3, 5)])
def test_shares_cover_every_partition_and_stay_within_the_balance_target(partitions, nodes):
    from qualify.server.cluster.leases import quota

    names = [f"n{i}" for i in range(nodes)]
    shares = [quota(n, names, partitions) for n in names]
    assert sum(shares) == partitions
    assert max(shares) - min(shares) <= 1
    if partitions >= 2 * nodes:
        assert max(shares) / (partitions / nodes) <= 1.25
