"""Server reflection v1 and v1alpha, and a StreamChat call made from reflection alone."""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2

SERVED = ["eagle.v1.ChatService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
          "grpc.reflection.v1alpha.ServerReflection"]


def reflect(target: str, version: str, *requests: reflection_pb2.ServerReflectionRequest):
    """Ask the server's reflection service `version` ("v1" or "v1alpha"). The two protocols
    are equal on the wire, so v1alpha's message classes serve for both; only the method path
    (the service name a client asks for) differs."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        return list(call(iter(requests), timeout=10))


def test_reflection_v1_and_v1alpha_list_the_services(server) -> None:
    for version in ("v1", "v1alpha"):
        [answer] = reflect(server.target, version,
                           reflection_pb2.ServerReflectionRequest(list_services=""))
        names = sorted(s.name for s in answer.list_services_response.service)
        assert names == SERVED, version


def test_the_v1_reflection_service_describes_itself(server) -> None:
    [answer] = reflect(server.target, "v1", reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="grpc.reflection.v1.ServerReflection"))
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in answer.file_descriptor_response.file_descriptor_proto]
    [v1] = [f for f in files if f.package == "grpc.reflection.v1"]
    assert v1.name == "grpc/reflection/v1/reflection.proto"
    method = v1.service[0].method[0]
    assert (v1.service[0].name, method.name, method.input_type, method.output_type) == (
        "ServerReflection", "ServerReflectionInfo", ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse")


def test_an_unknown_symbol_gets_not_found_through_v1(server) -> None:
    [answer] = reflect(server.target, "v1", reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="eagle.v1.NoSuchService"))
    assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_stream_chat_through_reflection_alone(server) -> None:
    """As grpcurl and Postman do: fetch the descriptors from the server into an empty pool,
    build the request from JSON, call the method by its path. No generated code is used."""
    [answer] = reflect(server.target, "v1", reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="eagle.v1.ChatService"))
    pool = descriptor_pool.DescriptorPool()
    pending = [descriptor_pb2.FileDescriptorProto.FromString(b)
               for b in answer.file_descriptor_response.file_descriptor_proto]
    for _ in range(len(pending)):  # dependencies first (the server sends them in any order)
        ready = [f for f in pending if _has_deps(pool, f)]
        for f in ready:
            pool.Add(f)
        pending = [f for f in pending if f not in ready]
    assert pending == []
    service = pool.FindServiceByName("eagle.v1.ChatService")
    method = service.methods_by_name["StreamChat"]
    assert method.server_streaming and not method.client_streaming
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    request = json_format.ParseDict({
        "requestId": "reflected-1",
        "messages": [{"role": "ROLE_USER", "parts": [{"text": "Hello"}]}],
        "generation": {"maxNewTokens": 6, "ignoreEos": True}}, request_type())
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_stream("/eagle.v1.ChatService/StreamChat",
                                    request_serializer=request_type.SerializeToString,
                                    response_deserializer=response_type.FromString)
        chunks = [json_format.MessageToDict(c) for c in call(request, timeout=30)]
    assert {c["requestId"] for c in chunks} == {"reflected-1"}
    last = chunks[-1]
    assert last["finishReason"] == "FINISH_REASON_LENGTH"
    assert last["usage"]["completionTokens"] == 6
    assert all("finishReason" not in c for c in chunks[:-1])


def _has_deps(pool: descriptor_pool.DescriptorPool, f: descriptor_pb2.FileDescriptorProto) -> bool:
    try:
        for dep in f.dependency:
            pool.FindFileByName(dep)
        return True
    except KeyError:
        return False
