"""Tests for arcsim.transport.codec: raw little-endian tensors in chunks, their checks, and the message helpers."""

from __future__ import annotations

import doctest
import math

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arcsim.seeding import generator
from arcsim.transport import codec
from arcsim.transport.codec import CodecError, TensorAssembler, TensorHeader
from arcsim.v1 import coordinator_pb2 as pb

DTYPE_NAMES = sorted(codec.DTYPES)
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
SHAPES = [(), (0,), (3, 0), (1,), (7,), (2, 3, 5), (1, 1, 1, 1), (431_080,)]


def random_tensor(shape: tuple[int, ...], dtype_name: str, seed: int = 0) -> torch.Tensor:
    """Standard normal values, deterministic in (shape, dtype, seed)."""
    g = generator(seed, "test_codec", dtype_name, *shape)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(codec.DTYPES[dtype_name])


def random_bits(numel: int, dtype_name: str, seed: int) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, infinities, subnormals included) of one dtype."""
    dtype = codec.DTYPES[dtype_name]
    g = generator(seed, "test_codec_bits", dtype_name, numel)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` as integers, for bitwise comparisons (NaN == NaN)."""
    return t.contiguous().view(INT_VIEW[t.element_size()])


def round_trip(t: torch.Tensor, chunk_bytes: int, *, require_finite: bool = True) -> torch.Tensor:
    header, data = codec.encode(t)
    assembler = TensorAssembler.from_header(header, max_bytes=1 << 30, require_finite=require_finite)
    for chunk in codec.iter_chunks(data, chunk_bytes):
        assembler.add(chunk)
    return assembler.finish()


def assembler_for(t: torch.Tensor, **kwargs: object) -> tuple[TensorAssembler, memoryview]:
    header, data = codec.encode(t)
    kwargs.setdefault("max_bytes", 1 << 20)
    return TensorAssembler.from_header(header, **kwargs), data  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# dtypes, checksum, bytes


def test_dtype_tables_are_each_others_reverse() -> None:
    # Execute / Assert
    assert set(codec.DTYPES) >= {"float32", "float64", "float16", "bfloat16"}
    assert {codec.DTYPES[name]: name for name in codec.DTYPES} == codec.DTYPE_NAMES


def test_checksum_is_crc32_of_the_bytes() -> None:
    # Execute / Assert: the standard CRC-32 check value, for bytes and a memoryview alike
    assert codec.checksum(b"123456789") == 0xCBF43926
    assert codec.checksum(memoryview(b"123456789")) == 0xCBF43926
    assert codec.checksum(b"") == 0


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (torch.tensor([1.0], dtype=torch.float32), b"\x00\x00\x80\x3f"),
        (torch.tensor([1.0], dtype=torch.float64), b"\x00\x00\x00\x00\x00\x00\xf0\x3f"),
        (torch.tensor([1.0], dtype=torch.float16), b"\x00\x3c"),
        (torch.tensor([1.0], dtype=torch.bfloat16), b"\x80\x3f"),
        (torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16).T, b"\x80\x3f\x40\x40\x00\x40\x80\x40"),
    ],
)
def test_tensor_to_bytes_is_little_endian_c_order(t: torch.Tensor, expected: bytes) -> None:
    # Execute
    data = codec.tensor_to_bytes(t)

    # Assert
    assert bytes(data) == expected
    assert data.readonly and data.format == "B"


def test_tensor_to_bytes_does_not_copy_a_contiguous_cpu_tensor() -> None:
    # Prepare
    t = torch.arange(6, dtype=torch.float32)

    # Execute
    data = codec.tensor_to_bytes(t)

    # Assert
    assert np.frombuffer(data, dtype=np.uint8).ctypes.data == t.data_ptr()


def test_an_unsupported_dtype_is_refused_as_bad_dtype_on_the_wire_and_by_name_in_the_bytes() -> None:
    # Execute / Assert: the codec's refusal carries its reason; the core function names the dtype
    with pytest.raises(CodecError, match="int64") as err:
        codec.encode(torch.arange(3))
    assert err.value.reason == "bad_dtype"
    with pytest.raises(ValueError, match="int64"):
        codec.tensor_to_bytes(torch.arange(3))


