"""The contract: generated code is current, importable as eagle.v1, and every field is commented."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

GENERATED = ["chat_pb2.py", "chat_pb2.pyi", "chat_pb2_grpc.py", "chat_connect.py"]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """The gRPC code and the Connect stubs of the HTTP port (protoc-gen-connectrpc, the
    version pinned in the dev extra), as `make protos` writes them."""
    plugin = Path(sys.executable).parent / "protoc-gen-connectrpc"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--plugin=protoc-gen-connectrpc={plugin}",
                    f"--connectrpc_out={tmp_path}", "--connectrpc_opt=protobuf=google",
                    str(ROOT / "protos/eagle/v1/chat.proto")], check=True)
    for name in GENERATED:
        fresh = (tmp_path / "eagle/v1" / name).read_text()
        checked_in = (ROOT / "protos/eagle/v1" / name).read_text()
        assert fresh == checked_in, f"protos/eagle/v1/{name} is stale: run `make protos`"


def test_importable_as_eagle_v1_with_the_fixed_names() -> None:
    from eagle.v1 import chat_pb2, chat_pb2_grpc

    service = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
    assert [m.name for m in service.methods] == ["Chat", "StreamChat", "GetModelInfo"]
    assert service.methods_by_name["StreamChat"].server_streaming
    assert chat_pb2.DESCRIPTOR.package == "eagle.v1"
    assert chat_pb2.Role.Value("ROLE_SYSTEM") == 1 and chat_pb2.Role.Value("ROLE_ASSISTANT") == 3
    assert [(v.name, v.number) for v in chat_pb2.FinishReason.DESCRIPTOR.values] == [
        ("FINISH_REASON_UNSPECIFIED", 0), ("FINISH_REASON_STOP", 1), ("FINISH_REASON_LENGTH", 2),
        ("FINISH_REASON_STOP_SEQUENCE", 3)]
    rpcs = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert rpcs == {"Chat": ("ChatRequest", "ChatResponse"),
                    "StreamChat": ("StreamChatRequest", "StreamChatResponse"),
                    "GetModelInfo": ("GetModelInfoRequest", "GetModelInfoResponse")}
    fields = {m: [(f.name, f.number) for f in chat_pb2.DESCRIPTOR.message_types_by_name[m].fields]
              for m in ("ChatRequest", "StreamChatRequest", "ChatResponse", "StreamChatResponse")}
    # the two requests (and the two replies) are the same on the wire
    assert fields["ChatRequest"] == fields["StreamChatRequest"] == [
        ("request_id", 1), ("messages", 2), ("generation", 3), ("vision", 4), ("cache_salt", 5),
        ("priority", 6)]
    assert fields["ChatResponse"] == fields["StreamChatResponse"] == [
        ("request_id", 1), ("text", 2), ("finish_reason", 3), ("usage", 4), ("timing", 5),
        ("adjustments", 6), ("stop_sequence", 7), ("logprobs", 8)]
    fields = {m: [f.name for f in chat_pb2.DESCRIPTOR.message_types_by_name[m].fields]
              for m in ("Part", "Video", "GenerationConfig", "Usage", "Timing")}
    assert fields["Part"] == ["text", "image", "video"]
    assert fields["Video"] == ["uri", "data", "num_frames", "start_seconds", "end_seconds"]
    assert fields["GenerationConfig"] == ["max_new_tokens", "temperature", "top_p", "top_k",
                                          "repetition_penalty", "seed", "stop", "ignore_eos",
                                          "json_schema", "json_object", "regex", "choice",
                                          "grammar", "logprobs", "top_logprobs"]
    assert fields["Usage"] == ["prompt_tokens", "completion_tokens", "vision_tokens",
                               "image_tiles", "video_frames", "cached_tiles",
                               "cached_prompt_tokens"]
    assert fields["Timing"] == ["queue_ms", "preprocess_ms", "prefill_ms", "decode_ms"]
    assert hasattr(chat_pb2_grpc, "ChatServiceStub")


def test_every_rpc_message_and_field_is_commented() -> None:
    lines = (ROOT / "protos/eagle/v1/chat.proto").read_text().splitlines()
    decl = re.compile(r"^\s*(rpc |message |enum |(optional |repeated )?[\w.]+ \w+ = \d+;|\w+ = \d+;)")
    missing = [line.strip() for i, line in enumerate(lines)
               if decl.match(line) and not lines[i - 1].strip().startswith("//")]
    assert missing == []
