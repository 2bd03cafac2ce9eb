"""The arcsim.v1 methods bound to gRPC with a fast path for the bulk messages.

Almost every byte of a run travels in data-only messages: the chunks of a ``SubmitGradient``
stream (``GradientChunk`` with only ``data`` set), of a ``Rounds`` stream and of an ``Observe`` or
``FetchMomentum`` stream (``RoundEvent`` / ``ObserveEvent`` holding a ``Chunk``). Going through
protobuf, each such message is copied three times on the way out (``bytes(view)``, the message,
``SerializeToString``) and twice on the way in (``FromString``, reading ``data``). Here they are
written as protobuf wire bytes directly (one copy) and read as a zero-copy ``memoryview`` of the
received bytes (the reader then copies it once, into the tensor's buffer). Every other message, and
any data-only message in a form this module does not recognise (unknown fields, another field
order), goes through protobuf as before: what is on the wire is the same protocol, and generated
arcsim.v1 clients and servers interoperate with these bindings (tests/test_wire.py).

- :class:`CoordinatorStub`: the client side, a drop-in for ``coordinator_pb2_grpc.CoordinatorStub``
  whose ``SubmitGradient`` also takes :func:`vector_stream` bytes and whose streams may yield
  ``memoryview`` chunks (the readers in :mod:`arcsim.transport.codec` take both).
- :func:`add_coordinator_to_server`: the server side, in place of
  ``add_CoordinatorServicer_to_server``; ``SubmitGradient`` handlers get ``memoryview`` chunks and
  :class:`Malformed` for bytes that are not a ``GradientChunk``; the streaming methods may yield
  pre-serialised ``bytes`` (:func:`round_stream`) besides messages.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from arcsim.transport import codec
from arcsim.v1 import coordinator_pb2 as pb

SERVICE_NAME = "arcsim.v1.Coordinator"

# Wire tags (field number << 3 | wire type 2, length-delimited), all below 128: one byte each.
_GRADIENT_DATA = 0x22  # GradientChunk.data = 4
_EVENT_CHUNK = 0x12  # RoundEvent.chunk = 2, ObserveEvent.chunk = 2
_CHUNK_DATA = 0x0A  # Chunk.data = 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_length(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``buf[pos:]`` and the position after it; (-1, pos) if it is not a valid one."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return -1, pos


def _data_only(buf: bytes, tag: int, pos: int = 0) -> int:
    """Where the payload starts if ``buf[pos:]`` is exactly one length-delimited field ``tag``, else -1."""
    if len(buf) <= pos or buf[pos] != tag:
        return -1
    length, start = _read_length(buf, pos + 1)
    return start if length >= 0 and start + length == len(buf) else -1


# --------------------------------------------------------------------------------------------
# Writers


def vector_stream(
    t: torch.Tensor,
    *,
    round: int,
    worker_id: int,
    chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
    train_loss: float = math.nan,
    step: int = 0,
) -> Iterator[bytes]:
    """The serialised ``SubmitGradient`` requests for ``t``: a first message with round, worker id,
    header, loss and step (``schedule: async``; no data), then one data-only message per chunk.

    Parsed with protobuf they give the same vector as :func:`arcsim.transport.codec.vector_chunks`; the
    bytes alias nothing (``t`` may change once they are built).

    >>> [len(m) for m in vector_stream(torch.zeros(5), round=3, worker_id=1, chunk_bytes=8)][1:]
    [10, 10, 6]
    """
    codec._check_chunk_bytes(chunk_bytes)
    header, data = codec.encode(t)
    yield pb.GradientChunk(
        round=round, worker_id=worker_id, header=header.to_proto(), train_loss=train_loss, step=step
    ).SerializeToString()
    for chunk in codec.iter_chunks(data, chunk_bytes):
        yield b"".join((bytes((_GRADIENT_DATA,)), _varint(chunk.nbytes), chunk))


def _event_chunk(chunk: memoryview) -> bytes:
    inner = _varint(chunk.nbytes)
    return b"".join(
        (bytes((_EVENT_CHUNK,)), _varint(1 + len(inner) + chunk.nbytes), bytes((_CHUNK_DATA,)), inner, chunk)
    )


def round_stream(
    params: torch.Tensor, *, round: int, deadline_unix_ms: int, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES
) -> list[bytes]:
    """:func:`arcsim.transport.codec.round_events` for ``params``, serialised: build once per round, send to
    every worker (gRPC copies each into its own buffers; protobuf would serialise them per stream).

    >>> events = round_stream(torch.ones(2), round=4, deadline_unix_ms=0, chunk_bytes=4)
    >>> [pb.RoundEvent.FromString(e).WhichOneof("event") for e in events]
    ['round_start', 'chunk', 'chunk']
    """
    codec._check_chunk_bytes(chunk_bytes)
    header, data = codec.encode(params)
    start = pb.RoundStart(round=round, deadline_unix_ms=deadline_unix_ms, params=header.to_proto())
    return [
        pb.RoundEvent(round_start=start).SerializeToString(),
        *(_event_chunk(chunk) for chunk in codec.iter_chunks(data, chunk_bytes)),
    ]


def observe_stream(
    vectors: dict[int, torch.Tensor],
    *,
    chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
    seqs: dict[int, int] | None = None,
) -> Iterator[bytes]:
    """:func:`arcsim.transport.codec.observe_events`, serialised (one copy of each vector's bytes);
    ``seqs``: each vector's arrival number (``schedule: async``), else 0."""
    codec._check_chunk_bytes(chunk_bytes)
    for worker_id in sorted(vectors):
        header, data = codec.encode(vectors[worker_id])
        seq = 0 if seqs is None else seqs[worker_id]
        yield pb.ObserveEvent(
            vector=pb.ObservedVector(worker_id=worker_id, header=header.to_proto(), seq=seq)
        ).SerializeToString()
        for chunk in codec.iter_chunks(data, chunk_bytes):
            yield _event_chunk(chunk)


def serialize(message: Any) -> bytes:
    """A message's wire bytes; ``bytes`` (already serialised) pass through unchanged."""
    return message if type(message) is bytes else message.SerializeToString()


# --------------------------------------------------------------------------------------------
# Readers


@dataclass(frozen=True, slots=True)
class Malformed:
    """Request bytes that are not a valid message: the handler rejects the call (reason ``malformed``).

    gRPC would otherwise end the call with INTERNAL before the handler sees it, uncounted.
    """

    error: str


def parse_vector_chunk(buf: bytes) -> pb.GradientChunk | memoryview | Malformed:
    """A ``SubmitGradient`` request: its payload as a ``memoryview`` if the message carries only data,
    else the parsed message, or :class:`Malformed`."""
    start = _data_only(buf, _GRADIENT_DATA)
    if start >= 0:
        return memoryview(buf)[start:]
    try:
        return pb.GradientChunk.FromString(buf)
    except DecodeError as error:
        return Malformed(f"the request is not a GradientChunk ({error})")


def _event_parser(message_type: Any) -> Any:
    def parse(buf: bytes) -> Any:
        start = _data_only(buf, _EVENT_CHUNK)
        if start >= 0:
            inner = _data_only(buf, _CHUNK_DATA, start)
            if inner >= 0:
                return memoryview(buf)[inner:]
        return message_type.FromString(buf)

    parse.__doc__ = (
        f"A ``{message_type.__name__}``: a Chunk's payload as a ``memoryview`` if that is all it "
        "holds, else the parsed message."
    )
    return parse


parse_round_event = _event_parser(pb.RoundEvent)
parse_observe_event = _event_parser(pb.ObserveEvent)


# --------------------------------------------------------------------------------------------
# Bindings


class CoordinatorStub:
    """The arcsim.v1 client with the fast path (same methods as the generated stub).

    ``SubmitGradient`` takes messages or serialised bytes (:func:`vector_stream`); ``Rounds``,
    ``Observe`` and ``FetchMomentum`` yield messages and ``memoryview`` chunk payloads, which
    :class:`arcsim.transport.codec.RoundEventReader` and :class:`arcsim.transport.codec.ObserveEventReader` accept.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        def method(kind: str, name: str, request: Any, response: Any) -> Any:
            return getattr(channel, kind)(
                f"/{SERVICE_NAME}/{name}", request_serializer=request, response_deserializer=response
            )

        self.Join = method("unary_unary", "Join", pb.JoinRequest.SerializeToString, pb.JoinReply.FromString)
        self.Rounds = method("unary_stream", "Rounds", pb.RoundsRequest.SerializeToString, parse_round_event)
        self.SubmitGradient = method("stream_unary", "SubmitGradient", serialize, pb.SubmitReply.FromString)
        self.Observe = method("unary_stream", "Observe", pb.ObserveRequest.SerializeToString, parse_observe_event)
        self.FetchMomentum = method(
            "unary_stream", "FetchMomentum", pb.FetchMomentumRequest.SerializeToString, parse_observe_event
        )


def add_coordinator_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """Serve ``servicer``'s arcsim.v1 methods on ``server`` with the fast path."""
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join,
            request_deserializer=pb.JoinRequest.FromString,
            response_serializer=pb.JoinReply.SerializeToString,
        ),
        "Rounds": grpc.unary_stream_rpc_method_handler(
            servicer.Rounds, request_deserializer=pb.RoundsRequest.FromString, response_serializer=serialize
        ),
        "SubmitGradient": grpc.stream_unary_rpc_method_handler(
            servicer.SubmitGradient,
            request_deserializer=parse_vector_chunk,
            response_serializer=pb.SubmitReply.SerializeToString,
        ),
        "Observe": grpc.unary_stream_rpc_method_handler(
            servicer.Observe, request_deserializer=pb.ObserveRequest.FromString, response_serializer=serialize
        ),
        "FetchMomentum": grpc.unary_stream_rpc_method_handler(
            servicer.FetchMomentum,
            request_deserializer=pb.FetchMomentumRequest.FromString,
            response_serializer=serialize,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
