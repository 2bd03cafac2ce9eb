from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    HONEST: _ClassVar[Role]
    BYZANTINE: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
HONEST: Role
BYZANTINE: Role

class TensorHeader(_message.Message):
    __slots__ = ("dtype", "shape", "num_bytes", "checksum")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    num_bytes: int
    checksum: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., num_bytes: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("worker_id", "role")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    role: Role
    def __init__(self, worker_id: _Optional[int] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "config_yaml", "num_parameters", "current_round", "chunk_bytes", "has_momentum", "worker_id", "token")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_yaml: str
    num_parameters: int
    current_round: int
    chunk_bytes: int
    has_momentum: bool
    worker_id: int
    token: str
    def __init__(self, run_id: _Optional[str] = ..., config_yaml: _Optional[str] = ..., num_parameters: _Optional[int] = ..., current_round: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., has_momentum: _Optional[bool] = ..., worker_id: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class RoundsRequest(_message.Message):
    __slots__ = ("worker_id", "from_round", "have_params")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    HAVE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    from_round: int
    have_params: bool
    def __init__(self, worker_id: _Optional[int] = ..., from_round: _Optional[int] = ..., have_params: _Optional[bool] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("round_start", "chunk", "run_end")
    ROUND_START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RUN_END_FIELD_NUMBER: _ClassVar[int]
    round_start: RoundStart
    chunk: Chunk
    run_end: RunEnd
    def __init__(self, round_start: _Optional[_Union[RoundStart, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., run_end: _Optional[_Union[RunEnd, _Mapping]] = ...) -> None: ...

class RoundStart(_message.Message):
    __slots__ = ("round", "deadline_unix_ms", "params")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    round: int
    deadline_unix_ms: int
    params: TensorHeader
    def __init__(self, round: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., params: _Optional[_Union[TensorHeader, _Mapping]] = ...) -> None: ...

class RunEnd(_message.Message):
    __slots__ = ("rounds_completed", "reason")
    ROUNDS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rounds_completed: int
    reason: str
    def __init__(self, rounds_completed: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class GradientChunk(_message.Message):
    __slots__ = ("round", "worker_id", "header", "data", "train_loss", "step")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    round: int
    worker_id: int
    header: TensorHeader
    data: bytes
    train_loss: float
    step: int
    def __init__(self, round: _Optional[int] = ..., worker_id: _Optional[int] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., train_loss: _Optional[float] = ..., step: _Optional[int] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "round", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ObserveRequest(_message.Message):
    __slots__ = ("worker_id", "round", "wait_for_honest")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_HONEST_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    round: int
    wait_for_honest: int
    def __init__(self, worker_id: _Optional[int] = ..., round: _Optional[int] = ..., wait_for_honest: _Optional[int] = ...) -> None: ...

class FetchMomentumRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    def __init__(self, worker_id: _Optional[int] = ...) -> None: ...

class ObserveEvent(_message.Message):
    __slots__ = ("vector", "chunk")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    vector: ObservedVector
    chunk: Chunk
    def __init__(self, vector: _Optional[_Union[ObservedVector, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ObservedVector(_message.Message):
    __slots__ = ("worker_id", "header", "seq")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    header: TensorHeader
    seq: int
    def __init__(self, worker_id: _Optional[int] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...
