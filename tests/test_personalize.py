"""PersonalizeService, DiagnosticsService, health and reflection, end to end.

Every test talks to a real ``qualify serve`` through generated stubs or
``qualify.clients``. Expected values come from the DuckDB warehouse itself,
read directly, never from the server. Error details are checked both raw
(``grpc_status.rpc_status.from_call`` + ``google.rpc.error_details_pb2``) and
as the clients parse them.
"""

from __future__ import annotations

import datetime as dt
import decimal
import importlib.metadata
import math
import random
import textwrap
from pathlib import Path

import duckdb
import grpc
import pytest
from google.protobuf import descriptor_pool, field_mask_pb2, json_format
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import QualifyServer, write_project
from qualify.clients import Client, InvalidArgumentError, NotFoundError
from qualify.v1 import (
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    personalize_pb2,
    personalize_pb2_grpc,
)

PEOPLE = 2_000
# The demo warehouse's customers columns: every one is a field of the collection.
DEMO_FIELDS = ("user_id", "plan", "loyalty_tier", "ltv", "predicted_churn", "country", "signup_date",
               "recommended_product", "orders_count", "email_opt_in", "last_order_at")
QUALIFY_SERVICES = ("qualify.v1.PersonalizeService", "qualify.v1.DiagnosticsService", "qualify.v1.IngestService",
                    "qualify.v1.AudienceService", "qualify.v1.SyncService")
DOMAIN = "qualify.dev"


# ---------------------------------------------------------------- helpers


def expected_value(value):
    """A warehouse value as the Struct carries it (see personalize.proto's Record.fields)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, float, decimal.Decimal)):
        return float(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        text = value.strftime("%Y-%m-%dT%H:%M:%S")
        return text + (f".{value.microsecond:06d}" if value.microsecond else "") + "Z"
    if isinstance(value, dt.date):
        return f"{value.year:04d}-{value.month:02d}-{value.day:02d}T00:00:00Z"
    raise TypeError(f"no expectation for {value!r}")


def warehouse_records(path: Path, query: str, key: str) -> dict[str, dict]:
    """key -> {column: expected Struct value}, read straight from DuckDB."""
    with duckdb.connect(str(path), read_only=True) as con:
        cur = con.execute(query)
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
    return {row[names.index(key)]: {n: expected_value(v) for n, v in zip(names, row)} for row in rows}


def same_values(got: dict, want: dict) -> bool:
    """Dict equality where NaN equals NaN."""
    if got.keys() != want.keys():
        return False
    for k, w in want.items():
        g = got[k]
        if isinstance(w, float) and math.isnan(w):
            if not (isinstance(g, float) and math.isnan(g)):
                return False
        elif g != w or type(g) is not type(w):
            return False
    return True


def rich_error(err: grpc.RpcError):
    """(status, ErrorInfo, BadRequest or None) parsed from the call's trailers."""
    status = rpc_status.from_call(err)
    assert status is not None, f"{err.code()} without a google.rpc.Status detail: {err.details()}"
    assert status.code == err.code().value[0]
    infos, bads = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            bads.append(bad)
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {status.details}"
    assert infos[0].domain == DOMAIN
    assert len(bads) <= 1
    return status, infos[0], (bads[0] if bads else None)


def expect_error(call, code: grpc.StatusCode, reason: str):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == code, f"{err.code()}: {err.details()}"
    status, info, bad = rich_error(err)
    assert info.reason == reason, f"{info.reason}: {status.message}"
    return status, info, bad


def violation_fields(bad) -> list[str]:
    assert bad is not None, "no BadRequest detail"
    return [v.field for v in bad.field_violations]


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def fields_of(record: personalize_pb2.Record) -> dict:
    return json_format.MessageToDict(record.fields)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def channel(demo_server):
    with demo_server.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def personalize(channel):
    return personalize_pb2_grpc.PersonalizeServiceStub(channel)


@pytest.fixture(scope="module")
def client(demo_server):
    with Client(demo_server.address, timeout=5) as c:
        yield c


