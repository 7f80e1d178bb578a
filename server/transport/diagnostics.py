"""DiagnosticsService over gRPC: the no-op floor the benches measure against, and GetServerInfo."""

from __future__ import annotations

from qualify.v1 import diagnostics_pb2

from ..services.personalize import PersonalizeService
from .errors import reject_malformed


class Diagnostics:
    def __init__(self, service: PersonalizeService):
        self.service = service

    async def noop(self, request: diagnostics_pb2.NoopRequest, context) -> bytes:
        """The same server stack as every RPC, and no work: the transport's cost alone."""
        return b""

    async def get_server_info(self, request: diagnostics_pb2.GetServerInfoRequest, context):
        reject_malformed(request)
        return diagnostics_pb2.GetServerInfoResponse(**self.service.server_info())
