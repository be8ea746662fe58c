"""Routine cancels are quiet: fifty streams cancelled mid-way leave no ERROR in the log."""
from __future__ import annotations

import gc
import logging
import time

import grpc
from eagle.v1 import chat_pb2, chat_pb2_grpc


def test_fifty_streams_cancelled_midway_log_no_error(server, caplog) -> None:
    caplog.set_level(logging.INFO)
    req = chat_pb2.StreamChatRequest(generation=chat_pb2.GenerationConfig(
        max_new_tokens=2000, ignore_eos=True))
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="a long answer please")
    with grpc.insecure_channel(server.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for _ in range(5):
            streams = [stub.StreamChat(req, timeout=60) for _ in range(10)]
            for stream in streams:
                assert next(stream).text
            for stream in streams:
                stream.cancel()
    deadline = time.monotonic() + 10
    while server.app.servicer.active and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()
    time.sleep(0.5)
    assert server.app.servicer.active == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage()[:300] for r in errors]
