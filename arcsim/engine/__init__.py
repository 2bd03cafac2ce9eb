"""The engine layer: round logic (RunState), evaluation, checkpoints, honest and Byzantine computation,
the in-process engine. Imports the core only (no grpc, protobuf or prometheus_client)."""
