"""EagleClient: the blocking client (a context manager; a timeout on every call)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from eagle.v1 import chat_pb2, chat_pb2_grpc

from client._common import (
    DEFAULT_TARGET,
    MAX_MESSAGE_BYTES,
    Channels,
    ChatResult,
    EagleError,
    build_request,
    schema_model,
)


class ChatStream:
    """Iterate for text deltas; `result` holds the final ChatResult once the stream ends.

    `cancel()` stops generation on the server at its next step.
    """

    def __init__(self, call: Any, model: Any = None) -> None:
        self._call = call
        self._model = model  # a pydantic model given as json_schema: result.parsed
        self._parts: list[str] = []
        self._logprobs: list = []
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for chunk in self._call:
                self._logprobs.extend(chunk.logprobs)
                if chunk.text:
                    self._parts.append(chunk.text)
                    yield chunk.text
                if chunk.finish_reason:
                    self.result = ChatResult.from_response(
                        chunk, "".join(self._parts), self._logprobs).parse_as(self._model)
        except grpc.RpcError as err:
            raise EagleError.from_rpc(err, err.trailing_metadata()) from None

    def cancel(self) -> None:
        self._call.cancel()


class EagleClient:
    """Blocking client for eagle.v1.ChatService.

    `target` is any gRPC target; calls are spread over the replicas it resolves to
    (`load_balancing="round_robin"`, health-checked) or kept on one connection
    (`"pick_first"`). Retries: UNAVAILABLE only, before any response data.

    >>> with EagleClient("127.0.0.1:50051") as client:
    ...     print(client.chat("What is in this picture?", images=["photo.jpg"]).text)
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | Path | None = None,
                 client_cert: bytes | str | Path | None = None,
                 client_key: bytes | str | Path | None = None, timeout: float = 120.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, retries: bool = True,
                 load_balancing: str = "round_robin") -> None:
        self._channels = Channels(grpc, chat_pb2_grpc.ChatServiceStub, target, load_balancing,
                                  token, tls=tls, root_certificates=root_certificates,
                                  client_cert=client_cert, client_key=client_key,
                                  max_message_bytes=max_message_bytes, retries=retries)
        self.timeout = timeout

    def chat(self, text: str = "", *, timeout: float | None = None,
             affinity_key: str | None = None, **kwargs: Any) -> ChatResult:
        """One reply, whole. Takes the arguments of `build_request` (images, videos, system,
        history, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop,
        max_tiles_per_image, max_video_frames, frame_timestamps, request_id, cache_salt, and a
        response format: json_schema (with strict), json_object, regex, choice, lark or gbnf;
        logprobs, top_logprobs). With a pydantic model as json_schema, `result.parsed` is an instance.
        `affinity_key` (e.g. a conversation id) sends every call with the same key to the
        same healthy replica, where its images' features are cached."""
        req = build_request(text, **kwargs)
        stub, headers = self._channels.route(affinity_key)
        try:
            resp = stub.Chat(req, timeout=timeout or self.timeout, metadata=headers)
        except grpc.RpcError as err:
            raise EagleError.from_rpc(err, err.trailing_metadata()) from None
        return ChatResult.from_response(resp).parse_as(schema_model(kwargs.get("json_schema")))

    def stream_chat(self, text: str = "", *, timeout: float | None = None,
                    affinity_key: str | None = None, **kwargs: Any) -> ChatStream:
        """The reply as it is generated: iterate the returned ChatStream for text deltas."""
        req = build_request(text, message=chat_pb2.StreamChatRequest, **kwargs)
        stub, headers = self._channels.route(affinity_key)
        call = stub.StreamChat(req, timeout=timeout or self.timeout, metadata=headers)
        return ChatStream(call, schema_model(kwargs.get("json_schema")))

    def model_info(self, timeout: float | None = None) -> chat_pb2.GetModelInfoResponse:
        try:
            return self._channels.stub.GetModelInfo(chat_pb2.GetModelInfoRequest(),
                                                    timeout=timeout or self.timeout,
                                                    metadata=self._channels.metadata)
        except grpc.RpcError as err:
            raise EagleError.from_rpc(err, err.trailing_metadata()) from None

    def close(self) -> None:
        for channel in self._channels.all():
            channel.close()

    def __enter__(self) -> EagleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
