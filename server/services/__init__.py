"""Use cases over domain values: what the transports call, built on the domain and its ports."""
