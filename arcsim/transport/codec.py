"""Tensors on the wire: raw little-endian bytes in chunks, a header, and a CRC-32.

A tensor ``t`` travels as a header ``(dtype, shape, num_bytes, checksum)`` followed by its bytes,
C-contiguous and little-endian, cut into chunks of at most ``chunk_bytes`` bytes:

.. math::
    \\text{num\\_bytes} = \\textstyle\\prod_k \\text{shape}_k \\cdot \\text{itemsize}(\\text{dtype}),
    \\qquad \\text{checksum} = \\operatorname{crc32}(\\text{bytes})

No pickle and no ``torch.save``: the sender exposes the tensor's memory through numpy
(:func:`tensor_to_bytes`, no copy for a contiguous CPU tensor) and the receiver writes every chunk
at its offset into one preallocated buffer (:class:`TensorAssembler`) and wraps it with
``torch.frombuffer`` (no copy). Everything a receiver can reject raises :class:`CodecError`, whose
``reason`` is a short machine-readable label (bounded, so usable as a metric label); the service
maps it to the gRPC status the protocol documents for it.

The ``*_events`` / ``vector_chunks`` helpers build the ``arcsim.v1`` messages for the three
streams of ``protos/arcsim/v1/coordinator.proto``, and the ``*Reader`` classes consume them one
message at a time (so they serve ``for`` and ``async for`` loops alike).

The finite check uses ``torch.aminmax`` (NaN propagates; one pass over the data) instead of
``torch.isfinite(t).all()``, which materialises a boolean tensor and is much slower, most of all for
the 16-bit types. The codec's throughput, and what the CRC-32 costs a round with zlib's and with
zlib-ng's implementation, are in docs/benchmarks.md ("Tensor codec").

Example:

>>> t = torch.tensor([1.0, -2.5, 3.0])
>>> header, data = encode(t)
>>> header.dtype, header.shape, header.num_bytes
('float32', (3,), 12)
>>> assembler = TensorAssembler.from_header(header, max_bytes=1 << 20)
>>> for chunk in iter_chunks(data, chunk_bytes=5):
...     assembler.add(chunk)
>>> torch.equal(assembler.finish(), t)
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import numpy as np
import torch

from arcsim.tensorbytes import _BIG_ENDIAN_HOST, DTYPE_NAMES, DTYPES, _crc32, checksum, tensor_to_bytes
from arcsim.v1 import coordinator_pb2 as pb

DEFAULT_CHUNK_BYTES: Final[int] = 1 << 20
"""Default chunk payload, 1 MiB: well below gRPC's default 4 MiB message limit."""


