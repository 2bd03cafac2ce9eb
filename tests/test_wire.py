"""arcsim.transport.wire: the fast path writes and reads exactly what protobuf would, and falls back to it.

The writers' bytes must parse, with the generated protobuf classes, into the messages of
arcsim.transport.codec's senders (so any arcsim.v1 implementation understands them); the readers must give
what protobuf gives for any bytes (a payload view only where the message is exactly one data
field); and the bindings must interoperate with the generated stub and servicer both ways.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from arcsim.coordinator.service import CODEC_STATUS
from arcsim.transport import codec, wire
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.v1 import coordinator_pb2_grpc as pb_grpc


def _tensor(numel: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("numel, chunk_bytes", [(0, 8), (1, 8), (5, 8), (1000, 1024), (300, 7), (40_000, 1 << 20)])
def test_vector_stream_parses_into_the_messages_of_vector_chunks(numel: int, chunk_bytes: int) -> None:
    t = _tensor(numel)
    raw = list(wire.vector_stream(t, round=7, worker_id=3, chunk_bytes=chunk_bytes, train_loss=0.25))
    parsed = [pb.GradientChunk.FromString(b) for b in raw]
    reference = list(codec.vector_chunks(t, round=7, worker_id=3, chunk_bytes=chunk_bytes, train_loss=0.25))
    first = parsed[0]
    assert (first.round, first.worker_id, first.train_loss, first.data) == (7, 3, 0.25, b"")
    assert first.header == reference[0].header
    assert all(not m.HasField("header") and m.round == 0 for m in parsed[1:])
    assert b"".join(m.data for m in parsed) == b"".join(m.data for m in reference)
    assert all(0 < len(m.data) <= chunk_bytes for m in parsed[1:])
    got = codec.assemble_vector(parsed, max_bytes=numel * 4)
    assert torch.equal(got.vector, t) and (got.round, got.worker_id) == (7, 3)


def test_vector_stream_bytes_do_not_alias_the_tensor() -> None:
    t = _tensor(100)
    stream = wire.vector_stream(t, round=0, worker_id=0, chunk_bytes=64)
    raw = [next(stream), next(stream)]  # the header and the first chunk: built before the change
    expected = t.clone()
    t.zero_()
    got = bytes(wire.parse_vector_chunk(raw[1]))
    assert got == codec.tensor_to_bytes(expected)[:64].tobytes()


@pytest.mark.parametrize("numel, chunk_bytes", [(0, 8), (3, 8), (1000, 512), (129, 4)])
def test_round_and_observe_streams_parse_into_the_codec_events(numel: int, chunk_bytes: int) -> None:
    params = _tensor(numel, 1)
    raw = wire.round_stream(params, round=2, deadline_unix_ms=99, chunk_bytes=chunk_bytes)
    assert [pb.RoundEvent.FromString(b) for b in raw] == list(
        codec.round_events(params, round=2, deadline_unix_ms=99, chunk_bytes=chunk_bytes)
    )
    vectors = {4: _tensor(numel, 2), 1: _tensor(numel, 3)}
    raw = list(wire.observe_stream(vectors, chunk_bytes=chunk_bytes))
    assert [pb.ObserveEvent.FromString(b) for b in raw] == list(codec.observe_events(vectors, chunk_bytes=chunk_bytes))


@pytest.mark.parametrize("chunk_bytes", [4, 100, 1 << 20])
def test_readers_take_the_fast_path_views_and_give_the_same_tensors(chunk_bytes: int) -> None:
    params = _tensor(1000, 4)
    events = [
        wire.parse_round_event(b)
        for b in wire.round_stream(params, round=5, deadline_unix_ms=1, chunk_bytes=chunk_bytes)
    ]
    assert isinstance(events[0], pb.RoundEvent) and all(isinstance(e, memoryview) for e in events[1:])
    (got,) = codec.read_round_events(events, max_bytes=4000)
    assert got.round == 5 and torch.equal(got.params, params)
    vectors = {0: _tensor(1000, 5), 2: _tensor(1000, 6)}
    events = [wire.parse_observe_event(b) for b in wire.observe_stream(vectors, chunk_bytes=chunk_bytes)]
    got = codec.read_observe_events(events, max_bytes=4000)
    assert got.keys() == vectors.keys() and all(torch.equal(got[i], vectors[i]) for i in vectors)
    messages = [
        wire.parse_vector_chunk(b) for b in wire.vector_stream(params, round=1, worker_id=0, chunk_bytes=chunk_bytes)
    ]
    assert isinstance(messages[0], pb.GradientChunk) and all(isinstance(m, memoryview) for m in messages[1:])
    assert torch.equal(codec.assemble_vector(messages, max_bytes=4000).vector, params)


def test_a_data_view_first_is_a_missing_header_and_a_view_with_nothing_in_progress_is_unexpected() -> None:
    with pytest.raises(codec.CodecError) as caught:
        codec.VectorReader(max_bytes=64).add(memoryview(b"abcd"))
    assert caught.value.reason == "missing_header"
    with pytest.raises(codec.CodecError) as caught:
        codec.RoundEventReader(max_bytes=64).feed(memoryview(b"abcd"))
    assert caught.value.reason == "unexpected_chunk"
    with pytest.raises(codec.CodecError) as caught:
        codec.ObserveEventReader(max_bytes=64).feed(memoryview(b"abcd"))
    assert caught.value.reason == "unexpected_chunk"


def test_data_messages_in_other_forms_go_through_protobuf() -> None:
    # Data with another field, a repeated data field (protobuf keeps the last), a non-minimal length varint.
    with_round = pb.GradientChunk(round=3, data=b"xyz").SerializeToString()
    twice = b"\x22\x01a\x22\x01b"
    long_varint = b"\x22\x81\x00z"  # length 1 written in two bytes: still exactly one data field
    parsed = [wire.parse_vector_chunk(b) for b in (with_round, twice, long_varint)]
    assert isinstance(parsed[0], pb.GradientChunk) and parsed[0].round == 3 and parsed[0].data == b"xyz"
    assert isinstance(parsed[1], pb.GradientChunk) and parsed[1].data == b"b"
    assert isinstance(parsed[2], memoryview) and bytes(parsed[2]) == b"z"
    event = pb.RoundEvent(chunk=pb.Chunk(data=b"q")).SerializeToString() + b"\x18\x01"  # plus an unknown field
    assert isinstance(wire.parse_round_event(event), pb.RoundEvent)


def test_bytes_that_are_not_a_gradient_chunk_are_malformed_not_an_exception() -> None:
    for junk in (b"\xff\xff\xff\xff", b"\x22\x05ab", b"\x08", b"\x22\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"):
        got = wire.parse_vector_chunk(junk)
        assert isinstance(got, wire.Malformed) and "not a GradientChunk" in got.error
    assert CODEC_STATUS[codec.CodecError("malformed", "not a GradientChunk").reason] == grpc.StatusCode.INVALID_ARGUMENT


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=40),
        st.binary(max_size=30).map(lambda d: bytes((0x22, len(d))) + d),
        st.tuples(st.sampled_from([0x12, 0x22, 0x0A]), st.integers(0, 40), st.binary(max_size=40)).map(
            lambda t: bytes((t[0], t[1])) + t[2]
        ),
        st.binary(max_size=20).map(lambda d: bytes((0x12, len(d) + 2, 0x0A, len(d))) + d),
    )
)
def test_readers_agree_with_protobuf_on_any_bytes(buf: bytes) -> None:
    for parse, message_type in (
        (wire.parse_vector_chunk, pb.GradientChunk),
        (wire.parse_round_event, pb.RoundEvent),
        (wire.parse_observe_event, pb.ObserveEvent),
    ):
        try:
            reference = message_type.FromString(buf)
        except DecodeError:
            reference = None
        try:
            got = parse(buf)
        except DecodeError:
            got = None
        if isinstance(got, wire.Malformed):
            got = None
        if isinstance(got, memoryview):
            assert reference is not None
            if message_type is pb.GradientChunk:
                assert reference == pb.GradientChunk(data=bytes(got))
            else:
                assert reference == message_type(chunk=pb.Chunk(data=bytes(got)))
        else:
            assert got == reference


def test_the_bindings_cover_every_method_of_the_service() -> None:
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    paths = {}

    class Recorder:  # records the methods the stub binds, by call kind
        def __getattr__(self, kind):
            return lambda path, **_: paths.setdefault(path, kind)

    wire.CoordinatorStub(Recorder())
    kinds = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary"}
    assert paths == {
        f"/{service.full_name}/{m.name}": kinds[m.client_streaming, m.server_streaming] for m in service.methods
    }
    assert wire.SERVICE_NAME == service.full_name


class _Servicer(pb_grpc.CoordinatorServicer):
    """Answers each method from fixed tensors (enough to check both bindings against each other)."""

    def __init__(self, params: torch.Tensor) -> None:
        self.params = params
        self.received: list[torch.Tensor] = []

    async def Rounds(self, request, context):
        for event in self.events(self.params):
            yield event
        yield codec.run_end_event(rounds_completed=1, reason="completed")

    def events(self, params):
        return codec.round_events(params, round=0, deadline_unix_ms=0, chunk_bytes=100)

    async def SubmitGradient(self, request_iterator, context):
        reader = codec.VectorReader(max_bytes=1 << 20)
        async for message in request_iterator:
            reader.add(message)
        self.received.append(reader.finish())
        return pb.SubmitReply(accepted=True, round=reader.round)

    async def Observe(self, request, context):
        for event in codec.observe_events({0: self.params, 1: -self.params}, chunk_bytes=100):
            yield event


class _FastServicer(_Servicer):
    async def Observe(self, request, context):
        for event in wire.observe_stream({0: self.params, 1: -self.params}, chunk_bytes=100):
            yield event

    def events(self, params):
        return wire.round_stream(params, round=0, deadline_unix_ms=0, chunk_bytes=100)


@pytest.mark.parametrize("fast_server", [False, True], ids=["generated server", "wire server"])
@pytest.mark.parametrize("fast_client", [False, True], ids=["generated client", "wire client"])
async def test_wire_and_generated_bindings_interoperate(fast_server: bool, fast_client: bool) -> None:
    params = _tensor(777, 8)
    servicer = (_FastServicer if fast_server else _Servicer)(params)
    server = grpc.aio.server()
    if fast_server:
        wire.add_coordinator_to_server(servicer, server)
    else:
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = wire.CoordinatorStub(channel) if fast_client else pb_grpc.CoordinatorStub(channel)
            items = [item async for item in _read_rounds(stub)]
            assert torch.equal(items[0].params, params) and isinstance(items[1], pb.RunEnd)
            reader = codec.ObserveEventReader(max_bytes=1 << 20)
            observed = [reader.feed(e) async for e in stub.Observe(pb.ObserveRequest(worker_id=2, round=0))]
            observed = [o for o in observed if o is not None]
            assert [o.worker_id for o in observed] == [0, 1] and torch.equal(observed[1].vector, -params)
            vector = _tensor(777, 9)
            if fast_client:
                request = wire.vector_stream(vector, round=4, worker_id=1, chunk_bytes=100)
            else:
                request = codec.vector_chunks(vector, round=4, worker_id=1, chunk_bytes=100)
            reply = await stub.SubmitGradient(request)
            assert reply.accepted and reply.round == 4 and torch.equal(servicer.received[0], vector)
    finally:
        await server.stop(None)


async def _read_rounds(stub):
    reader = codec.RoundEventReader(max_bytes=1 << 20)
    async for event in stub.Rounds(pb.RoundsRequest(worker_id=0)):
        item = reader.feed(event)
        if item is not None:
            yield item
    reader.finish()
    await asyncio.sleep(0)