def test_iter_chunks_cuts_the_last_chunk_short() -> None:
    # Execute
    chunks = [bytes(c) for c in codec.iter_chunks(memoryview(b"abcdefg"), 3)]

    # Assert
    assert chunks == [b"abc", b"def", b"g"]
    assert list(codec.iter_chunks(b"", 3)) == []


def test_iter_chunks_rejects_a_non_positive_chunk_size() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1, got 0"):
        list(codec.iter_chunks(b"abc", 0))


def test_header_for_describes_the_tensor() -> None:
    # Prepare
    t = torch.zeros(2, 3, dtype=torch.float16)

    # Execute
    header = codec.header_for(t)

    # Assert
    assert header == TensorHeader("float16", (2, 3), 12, codec.checksum(bytes(12)))
    assert TensorHeader.from_proto(header.to_proto()) == header


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_bitwise_for_every_dtype_and_shape(dtype_name: str, shape: tuple[int, ...]) -> None:
    # Prepare
    t = random_tensor(shape, dtype_name)
    before = t.clone()

    # Execute
    got = round_trip(t, chunk_bytes=1 << 20)

    # Assert
    assert got.dtype == t.dtype and got.shape == t.shape
    assert torch.equal(bits(got), bits(t))
    assert torch.equal(bits(t), bits(before))


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 4096, 1 << 20])
def test_round_trip_whatever_the_chunk_boundaries(chunk_bytes: int) -> None:
    # Prepare: 1001 float32 = 4004 bytes, not a multiple of 3, 7 or 4096
    t = random_tensor((7, 11, 13), "float32")

    # Execute
    got = round_trip(t, chunk_bytes)

    # Assert
    assert torch.equal(bits(got), bits(t))


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_round_trip_keeps_nan_payloads_and_infinities_when_allowed(dtype_name: str) -> None:
    # Prepare
    t = random_bits(4096, dtype_name, seed=1)
    bits(t)[0] = -1  # all bits set: a negative NaN with a full payload
    t[1:3] = torch.tensor([math.inf, -math.inf])

    # Execute
    got = round_trip(t, chunk_bytes=1000, require_finite=False)

    # Assert
    assert torch.equal(bits(got), bits(t))


def test_round_trip_keeps_negative_zero_and_subnormals() -> None:
    # Prepare
    t = torch.tensor([-0.0, 1e-45, -1e-40, torch.finfo(torch.float32).max])

    # Execute
    got = round_trip(t, chunk_bytes=5)

    # Assert
    assert torch.equal(bits(got), bits(t))


def test_encode_leaves_a_non_contiguous_grad_tensor_unchanged() -> None:
    # Prepare
    base = random_tensor((4, 6), "float32").requires_grad_()
    t = base.T
    before = t.detach().clone()

    # Execute
    got = round_trip(t, chunk_bytes=9)

    # Assert
    assert not t.is_contiguous()
    assert torch.equal(got, before) and got.shape == (6, 4)
    assert torch.equal(t.detach(), before)


def test_finish_wraps_the_buffer_without_copy_and_is_idempotent() -> None:
    # Prepare
    assembler, data = assembler_for(torch.ones(10))
    assembler.add(data)

    # Execute
    first, second = assembler.finish(), assembler.finish()

    # Assert
    assert first is second
    assert first.data_ptr() == np.frombuffer(assembler._buffer, dtype=np.uint8).ctypes.data
    assert assembler.complete and assembler.received == 40


def test_decode_accepts_a_proto_header_and_expectations() -> None:
    # Prepare
    t = random_tensor((5,), "bfloat16")
    header, data = codec.encode(t)

    # Execute
    got = codec.decode(header.to_proto(), data, max_bytes=10, expected_shape=[5], expected_dtype=torch.bfloat16)

    # Assert
    assert torch.equal(bits(got), bits(t))


