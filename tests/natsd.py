"""The NATS cluster the cluster tests run on: bench/_nats.py's launcher (one copy for the bench and the tests)."""

from qualify.bench._nats import NATS_SERVER, NatsCluster, purge_qualify

__all__ = ["NATS_SERVER", "NatsCluster", "purge_qualify"]
