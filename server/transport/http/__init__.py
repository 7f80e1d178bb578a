"""The HTTP transport: the Segment tracking API and the Personalization API as JSON, beside gRPC.

It calls the same services as the gRPC servicers, maps their errors through
the same table (transport/errors.py, AIP-193 bodies) and checks keys, scopes
and rates through the same ``authorize`` and objects as the gRPC gate.
"""

from .edge import HttpEdge, start_http

__all__ = ["HttpEdge", "start_http"]