def test_add_accepts_typed_memoryviews() -> None:
    # Prepare
    t = torch.tensor([1.5, -2.0])
    assembler, _ = assembler_for(t)

    # Execute
    assembler.add(memoryview(t.numpy()))

    # Assert
    assert torch.equal(assembler.finish(), t)


@settings(max_examples=60, deadline=None)
@given(
    dtype_name=st.sampled_from(DTYPE_NAMES),
    shape=st.lists(st.integers(0, 9), max_size=3).map(tuple),
    chunk_bytes=st.integers(1, 200),
    seed=st.integers(0, 2**31),
)
def test_property_message_round_trip_with_random_chunk_sizes(
    dtype_name: str, shape: tuple[int, ...], chunk_bytes: int, seed: int
) -> None:
    # Prepare
    t = random_bits(math.prod(shape), dtype_name, seed).view(shape)
    before = t.clone()

    # Execute
    wire = [m.SerializeToString() for m in codec.vector_chunks(t, round=seed, worker_id=3, chunk_bytes=chunk_bytes)]
    messages = (pb.GradientChunk.FromString(w) for w in wire)
    got = codec.assemble_vector(messages, max_bytes=1 << 20, require_finite=False)

    # Assert
    assert (got.round, got.worker_id, got.vector.shape, got.vector.dtype) == (seed, 3, t.shape, t.dtype)
    assert torch.equal(bits(got.vector), bits(t))
    assert torch.equal(bits(t), bits(before))
    assert len(wire) == max(1, -(-t.numel() * t.element_size() // chunk_bytes))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), numel=st.integers(0, 300))
def test_property_assembler_accepts_any_split_of_the_payload(data: st.DataObject, numel: int) -> None:
    # Prepare
    t = random_tensor((numel,), "float64")
    assembler, payload = assembler_for(t)
    cuts = sorted(data.draw(st.lists(st.integers(0, payload.nbytes), max_size=12)))

    # Execute
    for start, end in zip([0, *cuts], [*cuts, payload.nbytes]):
        assembler.add(payload[start:end])

    # Assert
    assert torch.equal(assembler.finish(), t)


# ---------------------------------------------------------------------------------------------
# TensorAssembler rejections, one per reason


def test_codec_error_is_a_value_error_with_a_reason_the_service_maps_to_a_status() -> None:
    # Execute
    err = CodecError("checksum", "garbled")

    # Assert: the codec knows no gRPC; the coordinator maps every reason to the status it documents
    from arcsim.coordinator.service import CODEC_STATUS

    assert isinstance(err, ValueError)
    assert (err.reason, str(err)) == ("checksum", "checksum: garbled")
    assert set(CODEC_STATUS) == set(CodecError.REASONS)
    assert CODEC_STATUS["checksum"] == grpc.StatusCode.DATA_LOSS
    assert CODEC_STATUS["oversized"] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert CODEC_STATUS["bad_shape"] == grpc.StatusCode.INVALID_ARGUMENT


def test_codec_error_rejects_an_unknown_reason() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="unknown CodecError reason 'late'"):
        CodecError("late", "too late")


def test_assembler_rejects_negative_max_bytes() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        TensorAssembler("float32", (1,), 4, 0, max_bytes=-1)


def test_assembler_rejects_an_unknown_dtype() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match="'int8'") as err:
        TensorAssembler("int8", (4,), 4, 0, max_bytes=64)
    assert err.value.reason == "bad_dtype"


def test_assembler_rejects_a_dtype_other_than_expected() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match="'float64' is not the expected 'float32'") as err:
        TensorAssembler("float64", (4,), 32, 0, max_bytes=64, expected_dtype=torch.float32)
    assert err.value.reason == "bad_dtype"


def test_assembler_rejects_a_negative_dimension() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match=r"shape \[2, -2\]") as err:
        TensorAssembler("float32", (2, -2), 16, 0, max_bytes=64)
    assert err.value.reason == "bad_shape"


