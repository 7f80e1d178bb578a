"""Transport: the only code that imports grpc or the generated qualify.v1 modules."""
