"""gRPC channel and server options shared by the coordinator and its clients, and the metadata key
that carries a refusal's reason (transport layer)."""

from __future__ import annotations

REASON_METADATA_KEY = "arcsim-reason"  # trailing metadata of a refused call: its counted reason

# Clients ping every KEEPALIVE_TIME_MS, also while a stream waits for data (a worker waiting minutes for
# missing peers). gRPC servers accept a ping without data only every 5 minutes by default and answer
# more with GOAWAY "too_many_pings", so the server's minimum is set below the clients' interval.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = KEEPALIVE_TIME_MS // 2


def grpc_options(max_bytes: int) -> list[tuple[str, int]]:
    """A client's channel options (workers, adversaries, tools).

    Each channel gets its own connection (a local subchannel pool): one process holding several
    worker ids behaves as that many machines, and stays within the server's streams per connection.
    """
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.use_local_subchannel_pool", 1),
    ]


def server_options(max_bytes: int, *, max_concurrent_streams: int) -> list[tuple[str, int]]:
    """The coordinator's server options: message limits, keepalive that matches what clients send,
    and a cap on concurrent streams per connection (a worker needs at most four at once: Rounds,
    SubmitGradient, FetchMomentum, Observe)."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_concurrent_streams", max_concurrent_streams),
    ]