def test_assembler_rejects_a_shape_other_than_expected() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match=r"shape \[4\] is not the expected \[5\]") as err:
        TensorAssembler("float32", (4,), 16, 0, max_bytes=64, expected_shape=(5,))
    assert err.value.reason == "bad_shape"


def test_assembler_rejects_num_bytes_inconsistent_with_the_shape() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match="num_bytes 15 != 4 elements") as err:
        TensorAssembler("float32", (2, 2), 15, 0, max_bytes=64)
    assert err.value.reason == "size_mismatch"


def test_assembler_rejects_more_than_max_bytes_before_allocating() -> None:
    # Execute / Assert: 2**40 bytes would not fit in memory; the check comes first
    with pytest.raises(CodecError, match="num_bytes 1099511627776 exceeds max_bytes 64") as err:
        TensorAssembler("float32", (2**38,), 2**40, 0, max_bytes=64)
    assert err.value.reason == "oversized"


def test_assembler_rejects_more_bytes_than_announced() -> None:
    # Prepare
    assembler, data = assembler_for(torch.ones(2))
    assembler.add(data)

    # Execute / Assert
    with pytest.raises(CodecError, match="received 9 bytes, more than the announced num_bytes 8") as err:
        assembler.add(b"\x00")
    assert err.value.reason == "size_mismatch"


def test_finish_rejects_fewer_bytes_than_announced() -> None:
    # Prepare
    assembler, data = assembler_for(torch.ones(2))
    assembler.add(data[:5])

    # Execute / Assert
    with pytest.raises(CodecError, match="received 5 of 8 bytes") as err:
        assembler.finish()
    assert err.value.reason == "truncated"


def test_finish_rejects_a_checksum_mismatch() -> None:
    # Prepare: one flipped bit
    header, data = codec.encode(torch.ones(2))
    corrupted = bytearray(data)
    corrupted[3] ^= 0x01
    assembler = TensorAssembler.from_header(header, max_bytes=64)
    assembler.add(corrupted)

    # Execute / Assert
    with pytest.raises(CodecError, match="CRC-32") as err:
        assembler.finish()
    assert err.value.reason == "checksum"


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("position", [0, 500, 999])
def test_finish_rejects_non_finite_values(dtype_name: str, bad: float, position: int) -> None:
    # Prepare
    t = random_tensor((1000,), dtype_name)
    t[position] = bad
    assembler, data = assembler_for(t)
    assembler.add(data)

    # Execute / Assert
    with pytest.raises(CodecError, match="1 of 1000 values are NaN or infinite") as err:
        assembler.finish()
    assert err.value.reason == "non_finite"


# ---------------------------------------------------------------------------------------------
# SubmitGradient messages


def test_vector_chunks_put_round_worker_and_header_in_the_first_message_only() -> None:
    # Prepare
    t = torch.arange(10, dtype=torch.float32)

    # Execute
    messages = list(codec.vector_chunks(t, round=12, worker_id=4, chunk_bytes=16))

    # Assert
    assert [len(m.data) for m in messages] == [16, 16, 8]
    assert (messages[0].round, messages[0].worker_id) == (12, 4)
    assert TensorHeader.from_proto(messages[0].header) == codec.header_for(t)
    assert all(m == pb.GradientChunk(data=m.data) for m in messages[1:])


def test_vector_chunks_of_an_empty_tensor_is_one_header_message() -> None:
    # Execute
    messages = list(codec.vector_chunks(torch.empty(0), round=1, worker_id=0))

    # Assert
    assert len(messages) == 1 and messages[0].HasField("header") and messages[0].data == b""


def test_vector_chunks_rejects_a_non_positive_chunk_size() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1, got -5"):
        list(codec.vector_chunks(torch.ones(1), round=0, worker_id=0, chunk_bytes=-5))