@pytest.fixture(scope="module")
def demo_rows(demo_server) -> dict[str, dict]:
    """The demo server's own warehouse, as generated in its workdir."""
    path = demo_server.workdir / "qualify-data" / f"demo-warehouse-{PEOPLE}.duckdb"
    assert path.is_file(), f"the demo server did not generate {path}"
    rows = warehouse_records(path, "SELECT * FROM customers", "user_id")
    assert len(rows) == PEOPLE
    return rows


# ---------------------------------------------------------------- Get


@pytest.mark.parametrize("key", ["user-1", "user-42", "user-1999", "user-2000"])
def test_get_returns_the_warehouse_record(personalize, demo_rows, key):
    response = personalize.Get(personalize_pb2.GetRequest(collection="customers", key=key), timeout=5)
    record = response.record
    assert record.collection == "customers"
    assert record.key == key
    assert fields_of(record) == demo_rows[key]
    assert list(record.memberships) == []  # no audiences are defined


def test_every_demo_person_matches_the_warehouse(client, demo_rows):
    keys = sorted(demo_rows)
    for chunk in (keys[:1000], keys[1000:]):
        result = client.batch_get(chunk)
        assert result.missing_keys == []
        assert [r.key for r in result.records] == chunk
        for record in result.records:
            assert record.collection == "customers"
            assert record.fields == demo_rows[record.key], record.key
            assert record.memberships == []


def test_the_demo_collection_has_every_warehouse_column(personalize):
    record = personalize.Get(personalize_pb2.GetRequest(collection="customers", key="user-5"), timeout=5).record
    assert set(record.fields.fields) == set(DEMO_FIELDS)


# ---------------------------------------------------------------- read masks


def test_read_mask_returns_exactly_the_named_fields(personalize, demo_rows):
    request = personalize_pb2.GetRequest(collection="customers", key="user-42", read_mask=mask("plan", "ltv"))
    record = personalize.Get(request, timeout=5).record
    assert fields_of(record) == {"plan": demo_rows["user-42"]["plan"], "ltv": demo_rows["user-42"]["ltv"]}
    assert record.key == "user-42" and record.collection == "customers"


def test_client_fields_argument_is_a_read_mask(client, demo_rows):
    assert client.get("user-7", fields=["email_opt_in"]).fields == {"email_opt_in": demo_rows["user-7"]["email_opt_in"]}


def test_an_empty_read_mask_returns_every_field(personalize, demo_rows):
    request = personalize_pb2.GetRequest(collection="customers", key="user-9", read_mask=mask())
    assert fields_of(personalize.Get(request, timeout=5).record) == demo_rows["user-9"]


def test_a_repeated_mask_path_returns_the_field_once(personalize, demo_rows):
    request = personalize_pb2.GetRequest(collection="customers", key="user-9", read_mask=mask("plan", "country", "plan"))
    record = personalize.Get(request, timeout=5).record
    assert fields_of(record) == {"plan": demo_rows["user-9"]["plan"], "country": demo_rows["user-9"]["country"]}


def test_batch_get_applies_the_read_mask_to_every_record(client, demo_rows):
    result = client.batch_get(["user-3", "user-4", "nobody"], fields=["country"])
    assert [r.fields for r in result.records] == [{"country": demo_rows[k]["country"]} for k in ("user-3", "user-4")]
    assert result.missing_keys == ["nobody"]