class CodecError(ValueError):
    """A tensor or message stream that the receiver rejects, with a ``reason`` from :data:`REASONS`.

    Which status a service answers with is the service's business (the coordinator maps each reason
    to a gRPC status code); the codec knows nothing of gRPC.
    """

    REASONS: Final[tuple[str, ...]] = (
        "bad_dtype",  # unknown dtype, or not the expected one
        "bad_shape",  # negative dimension, or not the expected shape
        "size_mismatch",  # num_bytes != numel * itemsize, or extra bytes
        "non_finite",  # NaN or +-Inf among the values
        "missing_header",  # first GradientChunk without header
        "unexpected_header",  # header on a later GradientChunk
        "unexpected_chunk",  # Chunk event with no tensor in progress
        "bad_order",  # observed vectors not in increasing worker id
        "malformed",  # bytes that are not a valid message (arcsim.transport.wire)
        "oversized",  # num_bytes above the receiver's max_bytes
        "truncated",  # fewer bytes than num_bytes when the tensor ended
        "checksum",  # CRC-32 of the bytes differs from the header's
    )

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown CodecError reason {reason!r}; expected one of {sorted(self.REASONS)}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = dtype if isinstance(dtype, str) else DTYPE_NAMES.get(dtype)
    if name not in DTYPES:
        raise CodecError("bad_dtype", f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return name


def _check_chunk_bytes(chunk_bytes: int) -> None:
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")


def iter_chunks(buf: bytes | bytearray | memoryview, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[memoryview]:
    """Consecutive slices of ``buf`` of ``chunk_bytes`` bytes (the last may be shorter); none if empty.

    >>> [bytes(c) for c in iter_chunks(b"abcde", 2)]
    [b'ab', b'cd', b'e']
    """
    _check_chunk_bytes(chunk_bytes)
    view = memoryview(buf).cast("B")
    for start in range(0, view.nbytes, chunk_bytes):
        yield view[start : start + chunk_bytes]


@dataclass(frozen=True, slots=True)
class TensorHeader:
    """The values of a ``arcsim.v1.TensorHeader`` message, as plain Python values."""

    dtype: str
    shape: tuple[int, ...]
    num_bytes: int
    checksum: int

    def to_proto(self) -> pb.TensorHeader:
        """The ``arcsim.v1.TensorHeader`` message with these values."""
        return pb.TensorHeader(dtype=self.dtype, shape=self.shape, num_bytes=self.num_bytes, checksum=self.checksum)

    @classmethod
    def from_proto(cls, message: pb.TensorHeader) -> TensorHeader:
        """The values of a received ``arcsim.v1.TensorHeader`` (not validated: see TensorAssembler)."""
        return cls(message.dtype, tuple(message.shape), message.num_bytes, message.checksum)


def encode(t: torch.Tensor) -> tuple[TensorHeader, memoryview]:
    """The header and the raw bytes of ``t`` (see :func:`tensor_to_bytes`); ``bad_dtype`` for a dtype
    the protocol does not carry."""
    _dtype_name(t.dtype)
    data = tensor_to_bytes(t)
    return TensorHeader(DTYPE_NAMES[t.dtype], tuple(t.shape), data.nbytes, checksum(data)), data


def header_for(t: torch.Tensor) -> TensorHeader:
    """The header describing ``t`` (computes the CRC-32 of its bytes).

    >>> header_for(torch.zeros(2, 3, dtype=torch.float64))
    TensorHeader(dtype='float64', shape=(2, 3), num_bytes=48, checksum=4069045141)
    """
    return encode(t)[0]


class TensorAssembler:
    """Rebuilds one tensor from its header and its chunks, into one preallocated buffer.

    The header is validated when the assembler is built (before any allocation above
    ``max_bytes``); each :meth:`add` copies a chunk at its offset; :meth:`finish` checks that
    every byte arrived, the CRC-32 and (by default) that all values are finite, and returns a
    tensor over the buffer (``torch.frombuffer``, no copy).

    Raises :class:`CodecError` with reason ``bad_dtype`` (unknown dtype or not ``expected_dtype``),
    ``bad_shape`` (negative dimension or not ``expected_shape``), ``size_mismatch`` (``num_bytes``
    differs from ``numel * itemsize``, or more bytes than announced), ``oversized`` (``num_bytes >
    max_bytes``), ``truncated`` (finish before all bytes), ``checksum`` or ``non_finite``.

    >>> a = TensorAssembler("float32", (2,), 8, checksum(bytes(8)), max_bytes=64)
    >>> a.add(bytes(3)); a.add(bytes(5))
    >>> a.finish()
    tensor([0., 0.])
    """

    def __init__(
        self,
        dtype: str,
        shape: Sequence[int],
        num_bytes: int,
        checksum: int,
        *,
        max_bytes: int,
        expected_shape: Sequence[int] | None = None,
        expected_dtype: str | torch.dtype | None = None,
        require_finite: bool = True,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        name = _dtype_name(dtype)
        if expected_dtype is not None and name != _dtype_name(expected_dtype):
            raise CodecError("bad_dtype", f"dtype {name!r} is not the expected {_dtype_name(expected_dtype)!r}")
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise CodecError("bad_shape", f"shape {list(dims)} has a negative dimension")
        if expected_shape is not None and dims != tuple(expected_shape):
            raise CodecError("bad_shape", f"shape {list(dims)} is not the expected {list(expected_shape)}")
        torch_dtype = DTYPES[name]
        itemsize = torch_dtype.itemsize
        if num_bytes != math.prod(dims) * itemsize:
            raise CodecError(
                "size_mismatch",
                f"num_bytes {num_bytes} != {math.prod(dims)} elements of shape {list(dims)}"
                f" * {itemsize} bytes ({name})",
            )
        if num_bytes > max_bytes:
            raise CodecError("oversized", f"num_bytes {num_bytes} exceeds max_bytes {max_bytes}")
        self.dtype: Final[torch.dtype] = torch_dtype
        self.shape: Final[tuple[int, ...]] = dims
        self.num_bytes: Final[int] = num_bytes
        self.checksum: Final[int] = checksum
        self.require_finite: Final[bool] = require_finite
        self._buffer = bytearray(num_bytes)
        self._view = memoryview(self._buffer)
        self._received = 0
        self._crc = 0
        self._result: torch.Tensor | None = None

    @classmethod
    def from_header(
        cls,
        header: TensorHeader | pb.TensorHeader,
        *,
        max_bytes: int,
        expected_shape: Sequence[int] | None = None,
        expected_dtype: str | torch.dtype | None = None,
        require_finite: bool = True,
    ) -> TensorAssembler:
        """An assembler for the tensor described by ``header`` (a :class:`TensorHeader` or the message)."""
        if isinstance(header, pb.TensorHeader):
            header = TensorHeader.from_proto(header)
        return cls(
            header.dtype,
            header.shape,
            header.num_bytes,
            header.checksum,
            max_bytes=max_bytes,
            expected_shape=expected_shape,
            expected_dtype=expected_dtype,
            require_finite=require_finite,
        )

    @property
    def received(self) -> int:
        """Bytes received so far."""
        return self._received

    @property
    def complete(self) -> bool:
        """Whether all ``num_bytes`` bytes have arrived."""
        return self._received == self.num_bytes

    def add(self, data: bytes | bytearray | memoryview) -> None:
        """Copy the next chunk into place; ``size_mismatch`` if it goes past ``num_bytes``."""
        if not isinstance(data, bytes | bytearray):
            data = memoryview(data).cast("B")
        end = self._received + len(data)
        if end > self.num_bytes:
            raise CodecError(
                "size_mismatch", f"received {end} bytes, more than the announced num_bytes {self.num_bytes}"
            )
        self._view[self._received : end] = data
        self._crc = _crc32(data, self._crc)
        self._received = end

    def finish(self) -> torch.Tensor:
        """The assembled tensor, after the ``truncated``, ``checksum`` and ``non_finite`` checks.

        The tensor shares memory with this assembler's buffer (no copy); calling ``finish`` again
        returns the same tensor.
        """
        if self._result is not None:
            return self._result
        if self._received < self.num_bytes:
            raise CodecError("truncated", f"received {self._received} of {self.num_bytes} bytes")
        crc = self._crc & 0xFFFFFFFF
        if crc != self.checksum:
            raise CodecError("checksum", f"CRC-32 of the bytes is {crc:#010x}, the header says {self.checksum:#010x}")
        if self.num_bytes == 0:
            tensor = torch.empty(self.shape, dtype=self.dtype)
        else:
            if _BIG_ENDIAN_HOST and self.dtype.itemsize > 1:
                np.frombuffer(self._buffer, dtype=f"u{self.dtype.itemsize}").byteswap(inplace=True)
            tensor = torch.frombuffer(self._buffer, dtype=self.dtype).view(self.shape)
            if self.require_finite:
                low, high = torch.aminmax(tensor.view(-1))  # NaN propagates into both
                if not (math.isfinite(low.item()) and math.isfinite(high.item())):
                    count = int((~torch.isfinite(tensor)).sum())
                    raise CodecError("non_finite", f"{count} of {tensor.numel()} values are NaN or infinite")
        self._result = tensor
        return tensor


def decode(
    header: TensorHeader | pb.TensorHeader,
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int,
    expected_shape: Sequence[int] | None = None,
    expected_dtype: str | torch.dtype | None = None,
    require_finite: bool = True,
) -> torch.Tensor:
    """The tensor whose header and whole payload are given (one :class:`TensorAssembler` pass).

    >>> h, data = encode(torch.arange(4.0).view(2, 2))
    >>> decode(h, data, max_bytes=1024)
    tensor([[0., 1.],
            [2., 3.]])
    """
    assembler = TensorAssembler.from_header(
        header,
        max_bytes=max_bytes,
        expected_shape=expected_shape,
        expected_dtype=expected_dtype,
        require_finite=require_finite,
    )
    assembler.add(data)
    return assembler.finish()


# --------------------------------------------------------------------------------------------
# Senders: tensors -> arcsim.v1 messages


def vector_chunks(
    t: torch.Tensor,
    *,
    round: int,
    worker_id: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    train_loss: float = math.nan,
) -> Iterator[pb.GradientChunk]:
    """The ``SubmitGradient`` request stream for ``t``.

    The first message carries ``round``, ``worker_id``, the header and the first chunk; the others
    carry only data. An empty tensor still gives one message (the header).

    >>> [len(m.data) for m in vector_chunks(torch.zeros(5), round=3, worker_id=1, chunk_bytes=8)]
    [8, 8, 4]
    """
    _check_chunk_bytes(chunk_bytes)
    header, data = encode(t)
    chunks = iter_chunks(data, chunk_bytes)
    first = next(chunks, b"")
    yield pb.GradientChunk(
        round=round, worker_id=worker_id, header=header.to_proto(), data=bytes(first), train_loss=train_loss
    )
    for chunk in chunks:
        yield pb.GradientChunk(data=bytes(chunk))


def round_events(
    params: torch.Tensor | None, *, round: int, deadline_unix_ms: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.RoundEvent]:
    """The ``Rounds`` events announcing ``round``: a RoundStart, then the parameters' chunks.

    ``params=None`` gives a RoundStart without parameters (the worker already holds them). The
    messages do not depend on the worker: build them once per round (``list(round_events(...))``)
    and send the same list on every stream.

    >>> [e.WhichOneof("event") for e in round_events(torch.zeros(3), round=0, deadline_unix_ms=0, chunk_bytes=8)]
    ['round_start', 'chunk', 'chunk']
    """
    _check_chunk_bytes(chunk_bytes)
    if params is None:
        yield pb.RoundEvent(round_start=pb.RoundStart(round=round, deadline_unix_ms=deadline_unix_ms))
        return
    header, data = encode(params)
    start = pb.RoundStart(round=round, deadline_unix_ms=deadline_unix_ms, params=header.to_proto())
    yield pb.RoundEvent(round_start=start)
    for chunk in iter_chunks(data, chunk_bytes):
        yield pb.RoundEvent(chunk=pb.Chunk(data=bytes(chunk)))


def run_end_event(*, rounds_completed: int, reason: str) -> pb.RoundEvent:
    """The last event of a ``Rounds`` stream."""
    return pb.RoundEvent(run_end=pb.RunEnd(rounds_completed=rounds_completed, reason=reason))


def observe_events(
    vectors: Mapping[int, torch.Tensor], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.ObserveEvent]:
    """The ``Observe`` events for the honest ``vectors`` (worker id -> vector), by increasing worker id.

    >>> events = observe_events({2: torch.ones(1), 0: torch.zeros(1)})
    >>> [(e.WhichOneof("event"), e.vector.worker_id) for e in events]
    [('vector', 0), ('chunk', 0), ('vector', 2), ('chunk', 0)]
    """
    _check_chunk_bytes(chunk_bytes)
    for worker_id in sorted(vectors):
        header, data = encode(vectors[worker_id])
        yield pb.ObserveEvent(vector=pb.ObservedVector(worker_id=worker_id, header=header.to_proto()))
        for chunk in iter_chunks(data, chunk_bytes):
            yield pb.ObserveEvent(chunk=pb.Chunk(data=bytes(chunk)))


# --------------------------------------------------------------------------------------------
# Receivers: arcsim.v1 messages -> tensors, one message at a time (for `for` and `async for`)


@dataclass(frozen=True, slots=True)
class ReceivedVector:
    """A complete ``SubmitGradient`` stream: who sent which vector for which round."""

    round: int
    worker_id: int
    vector: torch.Tensor


@dataclass(frozen=True, slots=True)
class RoundParams:
    """One announced round; ``params`` is None when the RoundStart came without parameters."""

    round: int
    deadline_unix_ms: int
    params: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class ObservedTensor:
    """One honest vector read through ``Observe`` (``seq``: its arrival number under ``schedule: async``)."""

    worker_id: int
    vector: torch.Tensor
    seq: int = 0


@dataclass(frozen=True, slots=True)
class _Limits:
    max_bytes: int
    expected_shape: Sequence[int] | None
    expected_dtype: str | torch.dtype | None
    require_finite: bool

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")

    def assembler(self, header: pb.TensorHeader) -> TensorAssembler:
        return TensorAssembler.from_header(
            header,
            max_bytes=self.max_bytes,
            expected_shape=self.expected_shape,
            expected_dtype=self.expected_dtype,
            require_finite=self.require_finite,
        )


class _Reader:
    """A receiver of one tensor at a time, within the limits it was given (see :class:`_Limits`)."""

    def __init__(
        self,
        *,
        max_bytes: int,
        expected_shape: Sequence[int] | None = None,
        expected_dtype: str | torch.dtype | None = None,
        require_finite: bool = True,
    ) -> None:
        self._limits = _Limits(max_bytes, expected_shape, expected_dtype, require_finite)
        self._assembler: TensorAssembler | None = None


class VectorReader(_Reader):
    """Server side of ``SubmitGradient``: feed the request messages, then :meth:`finish`.

    After the first :meth:`add` (which returns True), ``round``, ``worker_id`` and ``header`` are
    known, so the service can check them before the payload has arrived::

        reader = VectorReader(max_bytes=..., expected_shape=(d,), expected_dtype="float32")
        async for message in request_iterator:
            if reader.add(message):
                check(reader.round, reader.worker_id)   # FAILED_PRECONDITION, ALREADY_EXISTS, ...
        vector = reader.finish()

    Raises :class:`CodecError`: ``missing_header`` (first message without header, or no message),
    ``unexpected_header`` (header on a later message), and the :class:`TensorAssembler` reasons.
    """

    round: int | None = None  # known after the first add()
    worker_id: int | None = None
    header: TensorHeader | None = None
    train_loss: float | None = None
    step: int = 0  # schedule: async: the worker's step number (GradientChunk.step)

    def add(self, message: pb.GradientChunk | memoryview) -> bool:
        """Take the next request message; True if it was the first one.

        A ``memoryview`` stands for a message that carries only data (what :mod:`arcsim.transport.wire`
        reads such messages as).
        """
        if isinstance(message, memoryview):
            if self._assembler is None:
                raise CodecError("missing_header", "the first GradientChunk of a submission must carry the header")
            self._assembler.add(message)
            return False
        if self._assembler is None:
            if not message.HasField("header"):
                raise CodecError("missing_header", "the first GradientChunk of a submission must carry the header")
            self._assembler = self._limits.assembler(message.header)
            self.round, self.worker_id, self.step = message.round, message.worker_id, message.step
            self.header = TensorHeader.from_proto(message.header)
            loss = float(message.train_loss)
            self.train_loss = loss if math.isfinite(loss) else None
            self._assembler.add(message.data)
            return True
        if message.HasField("header"):
            raise CodecError("unexpected_header", "only the first GradientChunk of a submission may carry a header")
        self._assembler.add(message.data)
        return False

    def finish(self) -> torch.Tensor:
        """The submitted vector, once the request stream has ended."""
        if self._assembler is None:
            raise CodecError("missing_header", "the submission carried no message")
        return self._assembler.finish()


def assemble_vector(
    messages: Iterable[pb.GradientChunk],
    *,
    max_bytes: int,
    expected_shape: Sequence[int] | None = None,
    expected_dtype: str | torch.dtype | None = None,
    require_finite: bool = True,
) -> ReceivedVector:
    """A whole ``SubmitGradient`` request stream at once (see :class:`VectorReader`).

    >>> got = assemble_vector(vector_chunks(torch.ones(3), round=4, worker_id=2), max_bytes=64)
    >>> got.round, got.worker_id, got.vector
    (4, 2, tensor([1., 1., 1.]))
    """
    reader = VectorReader(
        max_bytes=max_bytes, expected_shape=expected_shape, expected_dtype=expected_dtype, require_finite=require_finite
    )
    for message in messages:
        reader.add(message)
    vector = reader.finish()
    assert reader.round is not None and reader.worker_id is not None
    return ReceivedVector(reader.round, reader.worker_id, vector)


_Item = TypeVar("_Item")


class _EventReader(_Reader, Generic[_Item]):
    """What the two server-stream readers share: a tensor in progress, fed by Chunk events.

    A subclass starts a tensor with :meth:`_begin` and turns a finished one into its item in
    :meth:`_complete`; :meth:`items` reads a whole stream.
    """

    _in_progress = "a tensor"  # for the unexpected_chunk message

    def feed(self, event: Any) -> Any:
        raise NotImplementedError

    def _complete(self) -> _Item:
        raise NotImplementedError

    def _progress(self) -> str:
        """What was in progress, for a ``truncated`` message."""
        assert self._assembler is not None
        return f"{self._assembler.received} of {self._assembler.num_bytes} bytes"

    def _begin(self, header: pb.TensorHeader) -> _Item | None:
        self._assembler = self._limits.assembler(header)
        return self._complete() if self._assembler.complete else None

    def _check_idle(self, what: str) -> None:
        if self._assembler is not None:
            raise CodecError("truncated", f"{what} after {self._progress()}")

    def _chunk(self, data: bytes | memoryview) -> _Item | None:
        if self._assembler is None:
            raise CodecError("unexpected_chunk", f"a Chunk event with no {self._in_progress} in progress")
        self._assembler.add(data)
        return self._complete() if self._assembler.complete else None

    def items(self, events: Iterable[Any]) -> Iterator[Any]:
        """Every completed item of a whole stream; ``truncated`` if it ends in the middle of one."""
        for event in events:
            item = self.feed(event)
            if item is not None:
                yield item
        self.finish()

    def finish(self) -> None:
        """Call when the stream ends: ``truncated`` if a tensor was in progress."""
        self._check_idle("the end of the stream")


class RoundEventReader(_EventReader[RoundParams]):
    """Worker side of ``Rounds``: :meth:`feed` each event; it returns a :class:`RoundParams` once a
    round's parameters are complete, the ``RunEnd`` message at the end, and None otherwise.

    Events of an unknown kind (a newer protocol) are ignored. Raises :class:`CodecError`:
    ``unexpected_chunk`` (a chunk with no parameters in progress), ``truncated`` (a new round or
    the end before the parameters were complete), and the :class:`TensorAssembler` reasons.

    >>> reader = RoundEventReader(max_bytes=1024)
    >>> [reader.feed(e) for e in round_events(torch.ones(2), round=5, deadline_unix_ms=9, chunk_bytes=4)]
    [None, None, RoundParams(round=5, deadline_unix_ms=9, params=tensor([1., 1.]))]
    """

    _in_progress = "parameters"
    _start: pb.RoundStart | None = None  # the RoundStart whose parameters are in progress

    def _complete(self) -> RoundParams:
        assert self._assembler is not None and self._start is not None
        params = self._assembler.finish()
        start, self._assembler, self._start = self._start, None, None
        return RoundParams(start.round, start.deadline_unix_ms, params)

    def _progress(self) -> str:
        assert self._assembler is not None
        return f"{self._assembler.received} of {self._assembler.num_bytes} parameter bytes"

    def feed(self, event: pb.RoundEvent | memoryview) -> RoundParams | pb.RunEnd | None:
        """Take the next event; the completed item, if this event completed one.

        A ``memoryview`` stands for a Chunk event's payload (see :mod:`arcsim.transport.wire`).
        """
        if isinstance(event, memoryview):
            return self._chunk(event)
        kind = event.WhichOneof("event")
        if kind == "round_start":
            self._check_idle("a new RoundStart")
            start = event.round_start
            if not start.HasField("params"):
                return RoundParams(start.round, start.deadline_unix_ms, None)
            self._start = start
            return self._begin(start.params)
        if kind == "chunk":
            return self._chunk(event.chunk.data)
        if kind == "run_end":
            self._check_idle("RunEnd")
            return event.run_end
        return None


def read_round_events(
    events: Iterable[pb.RoundEvent],
    *,
    max_bytes: int,
    expected_shape: Sequence[int] | None = None,
    expected_dtype: str | torch.dtype | None = None,
    require_finite: bool = True,
) -> Iterator[RoundParams | pb.RunEnd]:
    """The rounds (and the final ``RunEnd``) of a ``Rounds`` stream (see :class:`RoundEventReader`)."""
    yield from RoundEventReader(
        max_bytes=max_bytes, expected_shape=expected_shape, expected_dtype=expected_dtype, require_finite=require_finite
    ).items(events)


class ObserveEventReader(_EventReader[ObservedTensor]):
    """Adversary side of ``Observe``: :meth:`feed` each event; it returns an :class:`ObservedTensor`
    once a vector is complete, None otherwise. Call :meth:`finish` when the stream ends.

    Raises :class:`CodecError`: ``unexpected_chunk``, ``truncated`` (a new vector or the end before
    the previous one was complete), ``bad_order`` (worker ids not increasing), and the
    :class:`TensorAssembler` reasons.

    >>> reader = ObserveEventReader(max_bytes=64)
    >>> [reader.feed(e) for e in observe_events({1: torch.ones(1)})]
    [None, ObservedTensor(worker_id=1, vector=tensor([1.]), seq=0)]
    """

    _in_progress = "observed vector"
    _worker_id: int | None = None  # whose vector is in progress
    _seq = 0  # its arrival number (schedule: async)
    _last_worker_id: int | None = None  # ids must increase

    def _complete(self) -> ObservedTensor:
        assert self._assembler is not None and self._worker_id is not None
        vector = self._assembler.finish()
        worker_id, self._assembler, self._worker_id = self._worker_id, None, None
        return ObservedTensor(worker_id, vector, self._seq)

    def _progress(self) -> str:
        assert self._assembler is not None
        return f"{self._assembler.received} of {self._assembler.num_bytes} bytes of worker {self._worker_id}'s vector"

    def feed(self, event: pb.ObserveEvent | memoryview) -> ObservedTensor | None:
        """Take the next event; the completed vector, if this event completed one.

        A ``memoryview`` stands for a Chunk event's payload (see :mod:`arcsim.transport.wire`).
        """
        if isinstance(event, memoryview):
            return self._chunk(event)
        kind = event.WhichOneof("event")
        if kind == "vector":
            self._check_idle("a new ObservedVector")
            worker_id = event.vector.worker_id
            if self._last_worker_id is not None and worker_id <= self._last_worker_id:
                raise CodecError("bad_order", f"worker {worker_id} came after worker {self._last_worker_id}")
            self._worker_id = self._last_worker_id = worker_id
            self._seq = event.vector.seq
            return self._begin(event.vector.header)
        if kind == "chunk":
            return self._chunk(event.chunk.data)
        return None


def read_observe_events(
    events: Iterable[pb.ObserveEvent],
    *,
    max_bytes: int,
    expected_shape: Sequence[int] | None = None,
    expected_dtype: str | torch.dtype | None = None,
    require_finite: bool = True,
) -> dict[int, torch.Tensor]:
    """All vectors of an ``Observe`` stream, worker id -> vector, in increasing worker id.

    >>> read_observe_events(observe_events({0: torch.zeros(2), 3: torch.ones(2)}), max_bytes=64)
    {0: tensor([0., 0.]), 3: tensor([1., 1.])}
    """
    reader = ObserveEventReader(
        max_bytes=max_bytes, expected_shape=expected_shape, expected_dtype=expected_dtype, require_finite=require_finite
    )
    return {item.worker_id: item.vector for item in reader.items(events)}
