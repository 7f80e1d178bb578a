"""The gRPC transport in process: a grpc.aio server on port 0 over a real (empty) LMDB environment.

Where a subprocess is not what is being tested, the server's own
``create_server`` runs in the test's event loop: the handlers built by
``handlers_for``, the gate and the error table, with nothing mocked.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from qualify.server.app import create_server
from qualify.server.storage.lmdb_store import Reader, open_env
from qualify.v1 import diagnostics_pb2, ingest_pb2, personalize_pb2


def reason_of(err: grpc.aio.AioRpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


@pytest.fixture
def serve(tmp_path):
    env = open_env(tmp_path / "lmdb", 1 << 26, readonly=False)

    async def start():
        server, port, *_ = await create_server(Reader(env))  # no writing servicers: this is a reading process
        await server.start()
        return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    yield start
    env.close()


def run(serve, calls):
    async def main():
        server, channel = await serve()
        try:
            return await calls(channel)
        finally:
            await channel.close()
            await server.stop(0)

    return asyncio.run(main())


def test_an_rpc_without_a_servicer_answers_unimplemented_with_its_reason(serve):
    async def calls(channel):
        track = channel.unary_unary("/qualify.v1.IngestService/Track",
                                    request_serializer=ingest_pb2.TrackRequest.SerializeToString,
                                    response_deserializer=ingest_pb2.TrackResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await track(ingest_pb2.TrackRequest(), timeout=5)
        return info.value

    err = run(serve, calls)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED and reason_of(err) == "NOT_IMPLEMENTED"
    assert "IngestService/Track" in err.details()


def test_undecodable_bytes_answer_invalid_argument_and_an_empty_store_not_ready(serve):
    async def calls(channel):
        raw = channel.unary_unary("/qualify.v1.PersonalizeService/Get")  # bytes in, bytes out
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await raw(b"\xff\xff\xff", timeout=5)
        get = channel.unary_unary("/qualify.v1.PersonalizeService/Get",
                                  request_serializer=personalize_pb2.GetRequest.SerializeToString,
                                  response_deserializer=personalize_pb2.GetResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as not_ready:
            await get(personalize_pb2.GetRequest(collection="customers", key="user-1"), timeout=5)
        noop = channel.unary_unary("/qualify.v1.DiagnosticsService/Noop",
                                   request_serializer=diagnostics_pb2.NoopRequest.SerializeToString,
                                   response_deserializer=diagnostics_pb2.NoopResponse.FromString)
        return bad.value, not_ready.value, await noop(diagnostics_pb2.NoopRequest(), timeout=5)

    bad, not_ready, noop = run(serve, calls)
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(bad) == "INVALID_REQUEST"
    assert not_ready.code() == grpc.StatusCode.UNAVAILABLE and reason_of(not_ready) == "NOT_READY"
    assert noop == diagnostics_pb2.NoopResponse()
