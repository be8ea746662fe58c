"""The Go client (clients/go): its generated code is current, and `go test` passes against a
live server. Built with Debian's Go and its gRPC, protobuf and genproto sources in GOPATH
mode (this project's machines reach PyPI, npm and Debian, not the Go module proxy); users
build the same package as a module against current gRPC (go.mod)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import factory
import pytest
from conftest import ROOT, make_engine
from harness import RunningServer

GO = ROOT / "clients" / "go"
GOCODE = Path("/usr/share/gocode")
pytestmark = pytest.mark.skipif(
    shutil.which("go") is None or not (GOCODE / "src/google.golang.org/grpc").is_dir()
    or shutil.which("protoc-gen-go-grpc") is None,
    reason="Debian's golang-go, golang-google-grpc-dev, golang-google-protobuf-dev, "
           "golang-github-golang-protobuf-1-5-dev, golang-google-genproto-dev, protoc-gen-go "
           "and protoc-gen-go-grpc are needed (.ci/run installs them)")


def test_the_generated_go_is_current(tmp_path: Path) -> None:
    template = (GO / "buf.gen.yaml").read_text().replace("out: clients/go/gen",
                                                         f"out: {tmp_path}")
    (tmp_path / "buf.gen.yaml").write_text(template)
    subprocess.run(["buf", "generate", "--template", str(tmp_path / "buf.gen.yaml")],
                   cwd=ROOT, check=True)
    for name in ("chat.pb.go", "chat_grpc.pb.go"):
        assert (tmp_path / "eagle/v1" / name).read_text() == \
            (GO / "gen/eagle/v1" / name).read_text(), "clients/go/gen is stale: run `make protos`"


def test_the_go_client_against_a_live_server(tiny, tmp_path: Path) -> None:
    gopath = tmp_path / "gopath"
    home = gopath / "src/github.com/eagle-grpc/eagle-grpc/clients"
    home.mkdir(parents=True)
    (home / "go").symlink_to(GO)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(factory.encode(factory.photo(1000, 500), "JPEG"))
    from grpc_health.v1 import health_pb2

    engine = make_engine(tiny)
    replicas = [RunningServer(make_engine(tiny), auth_token="web:go-s3cret") for _ in range(3)]
    drained = replicas[2]  # health NOT_SERVING, as while draining: clients must avoid it
    drained.call(drained.app._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
    try:
        with RunningServer(engine, auth_token="web:go-s3cret") as srv:
            # PWD: go takes the package's import path from it (the GOPATH path, not the
            # symlink's target)
            env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}:{GOCODE}",
                   "PWD": str(home / "go"),
                   "GOFLAGS": "", "GRPC_GO_RETRY": "on", "EAGLE_GRPC_TARGET": srv.target,
                   "EAGLE_TOKEN": "go-s3cret", "EAGLE_PHOTO": str(photo),
                   "EAGLE_GRPC_REPLICAS": ",".join(r.target for r in replicas)}
            run = subprocess.run(["go", "test", "-count=1", "-v", "."], cwd=home / "go",
                                 env=env, capture_output=True, text=True, timeout=300)
        chats = [r.app.metrics.requests.labels("Chat", "OK", "web")._value.get()
                 for r in replicas]
    finally:
        engine.drain(0)
        for r in replicas:
            r.stop()
            r.app.engine.drain(0)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert out.count("--- PASS: ") == 6 and "--- FAIL" not in out, out[-3000:]
    # round_robin over the healthy two, none to the one reporting NOT_SERVING
    assert chats[2] == 0 and chats[0] + chats[1] == 12 and min(chats[:2]) >= 4, chats
