"""Plain-Python domain: schema, project configuration types, errors. No grpc, no lmdb."""
