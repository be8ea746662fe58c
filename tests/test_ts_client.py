"""The TypeScript client (clients/ts): its generated code is current, it builds with tsc, and
its tests (node --test) pass against a live server over gRPC and the Connect protocol."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import factory
import pytest
from conftest import ROOT, make_engine
from harness import RunningServer, free_port

TS = ROOT / "clients" / "ts"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (TS / "node_modules").is_dir(),
    reason="Node.js and clients/ts/node_modules (make install runs npm ci) are needed")


def test_the_generated_typescript_is_current(tmp_path: Path) -> None:
    """`buf generate` with the local protoc-gen-es (as `make protos` runs it) into a scratch
    copy: the checked-in src/gen must be what it writes."""
    template = (TS / "buf.gen.yaml").read_text().replace("out: clients/ts/src/gen",
                                                         f"out: {tmp_path}")
    (tmp_path / "buf.gen.yaml").write_text(template)
    subprocess.run(["buf", "generate", "--template", str(tmp_path / "buf.gen.yaml")],
                   cwd=ROOT, check=True)
    fresh = (tmp_path / "eagle/v1/chat_pb.ts").read_text()
    assert fresh == (TS / "src/gen/eagle/v1/chat_pb.ts").read_text(), (
        "clients/ts/src/gen is stale: run `make protos`")


def test_the_typescript_client_against_a_live_server(tiny, tmp_path: Path) -> None:
    subprocess.run(["npx", "--no-install", "tsc", "-p", "tsconfig.json"], cwd=TS, check=True,
                   timeout=120)
    http = free_port()
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(factory.encode(factory.photo(1000, 500), "JPEG"))
    engine = make_engine(tiny)
    try:
        with RunningServer(engine, http_port=http, auth_token="web:ts-s3cret") as srv:
            env = {**os.environ, "EAGLE_GRPC_URL": f"http://{srv.target}",
                   "EAGLE_HTTP_URL": f"http://127.0.0.1:{http}", "EAGLE_TOKEN": "ts-s3cret",
                   "EAGLE_PHOTO": str(photo)}
            run = subprocess.run(["node", "--test", "test/"], cwd=TS, env=env,
                                 capture_output=True, text=True, timeout=180)
    finally:
        engine.drain(0)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# pass 5" in run.stdout and "# fail 0" in run.stdout, run.stdout[-2000:]
