"""Python client for eagle-grpc: EagleClient (sync), AsyncEagleClient (asyncio), EagleError."""
from client._common import ChatResult, EagleError, Video
from client.aio import AsyncChatStream, AsyncEagleClient
from client.sync import ChatStream, EagleClient

__all__ = ["EagleClient", "AsyncEagleClient", "ChatStream", "AsyncChatStream", "ChatResult",
           "EagleError", "Video"]