def test_vector_reader_exposes_round_and_worker_after_the_first_message() -> None:
    # Prepare
    messages = codec.vector_chunks(torch.ones(6), round=2, worker_id=5, chunk_bytes=8)
    reader = codec.VectorReader(max_bytes=64, expected_shape=(6,), expected_dtype="float32")

    # Execute
    firsts = [reader.add(m) for m in messages]

    # Assert
    assert firsts == [True, False, False]
    assert (reader.round, reader.worker_id, reader.header.shape if reader.header else None) == (2, 5, (6,))
    assert torch.equal(reader.finish(), torch.ones(6))


def test_vector_reader_rejects_negative_max_bytes() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -3"):
        codec.VectorReader(max_bytes=-3)


def test_vector_reader_rejects_a_first_message_without_header() -> None:
    # Prepare
    reader = codec.VectorReader(max_bytes=64)

    # Execute / Assert
    with pytest.raises(CodecError, match="first GradientChunk") as err:
        reader.add(pb.GradientChunk(round=1, worker_id=1, data=b"\x00" * 4))
    assert err.value.reason == "missing_header"


def test_vector_reader_rejects_an_empty_stream() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match="carried no message") as err:
        codec.assemble_vector([], max_bytes=64)
    assert err.value.reason == "missing_header"


def test_vector_reader_rejects_a_header_on_a_later_message() -> None:
    # Prepare
    messages = list(codec.vector_chunks(torch.ones(4), round=1, worker_id=1, chunk_bytes=8))
    messages[1].header.CopyFrom(messages[0].header)

    # Execute / Assert
    with pytest.raises(CodecError, match="only the first GradientChunk") as err:
        codec.assemble_vector(messages, max_bytes=64)
    assert err.value.reason == "unexpected_header"


def test_vector_reader_reports_a_truncated_stream() -> None:
    # Prepare
    messages = list(codec.vector_chunks(torch.ones(4), round=1, worker_id=1, chunk_bytes=8))

    # Execute / Assert
    with pytest.raises(CodecError) as err:
        codec.assemble_vector(messages[:-1], max_bytes=64)
    assert err.value.reason == "truncated"


# ---------------------------------------------------------------------------------------------
# Rounds events


def test_round_events_round_trip_params_and_run_end() -> None:
    # Prepare
    params = random_tensor((431_080,), "float32")
    events = [
        *codec.round_events(params, round=0, deadline_unix_ms=100, chunk_bytes=1 << 20),
        *codec.round_events(None, round=1, deadline_unix_ms=200),
        codec.run_end_event(rounds_completed=2, reason="completed"),
    ]

    # Execute
    items = list(codec.read_round_events(events, max_bytes=1 << 22, expected_shape=(431_080,)))

    # Assert
    assert [e.WhichOneof("event") for e in events] == ["round_start", "chunk", "chunk", "round_start", "run_end"]
    assert not events[3].round_start.HasField("params")
    assert (items[0].round, items[0].deadline_unix_ms) == (0, 100) and torch.equal(items[0].params, params)
    assert items[1] == codec.RoundParams(1, 200, None)
    assert items[2] == pb.RunEnd(rounds_completed=2, reason="completed")


def test_round_event_reader_completes_empty_params_at_the_round_start() -> None:
    # Prepare
    reader = codec.RoundEventReader(max_bytes=0)
    (event,) = codec.round_events(torch.empty(0), round=3, deadline_unix_ms=0)

    # Execute
    item = reader.feed(event)

    # Assert
    assert isinstance(item, codec.RoundParams) and item.params is not None and item.params.shape == (0,)


def test_round_event_reader_ignores_unknown_events() -> None:
    # Execute / Assert
    assert codec.RoundEventReader(max_bytes=8).feed(pb.RoundEvent()) is None


def test_round_event_reader_rejects_negative_max_bytes() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        codec.RoundEventReader(max_bytes=-1)


def test_round_event_reader_rejects_a_chunk_without_round_start() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match="no parameters in progress") as err:
        codec.RoundEventReader(max_bytes=8).feed(pb.RoundEvent(chunk=pb.Chunk(data=b"\x00")))
    assert err.value.reason == "unexpected_chunk"


