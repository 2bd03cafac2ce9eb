"""Tests for the arcsim.v1 wire protocol: generated stubs in sync with protos/, service shape."""

from __future__ import annotations

import asyncio
import doctest
import importlib.util
import shutil
from pathlib import Path

import grpc
import pytest
import torch

from arcsim import protos_build
from arcsim.coordinator.service import CODEC_STATUS
from arcsim.transport import codec
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.v1 import coordinator_pb2_grpc as pb_grpc

PROTO = Path("arcsim/v1/coordinator.proto")

# grpcio-tools is a development dependency: the stubs themselves must import without it.
needs_protoc = pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A scratch repository root holding a copy of protos/ and of the stubs in the tree."""
    shutil.copytree(protos_build.REPO_ROOT / "protos", tmp_path / "protos")
    (tmp_path / "arcsim" / "v1").mkdir(parents=True)
    for stub in protos_build.expected_stubs([PROTO]):
        shutil.copyfile(protos_build.REPO_ROOT / stub, tmp_path / stub)
    return tmp_path


@needs_protoc
def test_stubs_in_tree_equal_what_protos_generate() -> None:
    # Execute
    problems = protos_build.check()

    # Assert
    assert problems == [], "\n".join(problems)


@needs_protoc
def test_check_main_exits_0_when_up_to_date(repo_copy: Path) -> None:
    # Execute
    code = protos_build.main(["--check", "--repo-root", str(repo_copy)])

    # Assert
    assert code == 0


@needs_protoc
def test_check_fails_when_the_proto_is_edited_without_regenerating(repo_copy: Path) -> None:
    # Prepare
    proto = repo_copy / "protos" / PROTO
    text = proto.read_text()
    proto.write_text(text.replace("  string message = 3;\n", "  string message = 3;\n  int32 extra = 4;\n"))

    # Execute
    problems = protos_build.check(repo_root=repo_copy)
    code = protos_build.main(["--check", "--repo-root", str(repo_copy)])

    # Assert
    assert code == 1
    assert any(p.startswith("differs: arcsim/v1/coordinator_pb2.py") for p in problems)
    assert any(p.startswith("differs: arcsim/v1/coordinator_pb2.pyi") for p in problems)


@needs_protoc
def test_check_reports_missing_and_stale_stubs(repo_copy: Path) -> None:
    # Prepare
    (repo_copy / "arcsim/v1/coordinator_pb2_grpc.py").unlink()
    (repo_copy / "arcsim/v1/old_pb2.py").write_text("# left over\n")

    # Execute
    problems = protos_build.check(repo_root=repo_copy)

    # Assert
    assert problems == [
        "missing: arcsim/v1/coordinator_pb2_grpc.py",
        "stale (no .proto generates it): arcsim/v1/old_pb2.py",
    ]


@needs_protoc
def test_regenerate_repairs_the_tree(repo_copy: Path) -> None:
    # Prepare
    (repo_copy / "arcsim/v1/coordinator_pb2.py").write_text("# edited by hand\n")
    (repo_copy / "arcsim/v1/old_pb2.pyi").write_text("")

    # Execute
    changes = protos_build.regenerate(repo_root=repo_copy)

    # Assert
    assert changes == ["wrote: arcsim/v1/coordinator_pb2.py", "deleted stale: arcsim/v1/old_pb2.pyi"]
    assert protos_build.check(repo_root=repo_copy) == []


@needs_protoc
def test_generate_raises_without_proto_files(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "protos").mkdir()

    # Execute / Assert
    with pytest.raises(ValueError, match="no .proto files"):
        protos_build.generate(tmp_path / "out", repo_root=tmp_path)


@needs_protoc
def test_generate_raises_when_protoc_fails(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos" / "broken.proto").write_text('syntax = "proto3";\nmessage {\n')
    (tmp_path / "out").mkdir()

    # Execute / Assert
    with pytest.raises(RuntimeError, match="protoc failed"):
        protos_build.generate(tmp_path / "out", repo_root=tmp_path)


def test_protos_build_doctests() -> None:
    # Execute
    result = doctest.testmod(protos_build)

    # Assert
    assert result.failed == 0 and result.attempted > 0


def test_service_has_its_rpcs_with_their_streaming_kinds() -> None:
    # Prepare
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]

    # Execute
    shape = {
        m.name: (m.client_streaming, m.server_streaming, m.input_type.name, m.output_type.name) for m in service.methods
    }

    # Assert
    assert service.full_name == "arcsim.v1.Coordinator"
    assert shape == {
        "Join": (False, False, "JoinRequest", "JoinReply"),
        "Rounds": (False, True, "RoundsRequest", "RoundEvent"),
        "SubmitGradient": (True, False, "GradientChunk", "SubmitReply"),
        "Observe": (False, True, "ObserveRequest", "ObserveEvent"),
        "FetchMomentum": (False, True, "FetchMomentumRequest", "ObserveEvent"),
    }


def test_messages_have_the_documented_fields() -> None:
    # Prepare
    def fields(name: str) -> dict[str, int]:
        return {f.name: f.number for f in pb.DESCRIPTOR.message_types_by_name[name].fields}

    # Execute / Assert
    assert pb.DESCRIPTOR.package == "arcsim.v1"
    assert dict(pb.Role.items()) == {"ROLE_UNSPECIFIED": 0, "HONEST": 1, "BYZANTINE": 2}
    assert fields("TensorHeader") == {"dtype": 1, "shape": 2, "num_bytes": 3, "checksum": 4}
    assert fields("JoinRequest") == {"worker_id": 1, "role": 2}
    assert fields("JoinReply") == {
        "run_id": 1,
        "config_yaml": 2,
        "num_parameters": 3,
        "current_round": 4,
        "chunk_bytes": 5,
        "has_momentum": 6,
        "worker_id": 7,
        "token": 8,
    }
    assert fields("RoundsRequest") == {"worker_id": 1, "from_round": 2, "have_params": 3}
    assert fields("RoundEvent") == {"round_start": 1, "chunk": 2, "run_end": 3}
    assert fields("RoundStart") == {"round": 1, "deadline_unix_ms": 2, "params": 3}
    assert fields("RunEnd") == {"rounds_completed": 1, "reason": 2}
    assert fields("GradientChunk") == {"round": 1, "worker_id": 2, "header": 3, "data": 4, "train_loss": 5, "step": 6}
    assert fields("FetchMomentumRequest") == {"worker_id": 1}
    assert fields("SubmitReply") == {"accepted": 1, "round": 2, "message": 3}
    assert fields("ObserveRequest") == {"worker_id": 1, "round": 2, "wait_for_honest": 3}
    assert fields("ObserveEvent") == {"vector": 1, "chunk": 2}
    assert fields("ObservedVector") == {"worker_id": 1, "header": 2, "seq": 3}


def test_grpc_module_exposes_stub_servicer_and_registration() -> None:
    # Execute
    names = {"CoordinatorStub", "CoordinatorServicer", "add_CoordinatorServicer_to_server"}

    # Assert
    assert names <= set(dir(pb_grpc))
    assert pb_grpc.arcsim_dot_v1_dot_coordinator__pb2 is pb


class _LoopbackServicer(pb_grpc.CoordinatorServicer):
    """Just enough of a coordinator to carry tensors both ways with the codec helpers."""

    def __init__(self, params: torch.Tensor, honest: dict[int, torch.Tensor]) -> None:
        self.params = params
        self.honest = honest

    async def Rounds(self, request: pb.RoundsRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        for event in codec.round_events(self.params, round=request.from_round, deadline_unix_ms=0, chunk_bytes=1000):
            yield event
        yield codec.run_end_event(rounds_completed=request.from_round + 1, reason="completed")

    async def SubmitGradient(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.SubmitReply:  # noqa: N802
        reader = codec.VectorReader(max_bytes=1 << 20, expected_shape=self.params.shape, expected_dtype="float32")
        try:
            async for message in request_iterator:
                reader.add(message)
            vector = reader.finish()
        except codec.CodecError as err:
            await context.abort(CODEC_STATUS[err.reason], str(err))
        return pb.SubmitReply(accepted=True, round=reader.round or 0, message=f"{float(vector.sum()):.1f}")

    async def Observe(self, request: pb.ObserveRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        for event in codec.observe_events(self.honest, chunk_bytes=777):
            yield event


async def _loopback_exchange(
    params: torch.Tensor, honest: dict[int, torch.Tensor]
) -> tuple[list[object], pb.SubmitReply, grpc.aio.AioRpcError, list[codec.ObservedTensor]]:
    """Serve _LoopbackServicer on 127.0.0.1 and call Rounds, SubmitGradient (twice) and Observe."""
    server = grpc.aio.server()
    pb_grpc.add_CoordinatorServicer_to_server(_LoopbackServicer(params, honest), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            round_reader = codec.RoundEventReader(max_bytes=1 << 20, expected_shape=(5000,))
            rounds = stub.Rounds(pb.RoundsRequest(worker_id=1, from_round=7))
            items = [item async for e in rounds if (item := round_reader.feed(e)) is not None]
            ones = codec.vector_chunks(torch.ones(5000), round=7, worker_id=1, chunk_bytes=999)
            reply = await stub.SubmitGradient(ones)
            try:
                await stub.SubmitGradient(codec.vector_chunks(torch.ones(4), round=7, worker_id=1))
                raise AssertionError("a wrongly shaped vector was accepted")
            except grpc.aio.AioRpcError as err:
                rejected = err
            observe_reader = codec.ObserveEventReader(max_bytes=1 << 20)
            events = stub.Observe(pb.ObserveRequest(worker_id=9, round=7))
            observed = [item async for e in events if (item := observe_reader.feed(e)) is not None]
    finally:
        await server.stop(None)
    return items, reply, rejected, observed


def test_stubs_carry_chunked_tensors_over_loopback_grpc() -> None:
    # Prepare
    params = torch.arange(5000, dtype=torch.float32)
    honest = {3: torch.full((5000,), 3.0), 1: torch.full((5000,), 1.0)}

    # Execute (asyncio.run: no pytest-asyncio needed, which some machines lack)
    items, reply, rejected, observed = asyncio.run(_loopback_exchange(params, honest))

    # Assert
    assert items[0].round == 7 and torch.equal(items[0].params, params)
    assert items[1] == pb.RunEnd(rounds_completed=8, reason="completed")
    assert (reply.accepted, reply.round, reply.message) == (True, 7, "5000.0")
    assert rejected.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad_shape" in (rejected.details() or "")
    assert [o.worker_id for o in observed] == [1, 3]
    assert torch.equal(observed[1].vector, honest[3])
