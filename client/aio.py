"""AsyncEagleClient: the asyncio client, the same API as EagleClient with `await`."""
from __future__ import annotations

from collections.abc import AsyncIterator
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


class AsyncChatStream:
    """`async for` the text deltas; `result` holds the final ChatResult afterwards."""

    def __init__(self, call: Any, model: Any = None) -> None:
        self._call = call
        self._model = model  # a pydantic model given as json_schema: result.parsed
        self._parts: list[str] = []
        self._logprobs: list = []
        self.result: ChatResult | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for chunk in self._call:
                self._logprobs.extend(chunk.logprobs)
                if chunk.text:
                    self._parts.append(chunk.text)
                    yield chunk.text
                if chunk.finish_reason:
                    self.result = ChatResult.from_response(
                        chunk, "".join(self._parts), self._logprobs).parse_as(self._model)
        except grpc.RpcError as err:
            raise EagleError.from_rpc(err, await self._call.trailing_metadata()) from None

    def cancel(self) -> None:
        self._call.cancel()


class AsyncEagleClient:
    """asyncio client for eagle.v1.ChatService; use `async with`."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | Path | None = None,
                 client_cert: bytes | str | Path | None = None,
                 client_key: bytes | str | Path | None = None, timeout: float = 120.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, retries: bool = True,
                 load_balancing: str = "round_robin") -> None:
        self._channels = Channels(grpc.aio, chat_pb2_grpc.ChatServiceStub, target, load_balancing,
                                  token, tls=tls, root_certificates=root_certificates,
                                  client_cert=client_cert, client_key=client_key,
                                  max_message_bytes=max_message_bytes, retries=retries)
        self.timeout = timeout

    async def chat(self, text: str = "", *, timeout: float | None = None,
                   affinity_key: str | None = None, **kwargs: Any) -> ChatResult:
        """One reply, whole (see EagleClient.chat for the arguments)."""
        stub, headers = self._channels.route(affinity_key)
        call = stub.Chat(build_request(text, **kwargs), timeout=timeout or self.timeout,
                         metadata=headers)
        try:
            return ChatResult.from_response(await call).parse_as(
                schema_model(kwargs.get("json_schema")))
        except grpc.RpcError as err:
            raise EagleError.from_rpc(err, await call.trailing_metadata()) from None

    def stream_chat(self, text: str = "", *, timeout: float | None = None,
                    affinity_key: str | None = None, **kwargs: Any) -> AsyncChatStream:
        """The reply as it is generated: `async for delta in client.stream_chat(...)`."""
        stub, headers = self._channels.route(affinity_key)
        call = stub.StreamChat(build_request(text, message=chat_pb2.StreamChatRequest,
                                             **kwargs),
                               timeout=timeout or self.timeout, metadata=headers)
        return AsyncChatStream(call, schema_model(kwargs.get("json_schema")))

    async def model_info(self, timeout: float | None = None) -> chat_pb2.GetModelInfoResponse:
        call = self._channels.stub.GetModelInfo(chat_pb2.GetModelInfoRequest(),
                                                timeout=timeout or self.timeout,
                                                metadata=self._channels.metadata)
        try:
            return await call
        except grpc.RpcError as err:
            raise EagleError.from_rpc(err, await call.trailing_metadata()) from None

    async def close(self) -> None:
        for channel in self._channels.all():
            await channel.close()

    async def __aenter__(self) -> AsyncEagleClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
