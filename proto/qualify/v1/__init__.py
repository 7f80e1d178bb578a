"""Generated protobuf and gRPC modules of the qualify.v1 API (built from the .proto files here)."""
