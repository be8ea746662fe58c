"""The server as a process (SIGTERM drain, exit 0), the CLI as a process, metrics and logs."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from conftest import ROOT
from eagle.v1 import chat_pb2, chat_pb2_grpc
from harness import free_port

from client import EagleClient
from service import logs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "protos"),
                                         env.get("PYTHONPATH", "")])
    return env


def _wait_serving(target: str, proc: subprocess.Popen, limit: float = 120) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read()}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become SERVING")


def serve(tiny_dir, *flags: str, env: dict[str, str] | None = None
          ) -> tuple[subprocess.Popen, str]:
    """`python -m service` on a free port with the tiny model, JSON logs on its stderr;
    `env` adds variables to this process's environment."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--cache-dir",
         str(tiny_dir.parent), "--log-format", "json", *flags],
        env={**_env(), **(env or {})}, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True)
    return proc, f"127.0.0.1:{port}"


def long_request(tokens: int) -> chat_pb2.StreamChatRequest:
    req = chat_pb2.StreamChatRequest(generation=chat_pb2.GenerationConfig(max_new_tokens=tokens,
                                                                    ignore_eos=True))
    req.messages.add(role=chat_pb2.ROLE_USER).parts.add(text="a long answer please")
    return req


def test_sigterm_drains_a_running_stream_then_exits_0(tiny_dir) -> None:
    proc, target = serve(tiny_dir, "--grace-seconds", "30")
    try:
        _wait_serving(target, proc)
        req = long_request(1500)
        stream = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(target)).StreamChat(
            req, timeout=60)
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        end = time.monotonic() + 10  # health goes NOT_SERVING first, then calls are refused
        while time.monotonic() < end:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status != 1:
                    break
            except grpc.RpcError:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        fresh = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(
            target, options=[("grpc.enable_retries", 0)]))
        with pytest.raises(grpc.RpcError) as refused:
            fresh.Chat(req, timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        chunks += list(stream)
        assert chunks[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == 1500
        assert proc.wait(timeout=60) == 0
        lines = [json.loads(line) for line in proc.stderr.read().splitlines()
                 if line.startswith("{")]
        assert any(line["msg"] == "signal received: draining" for line in lines)
        settings = next(line["settings"] for line in lines if line["msg"] == "settings")
        assert settings["grace_seconds"] == 30.0 and settings["auth_token"] == ""
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_streams_prints_json_and_reports_errors(server, media_root) -> None:
    cli = [sys.executable, "-m", "client.cli", "--server", server.target]
    photo = str(media_root / "photo.jpg")
    streamed = subprocess.run(cli + ["--image", photo, "--max-tokens", "6", "--usage",
                                     "What is in this picture?"],
                              env=_env(), capture_output=True, text=True, timeout=120)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.endswith("\n") and len(streamed.stdout) > 1
    assert "[length] prompt" in streamed.stderr and "completion 6" in streamed.stderr
    as_json = subprocess.run(cli + ["--json", "--max-tokens", "4", "--video", "clip.mp4",
                                    "--frames", "4", "Describe"],
                             env=_env(), capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["finish_reason"] == "length" and data["usage"]["video_frames"] == 4
    assert data["usage"]["completion_tokens"] == 4
    info = subprocess.run(cli + ["--info"], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0 and json.loads(info.stdout)["model_type"] == "eagle_chat"
    bad = subprocess.run(cli + ["--max-tokens", "999999", "hi"], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("eagle-chat: INVALID_ARGUMENT: generation.max_new_tokens: "
                                  "999999 is over the limit of 4096 "
                                  "(field generation.max_new_tokens)")


def test_cli_constrains_the_reply_and_prints_logprobs(server, tmp_path) -> None:
    cli = [sys.executable, "-m", "client.cli", "--server", server.target]
    choice = subprocess.run(cli + ["--choice", "yes,no,unsure", "Is it safe?"], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert choice.returncode == 0, choice.stderr
    assert choice.stdout in ("yes\n", "no\n", "unsure\n")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"],
        "additionalProperties": False}))
    as_json = subprocess.run(cli + ["--json-schema", str(schema), "--logprobs", "2", "--json",
                                    "Pick one."], env=_env(), capture_output=True, text=True,
                             timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["finish_reason"] == "stop"
    assert 1 <= json.loads(data["text"])["n"] <= 9
    assert len(data["logprobs"]) == data["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) <= 2 and t["logprob"] <= 0 for t in data["logprobs"])
    both = subprocess.run(cli + ["--choice", "a", "--regex", "b", "x"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_metrics_endpoint_and_request_id_in_logs(server) -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(logs._RequestIdFilter())  # noqa: SLF001 (the filter logs.setup installs)
    handler.setFormatter(logs.JsonFormatter())
    logging.getLogger("service").addHandler(handler)
    logging.getLogger("service").setLevel(logging.INFO)
    try:
        with EagleClient(server.target) as client:
            client.chat("hello", max_new_tokens=3, request_id="trace-42")
    finally:
        logging.getLogger("service").removeHandler(handler)
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    done = [r for r in records if r.get("request_id") == "trace-42" and r["msg"] == "rpc done"]
    assert done and done[0]["method"] == "Chat" and done[0]["code"] == "OK"
    assert done[0]["completion_tokens"] == 3
    port = free_port()
    httpd, _ = server.app.metrics.serve("127.0.0.1", port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        httpd.shutdown()
    for series in ('eagle_requests_total{code="OK",method="Chat",tenant="default"}',
                   'eagle_queue_seconds_count{tenant="default"}',
                   "eagle_time_to_first_token_seconds_count", "eagle_request_seconds_bucket",
                   "eagle_completion_tokens_total", "eagle_queue_depth",
                   "eagle_running_batch_size", "eagle_vision_tiles_total"):
        assert series in text, series


NODE_CLIENT = r"""
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');
const fs = require('fs');
const [protoDir, target, imagePath] = process.argv.slice(2);
const def = loader.loadSync('eagle/v1/chat.proto', {includeDirs: [protoDir], keepCase: true,
  longs: Number, enums: String, defaults: true});
const eagle = grpc.loadPackageDefinition(def).eagle.v1;
const client = new eagle.ChatService(target, grpc.credentials.createInsecure());
const request = {messages: [{role: 'ROLE_USER', parts: [{image: {data: fs.readFileSync(imagePath)}},
  {text: 'What is in this picture?'}]}], generation: {max_new_tokens: 5}};
client.Chat(request, (err, reply) => {
  if (err) { console.error(err); process.exit(1); }
  const chunks = [];
  const call = client.StreamChat(request);
  call.on('data', (c) => chunks.push(c));
  call.on('error', (e) => { console.error(e); process.exit(1); });
  call.on('end', () => {
    console.log(JSON.stringify({chat: reply, streamed: chunks.map((c) => c.text).join(''),
      last: chunks[chunks.length - 1]}));
  });
});
"""


def test_a_nodejs_client_calls_chat_and_stream_chat(server, media_root, tmp_path) -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.skip("node and npm are not installed: the Node.js client check needs them")
    install = subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund",
                              "@grpc/grpc-js@1", "@grpc/proto-loader@0.7"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    (tmp_path / "client.js").write_text(NODE_CLIENT)
    run = subprocess.run([node, "client.js", str(ROOT / "protos"), server.target,
                          str(media_root / "photo.jpg")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["chat"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert out["chat"]["usage"]["completion_tokens"] == 5
    assert out["chat"]["usage"]["image_tiles"] == 13
    assert out["streamed"] == out["chat"]["text"]
    assert out["last"]["finish_reason"] == "FINISH_REASON_LENGTH"


def test_one_info_line_per_request_and_no_library_chatter(tiny_dir) -> None:
    """pyvips (every PNG), transformers (every load) and friends stay out of the log."""
    import factory

    proc, target = serve(tiny_dir, "--video-workers", "0", "--log-level", "INFO")
    try:
        _wait_serving(target, proc)
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(target))
        png = factory.encode(factory.document(900, 700), "PNG")
        for _ in range(3):
            req = chat_pb2.ChatRequest(generation=chat_pb2.GenerationConfig(max_new_tokens=2))
            parts = req.messages.add(role=chat_pb2.ROLE_USER).parts
            parts.add(image=chat_pb2.Image(data=png))
            parts.add(text="what is it?")
            stub.Chat(req, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        lines = [json.loads(line) for line in proc.stderr.read().splitlines()
                 if line.startswith("{")]
        serving = next(i for i, line in enumerate(lines) if line["msg"] == "serving")
        per_request = [line for line in lines[serving:] if line.get("request_id")]
        assert [line["msg"] for line in per_request] == ["rpc done"] * 3
        loggers = {line["logger"] for line in lines}
        assert not {name for name in loggers if name.split(".")[0] in
                    ("pyvips", "transformers", "PIL", "httpx")}, loggers
        text = "\n".join(str(line) for line in lines)
        assert "to instantiate a model of type" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
