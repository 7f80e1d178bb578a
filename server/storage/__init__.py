"""Storage adapters: the LMDB environment and key layout, warehouse readers."""