@pytest.mark.parametrize(
    ("interruption", "expected"),
    [
        (next(codec.round_events(None, round=1, deadline_unix_ms=0)), "a new RoundStart after 8 of 12"),
        (codec.run_end_event(rounds_completed=1, reason="stopped"), "RunEnd after 8 of 12"),
        (None, "the end of the stream after 8 of 12"),
    ],
    ids=["round_start", "run_end", "end_of_stream"],
)
def test_round_event_reader_rejects_params_cut_short(interruption: pb.RoundEvent | None, expected: str) -> None:
    # Prepare
    start, first, _ = codec.round_events(torch.ones(3), round=0, deadline_unix_ms=0, chunk_bytes=8)
    events = [start, first] + ([interruption] if interruption is not None else [])

    # Execute / Assert
    with pytest.raises(CodecError, match=expected) as err:
        list(codec.read_round_events(events, max_bytes=64))
    assert err.value.reason == "truncated"


def test_round_event_reader_applies_the_expected_shape() -> None:
    # Prepare
    events = codec.round_events(torch.ones(3), round=0, deadline_unix_ms=0)

    # Execute / Assert
    with pytest.raises(CodecError) as err:
        list(codec.read_round_events(events, max_bytes=64, expected_shape=(4,)))
    assert err.value.reason == "bad_shape"


# ---------------------------------------------------------------------------------------------
# Observe events


def test_observe_events_round_trip_in_worker_id_order() -> None:
    # Prepare
    vectors = {
        7: random_tensor((300,), "float16"),
        2: random_tensor((300,), "float16", seed=1),
        4: torch.empty(0, dtype=torch.float16),
    }

    # Execute
    events = list(codec.observe_events(vectors, chunk_bytes=256))
    got = codec.read_observe_events(events, max_bytes=1 << 10, expected_dtype="float16")

    # Assert
    assert [e.vector.worker_id for e in events if e.WhichOneof("event") == "vector"] == [2, 4, 7]
    assert list(got) == [2, 4, 7]
    assert all(torch.equal(bits(got[w]), bits(vectors[w])) for w in vectors)


def test_observe_event_reader_ignores_unknown_events() -> None:
    # Execute / Assert
    assert codec.ObserveEventReader(max_bytes=8).feed(pb.ObserveEvent()) is None


def test_observe_event_reader_rejects_negative_max_bytes() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -2"):
        codec.ObserveEventReader(max_bytes=-2)


def test_observe_event_reader_rejects_a_chunk_without_vector() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match="no observed vector in progress") as err:
        codec.ObserveEventReader(max_bytes=8).feed(pb.ObserveEvent(chunk=pb.Chunk(data=b"\x00")))
    assert err.value.reason == "unexpected_chunk"


def test_observe_event_reader_rejects_worker_ids_out_of_order() -> None:
    # Prepare
    events = [*codec.observe_events({3: torch.ones(1)}), *codec.observe_events({3: torch.ones(1)})]

    # Execute / Assert
    with pytest.raises(CodecError, match="worker 3 came after worker 3") as err:
        codec.read_observe_events(events, max_bytes=64)
    assert err.value.reason == "bad_order"


@pytest.mark.parametrize("cut_by", ["next_vector", "end_of_stream"])
def test_observe_event_reader_rejects_a_vector_cut_short(cut_by: str) -> None:
    # Prepare
    events = list(codec.observe_events({1: torch.ones(3), 2: torch.ones(3)}, chunk_bytes=8))
    events = events[:2] + (events[3:4] if cut_by == "next_vector" else [])

    # Execute / Assert
    with pytest.raises(CodecError, match="after 8 of 12 bytes of worker 1's vector") as err:
        codec.read_observe_events(events, max_bytes=64)
    assert err.value.reason == "truncated"


def test_codec_doctests() -> None:
    # Execute
    result = doctest.testmod(codec)

    # Assert
    assert result.failed == 0 and result.attempted > 10
