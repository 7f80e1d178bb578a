"""qualify.server: the Qualify gRPC server, its domain and its storage."""
