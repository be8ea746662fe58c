"""Request ids across a mesh: x-request-id metadata in, the id in every message and trailer."""
from __future__ import annotations

import grpc
import pytest
from eagle.v1 import chat_pb2, chat_pb2_grpc
from grpc_status import rpc_status


def request(message=chat_pb2.ChatRequest, request_id: str = "", **gen):
    req = message(request_id=request_id, generation=chat_pb2.GenerationConfig(**gen))
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="hi")
    return req


def trailer(call) -> str:
    values = [v for k, v in call.trailing_metadata() if k == "x-request-id"]
    assert len(values) == 1, call.trailing_metadata()
    return values[0]


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def test_chat_takes_the_metadata_id_when_the_request_has_none(stub) -> None:
    reply, call = stub.Chat.with_call(request(max_new_tokens=2), timeout=30,
                                      metadata=(("x-request-id", "mesh-7f3a"),))
    assert reply.request_id == "mesh-7f3a" and trailer(call) == "mesh-7f3a"


def test_the_requests_own_id_wins_over_the_metadata(stub) -> None:
    reply, call = stub.Chat.with_call(request(request_id="own-1", max_new_tokens=2), timeout=30,
                                      metadata=(("x-request-id", "mesh-7f3a"),))
    assert reply.request_id == "own-1" and trailer(call) == "own-1"


def test_without_any_id_the_server_assigns_one_and_sends_it_back_both_ways(stub) -> None:
    reply, call = stub.Chat.with_call(request(max_new_tokens=2), timeout=30)
    assert len(reply.request_id) == 32 and trailer(call) == reply.request_id


def test_stream_chat_carries_the_id_in_every_message_and_the_trailer(stub) -> None:
    call = stub.StreamChat(request(chat_pb2.StreamChatRequest, max_new_tokens=5,
                                   ignore_eos=True), timeout=30,
                           metadata=(("x-request-id", "mesh-stream-1"),))
    chunks = list(call)
    assert len(chunks) >= 2 and {c.request_id for c in chunks} == {"mesh-stream-1"}
    assert trailer(call) == "mesh-stream-1"


def test_a_failed_call_carries_the_id_beside_its_error_details(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(request(max_new_tokens=100_000), timeout=30,
                  metadata=(("x-request-id", "mesh-bad-1"),))
    err = info.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "generation.max_new_tokens: 100000 is over the limit of 4096"
    assert trailer(err) == "mesh-bad-1"
    status = rpc_status.from_call(err)  # the BadRequest details are still there
    assert status is not None and len(status.details) == 1


def test_a_bad_metadata_id_is_invalid_argument_naming_it(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Chat(request(max_new_tokens=2), timeout=30, metadata=(("x-request-id", "x" * 129),))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("x-request-id: the metadata value must be at most 128 "
                                    "printable ASCII characters without spaces")
