"""What an outside probe broke (issue 12), each against the real server.

Health and reflection need no key, so their answers to garbage must be as
sane and as quiet as every other service's; streams must notice a revoked
key; shutdown must not wait out its grace for open streams.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The standard services, with the kind of each method ("uu", "us", "ss").
STANDARD_METHODS = [
    ("/grpc.health.v1.Health/Check", "uu"),
    ("/grpc.health.v1.Health/List", "uu"),
    ("/grpc.health.v1.Health/Watch", "us"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "ss"),
]
GARBAGE = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"]


def call_raw(ch: grpc.Channel, method: str, kind: str, payload: bytes) -> grpc.StatusCode:
    identity = dict(request_serializer=None, response_deserializer=None)
    try:
        if kind == "uu":
            ch.unary_unary(method, **identity)(payload, timeout=5)
        elif kind == "us":
            next(iter(ch.unary_stream(method, **identity)(payload, timeout=5)))
        else:
            next(iter(ch.stream_stream(method, **identity)(iter([payload]), timeout=5)))
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def test_health_and_reflection_answer_garbage_with_invalid_argument_quietly(demo_server):
    before = demo_server.log()
    with demo_server.channel() as ch:
        for _ in range(20):
            for method, kind in STANDARD_METHODS:
                for payload in GARBAGE:
                    assert call_raw(ch, method, kind, payload) == grpc.StatusCode.INVALID_ARGUMENT, (method, payload)
        # Still answering real requests.
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    new = demo_server.log()[len(before):].splitlines()
    assert not [line for line in new if "Traceback" in line or "ERROR" in line], new[:5]
    # 240 bad requests: at most a rate-limited warning or two.
    assert len([line for line in new if "undecodable" in line]) <= 2, new
