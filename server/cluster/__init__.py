"""Scale-out: Qualify nodes on NATS JetStream (the design, guarantees and sizing: docs/scale-out.md).

Infrastructure, like storage: it adapts JetStream (streams, key-value
buckets, an object store) to the ports the services use, and runs the
partitions this node owns. It never imports transport, services or
delivery; the composition root (server/cluster_app.py) wires it.

    partitioning  a person's partition: blake2b of the person key
    jetstream     the streams, buckets and object store; the fixed partition count
    messages      what the streams carry (events, control messages, changes)
    publish       ingest's port: events to their partitions, acknowledged after the PubAck
    leases        compare-and-set leases and the live nodes
    node          balancing the partitions over the nodes, heartbeats, snapshots on a schedule
    partition     one owned partition running: consumer, outbox, ticks, snapshots
    apply         what a partition does with its stream (the unchanged Engine, time from the stream)
    handover      identity merges across partitions
    snapshots     partition snapshots in the object store
    readcopy      every node's copy of the whole cluster's memberships, for reads
    audiences     the cluster's audience catalog, fanned out to every partition
    deliveries    realtime syncs, delivered by one node with a cluster-wide cursor
    status        `qualify cluster status`
"""
