"""Scale-out: Qualify nodes on NATS JetStream (the design is docs/scale-out.md).

Infrastructure, like storage: it adapts JetStream (streams, a key-value
bucket of leases, an object store of snapshots) to the ports the services
use, and runs the partitions this node owns. It never imports transport,
services or delivery; the composition root (server/cluster_app.py) wires it.
"""
