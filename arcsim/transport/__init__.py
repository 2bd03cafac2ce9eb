"""The transport layer: the wire messages (codec), the gRPC fast path (wire), channel options,
credentials (auth, certs). Imports the core only."""