def test_unknown_mask_field_is_invalid_argument_raw(personalize):
    request = personalize_pb2.GetRequest(collection="customers", key="user-42", read_mask=mask("plan", "shoe_size"))
    status, info, bad = expect_error(lambda: personalize.Get(request, timeout=5),
                                     grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_FIELD")
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert violation_fields(bad) == ["read_mask.paths"]
    assert "'shoe_size'" in bad.field_violations[0].description
    assert "shoe_size" in status.message


def test_each_unknown_mask_field_is_a_violation(client):
    with pytest.raises(InvalidArgumentError) as caught:
        client.get("user-42", fields=["nope", "plan", "Plan"])
    err = caught.value
    assert err.reason == "UNKNOWN_FIELD"
    assert [f for f, _ in err.field_violations] == ["read_mask.paths", "read_mask.paths"]
    assert "'nope'" in err.field_violations[0][1] and "'Plan'" in err.field_violations[1][1]


def test_unknown_mask_field_on_batch_get(personalize):
    request = personalize_pb2.BatchGetRequest(collection="customers", keys=["user-1"], read_mask=mask("shoe_size"))
    _, _, bad = expect_error(lambda: personalize.BatchGet(request, timeout=5),
                             grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_FIELD")
    assert violation_fields(bad) == ["read_mask.paths"]


# ---------------------------------------------------------------- errors


def test_unknown_key_is_not_found_raw(personalize):
    request = personalize_pb2.GetRequest(collection="customers", key="user-2001")
    status, info, bad = expect_error(lambda: personalize.Get(request, timeout=5),
                                     grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")
    assert status.code == code_pb2.NOT_FOUND
    assert "user-2001" in status.message
    assert info.metadata["collection"] == "customers"
    assert bad is None  # nothing is wrong with the request itself


def test_unknown_key_is_not_found_through_the_client(client):
    with pytest.raises(NotFoundError) as caught:
        client.get("user-0")
    assert caught.value.reason == "KEY_NOT_FOUND"
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.metadata == {"collection": "customers"}


@pytest.mark.parametrize("method", ["Get", "BatchGet"])
def test_unknown_collection_is_invalid_argument(personalize, method):
    if method == "Get":
        call = lambda: personalize.Get(personalize_pb2.GetRequest(collection="custmers", key="user-1"), timeout=5)  # noqa: E731
    else:
        call = lambda: personalize.BatchGet(personalize_pb2.BatchGetRequest(collection="custmers", keys=["user-1"]), timeout=5)  # noqa: E731
    status, _, bad = expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_COLLECTION")
    assert "custmers" in status.message
    assert violation_fields(bad) == ["collection"]
    assert "customers" in bad.field_violations[0].description  # names the collections there are


def test_unknown_collection_through_the_client(client):
    with pytest.raises(InvalidArgumentError) as caught:
        client.get("user-1", collection="orders")
    assert caught.value.reason == "UNKNOWN_COLLECTION"
    assert [f for f, _ in caught.value.field_violations] == ["collection"]


@pytest.mark.parametrize("method, request_, field", [
    ("Get", personalize_pb2.GetRequest(collection="", key="user-1"), "collection"),
    ("Get", personalize_pb2.GetRequest(collection="customers", key=""), "key"),
    ("Get", personalize_pb2.GetRequest(), "collection"),
    ("BatchGet", personalize_pb2.BatchGetRequest(collection="", keys=["user-1"]), "collection"),
    ("BatchGet", personalize_pb2.BatchGetRequest(collection="customers", keys=["user-1", "user-2", ""]), "keys[2]"),
], ids=["get-empty-collection", "get-empty-key", "get-empty-request", "batch-empty-collection", "batch-empty-key"])
def test_empty_names_are_invalid_request(personalize, method, request_, field):
    status, _, bad = expect_error(lambda: getattr(personalize, method)(request_, timeout=5),
                                  grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert violation_fields(bad) == [field]


@pytest.mark.parametrize("key", ["k" * 512, "é" * 256, "𝄞" * 128], ids=["512-ascii", "256-two-byte", "128-four-byte"])
def test_keys_longer_than_511_bytes_are_invalid(personalize, key):
    assert len(key.encode()) == 512
    _, _, bad = expect_error(lambda: personalize.Get(personalize_pb2.GetRequest(collection="customers", key=key), timeout=5),
                             grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert violation_fields(bad) == ["key"]
    assert "511" in bad.field_violations[0].description


def test_a_511_byte_key_is_a_valid_lookup(personalize):
    key = "é" * 255 + "k"  # 511 bytes, 256 characters
    assert len(key.encode()) == 511
    expect_error(lambda: personalize.Get(personalize_pb2.GetRequest(collection="customers", key=key), timeout=5),
                 grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")


def test_a_long_key_in_a_batch_names_its_index(personalize):
    request = personalize_pb2.BatchGetRequest(collection="customers", keys=["user-1", "user-2", "k" * 600])
    _, _, bad = expect_error(lambda: personalize.BatchGet(request, timeout=5),
                             grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert violation_fields(bad) == ["keys[2]"]


# ---------------------------------------------------------------- BatchGet


def test_batch_get_keeps_request_order_and_lists_missing_keys(personalize, demo_rows):
    keys = ["user-30", "ghost-1", "user-2", "user-30", "USER-2", "user-2000", "ghost-1"]
    response = personalize.BatchGet(personalize_pb2.BatchGetRequest(collection="customers", keys=keys), timeout=5)
    assert [r.key for r in response.records] == ["user-30", "user-2", "user-30", "user-2000"]
    assert [fields_of(r) for r in response.records] == [demo_rows[k] for k in ("user-30", "user-2", "user-30", "user-2000")]
    assert list(response.missing_keys) == ["ghost-1", "USER-2", "ghost-1"]


def test_batch_get_with_no_keys_is_empty(personalize):
    response = personalize.BatchGet(personalize_pb2.BatchGetRequest(collection="customers"), timeout=5)
    assert list(response.records) == [] and list(response.missing_keys) == []


def test_batch_get_of_1000_keys_works(client, demo_rows):
    rng = random.Random(1000)
    keys = [f"user-{i}" for i in rng.sample(range(1, PEOPLE + 1), 990)] + [f"absent-{i}" for i in range(10)]
    rng.shuffle(keys)
    result = client.batch_get(keys)
    assert [r.key for r in result.records] == [k for k in keys if k.startswith("user-")]
    assert result.missing_keys == [k for k in keys if k.startswith("absent-")]
    assert all(r.fields == demo_rows[r.key] for r in result.records)


def test_batch_get_of_1001_keys_is_too_large(personalize, client):
    keys = [f"user-{i}" for i in range(1, 1002)]
    status, info, bad = expect_error(
        lambda: personalize.BatchGet(personalize_pb2.BatchGetRequest(collection="customers", keys=keys), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    assert "1001" in status.message and "1000" in status.message
    assert violation_fields(bad) == ["keys"]
    with pytest.raises(InvalidArgumentError) as caught:
        client.batch_get(keys)
    assert caught.value.reason == "BATCH_TOO_LARGE"


# ---------------------------------------------------------------- malformed requests

# Bytes no protobuf message can be decoded from.
WIRE_GARBAGE = {
    "truncated-varint": b"\xff\xff\xff",
    "length-past-end": b"\x0a\x05ab",
    "end-group-tag": b"\x0c",
    "truncated-field-3": b"\x1a\x01",
    "random": bytes(random.Random(7).getrandbits(8) for _ in range(64)) + b"\xff",
}
# Well-formed wire bytes whose string fields (collection = 1, key/keys = 2) are not UTF-8.
UTF8_GARBAGE = {
    "invalid-utf8-field-1": b"\x0a\x02\xff\xfe",
    "invalid-utf8-field-2": b"\x0a\x09customers\x12\x02\xc3\x28",
    "invalid-utf8-mask-path": b"\x0a\x09customers\x12\x06user-1\x1a\x03\x0a\x01\xff",
}


MALFORMED = [
    *[pytest.param(m, p, id=f"{m.split('/')[1]}-{n}")
      for m in ("PersonalizeService/Get", "PersonalizeService/BatchGet", "DiagnosticsService/GetServerInfo")
      for n, p in WIRE_GARBAGE.items()],
    *[pytest.param(m, p, id=f"{m.split('/')[1]}-{n}")
      for m in ("PersonalizeService/Get", "PersonalizeService/BatchGet")
      for n, p in UTF8_GARBAGE.items()],
]


@pytest.mark.parametrize("method, payload", MALFORMED)
def test_malformed_request_bytes_are_invalid_argument(channel, method, payload):
    call = channel.unary_unary(f"/qualify.v1.{method}", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    status, _, bad = expect_error(lambda: call(payload, timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert violation_fields(bad) == ["(request)"]
    assert "Traceback" not in status.message


def test_the_server_still_serves_after_garbage(channel, personalize):
    call = channel.unary_unary("/qualify.v1.PersonalizeService/Get", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    for payload in [*WIRE_GARBAGE.values(), *UTF8_GARBAGE.values()]:
        with pytest.raises(grpc.RpcError):
            call(payload, timeout=5)
    assert personalize.Get(personalize_pb2.GetRequest(collection="customers", key="user-1"), timeout=5).record.key == "user-1"


# ---------------------------------------------------------------- diagnostics


def test_noop_answers(channel, client):
    stub = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel)
    assert stub.Noop(diagnostics_pb2.NoopRequest(), timeout=5) == diagnostics_pb2.NoopResponse()
    assert stub.Noop(diagnostics_pb2.NoopRequest(payload=b"x" * 65536), timeout=5) == diagnostics_pb2.NoopResponse()
    assert client.noop(b"abc") is None


def test_server_info_describes_the_demo(channel, client, demo_server):
    info = diagnostics_pb2_grpc.DiagnosticsServiceStub(channel).GetServerInfo(diagnostics_pb2.GetServerInfoRequest(), timeout=5)
    assert info.sync_generation >= 1
    assert info.people == PEOPLE
    assert list(info.collections) == ["customers"]
    assert info.version == importlib.metadata.version("qualify")
    assert info.worker_pid == demo_server.proc.pid  # one process serves
    assert client.server_info() == {"version": info.version, "sync_generation": info.sync_generation,
                                    "collections": ["customers"], "people": PEOPLE, "worker_pid": demo_server.proc.pid,
                                    "events_logged": info.events_logged, "events_unmatched": info.events_unmatched,
                                    "max_message_bytes": info.max_message_bytes}


# ---------------------------------------------------------------- health and reflection


@pytest.mark.parametrize("service", ["", *QUALIFY_SERVICES])
def test_health_is_serving(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service_is_not_found(channel):
    with pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="qualify.v1.Nope"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in responses[0].list_services_response.service}
    assert set(QUALIFY_SERVICES) <= names
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_reflection_describes_the_contract(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    assert set(QUALIFY_SERVICES) <= set(db.get_services())
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("qualify.v1.PersonalizeService")
    assert {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods} == {
        "Get": ("qualify.v1.GetRequest", "qualify.v1.GetResponse"),
        "BatchGet": ("qualify.v1.BatchGetRequest", "qualify.v1.BatchGetResponse"),
    }
    mask_field = pool.FindMessageTypeByName("qualify.v1.GetRequest").fields_by_name["read_mask"]
    assert mask_field.message_type.full_name == "google.protobuf.FieldMask"
    watch = pool.FindServiceByName("qualify.v1.AudienceService").methods_by_name["WatchMemberships"]
    assert watch.server_streaming and not watch.client_streaming


# ---------------------------------------------------------------- properties


@settings(max_examples=50, deadline=None, database=None)
@given(number=st.integers(1, PEOPLE),
       paths=st.lists(st.sampled_from(DEMO_FIELDS), unique=True, min_size=1, max_size=len(DEMO_FIELDS)))
def test_property_a_read_mask_selects_exactly_its_fields(personalize, number, paths):
    key = f"user-{number}"
    full = personalize.Get(personalize_pb2.GetRequest(collection="customers", key=key), timeout=5).record
    masked = personalize.Get(personalize_pb2.GetRequest(collection="customers", key=key, read_mask=mask(*paths)),
                             timeout=5).record
    assert set(masked.fields.fields) == set(paths)
    for p in paths:
        assert masked.fields.fields[p] == full.fields.fields[p]
    assert (masked.collection, masked.key) == (full.collection, full.key)


KEYS = st.one_of(
    st.integers(1, PEOPLE).map(lambda i: f"user-{i}"),
    st.integers(PEOPLE + 1, 10**9).map(lambda i: f"user-{i}"),
    st.text(min_size=1, max_size=16),
)


@settings(max_examples=50, deadline=None, database=None)
@given(keys=st.lists(KEYS, max_size=50))
def test_property_batch_get_agrees_with_get(personalize, keys):
    response = personalize.BatchGet(personalize_pb2.BatchGetRequest(collection="customers", keys=keys), timeout=5)
    records, missing = [], []
    for key in keys:
        try:
            records.append(personalize.Get(personalize_pb2.GetRequest(collection="customers", key=key), timeout=5).record)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
            missing.append(key)
    assert list(response.records) == records
    assert list(response.missing_keys) == missing


# ---------------------------------------------------------------- a project warehouse with edge values

EDGE_SQL = textwrap.dedent("""\
    CREATE TABLE customers AS SELECT * FROM (VALUES
      ('p-unicode', 'café ☕ 𝄞', 0::BIGINT, 1.5::DOUBLE, true, TIMESTAMP '2024-05-01 12:34:56.25',
       DATE '2000-02-29', TIMESTAMPTZ '2024-05-01 12:00:00+02', 1.25::DECIMAL(10, 2)),
      ('p-empty', '', -1::BIGINT, 'NaN'::DOUBLE, false, TIMESTAMP '1970-01-01 00:00:00',
       DATE '0001-01-01', NULL, NULL),
      ('p-nulls', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
      ('p-extremes', 'x', 9007199254740993::BIGINT, 'inf'::DOUBLE, true, TIMESTAMP '9999-12-31 23:59:59.999999',
       DATE '9999-12-31', TIMESTAMPTZ '1970-01-01 00:00:00+00', -0.5),
      ('p-nul-byte', 'a' || chr(0) || 'b', (-9223372036854775807 - 1)::BIGINT, -0.0::DOUBLE, false,
       TIMESTAMP '2038-01-19 03:14:08', DATE '1900-01-01', NULL, 0),
      ('p-1960', 'old', 1::BIGINT, 0.1::DOUBLE, true, TIMESTAMP '1960-06-15 12:30:00',
       DATE '1960-06-15', TIMESTAMPTZ '1960-06-15 12:30:00+00', 1),
      ('p-1969', 'older', 2::BIGINT, 0.2::DOUBLE, false, TIMESTAMP '1969-12-31 23:59:59.5',
       DATE '1969-12-31', TIMESTAMPTZ '1969-12-31 23:59:59+00', 2)
    ) AS t(user_id, name, n, f, b, ts, d, tstz, dec)
    """)
EDGE_KEYS_AFTER_1970 = ["p-unicode", "p-empty", "p-nulls", "p-extremes", "p-nul-byte"]
EDGE_KEYS_BEFORE_1970 = ["p-1960", "p-1969"]


@pytest.fixture(scope="module")
def edge_project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge-project")
    warehouse = folder / "edge.duckdb"
    with duckdb.connect(str(warehouse)) as con:
        con.execute(EDGE_SQL)
    write_project(folder, f'type = "duckdb"\npath = "{warehouse}"',
                  attributes='name = "string"\nn = "int"\nts = "timestamp"\n',
                  collections=textwrap.dedent("""\
                      [collections.customers]

                      [collections.things]
                      query = "SELECT user_id AS thing_id, name FROM customers WHERE name <> ''"
                      key = "thing_id"
                      """))
    server = QualifyServer(folder, "--project", str(folder / "qualify.toml")).start()
    yield server, warehouse
    assert server.stop() == 0, server.log()


@pytest.mark.parametrize("key", EDGE_KEYS_AFTER_1970)
def test_warehouse_values_survive_the_wire(edge_project, key):
    server, warehouse = edge_project
    want = warehouse_records(warehouse, "SELECT * FROM customers", "user_id")[key]
    with Client(server.address, timeout=5) as client:
        got = client.get(key).fields
    assert same_values(got, want), f"\n got: {got}\nwant: {want}"


@pytest.mark.parametrize("key", EDGE_KEYS_BEFORE_1970)
def test_timestamps_before_1970_render_as_rfc3339(edge_project, key):
    server, warehouse = edge_project
    want = warehouse_records(warehouse, "SELECT * FROM customers", "user_id")[key]
    with Client(server.address, timeout=5) as client:
        got = client.get(key, fields=["ts", "d", "tstz"]).fields
    assert got == {k: want[k] for k in ("ts", "d", "tstz")}


def test_a_collection_with_its_own_query(edge_project):
    server, warehouse = edge_project
    want = warehouse_records(warehouse, "SELECT user_id AS thing_id, name FROM customers WHERE name <> ''", "thing_id")
    with Client(server.address, timeout=5) as client:
        result = client.batch_get(["p-unicode", "p-empty", "p-nulls", "nobody"], collection="things")
        info = client.server_info()
    assert [(r.collection, r.key) for r in result.records] == [("things", "p-unicode")]
    assert result.records[0].fields == want["p-unicode"]
    assert result.missing_keys == ["p-empty", "p-nulls", "nobody"]  # filtered out by the query, or absent
    assert info["collections"] == ["customers", "things"]
    assert info["people"] == 7
