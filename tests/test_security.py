"""Auth on unary and streaming calls, TLS and mutual TLS with certificates made here."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import grpc
import pytest
from conftest import make_engine
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import RunningServer, free_port

from client import EagleClient, EagleError

TOKEN = "s3cret-token-value"


@pytest.fixture(scope="module")
def auth_server(tiny):
    engine = make_engine(tiny)
    srv = RunningServer(engine, auth_token=TOKEN)
    yield srv
    srv.stop()
    engine.drain(0)


def _handled(srv) -> float:
    return sum(s.value for m in srv.app.metrics.requests.collect() for s in m.samples
               if s.name == "eagle_requests_total")


@pytest.mark.parametrize("token,why", [(None, "missing authorization metadata"),
                                       ("wrong", "the bearer token is not valid")])
def test_unauthenticated_unary_and_streaming_never_reach_the_handler(auth_server, token, why,
                                                                     caplog) -> None:
    before = _handled(auth_server)
    caplog.set_level(logging.DEBUG)
    with EagleClient(auth_server.target, token=token) as client:
        with pytest.raises(EagleError) as unary:
            client.chat("hi", max_new_tokens=2)
        with pytest.raises(EagleError) as streaming:
            list(client.stream_chat("hi", max_new_tokens=2))
        with pytest.raises(EagleError) as info:
            client.model_info()
    for err in (unary.value, streaming.value, info.value):
        assert err.code is grpc.StatusCode.UNAUTHENTICATED and why in err.details
    assert _handled(auth_server) == before
    assert TOKEN not in caplog.text


def test_the_right_token_passes_and_health_stays_open(auth_server) -> None:
    with EagleClient(auth_server.target, token=TOKEN) as client:
        assert client.chat("hi", max_new_tokens=2).usage.completion_tokens == 2
        assert "".join(client.stream_chat("hi", max_new_tokens=3)) != "\x00"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(auth_server.target))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("header,ok", [("bearer " + TOKEN, True), ("BEARER  " + TOKEN, True),
                                       ("Basic " + TOKEN, False), (TOKEN, False),
                                       ("Bearer " + TOKEN.upper(), False)])
def test_the_scheme_is_matched_in_any_case_and_the_token_exactly(auth_server, header,
                                                                 ok) -> None:
    from eagle.v1 import chat_pb2, chat_pb2_grpc

    with grpc.insecure_channel(auth_server.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = lambda: stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=10,  # noqa: E731
                                         metadata=(("authorization", header),))
        if ok:
            assert call().model_name
        else:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_reflection_a_bidirectional_stream_is_refused_without_a_token(auth_server,
                                                                      caplog) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(auth_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(replies)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == ("missing authorization metadata: send 'authorization: "
                                    "Bearer <token>'")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("requests,responses", [(False, False), (False, True), (True, False),
                                                (True, True)])
def test_every_method_kind_gets_a_refusal_of_its_own_kind(requests, responses) -> None:
    import asyncio

    from service.interceptors import _deny

    real = grpc.RpcMethodHandler()
    real.request_streaming, real.response_streaming = requests, responses
    real.request_deserializer = real.response_serializer = None
    refusal = _deny(real, "no token")
    assert (refusal.request_streaming, refusal.response_streaming) == (requests, responses)
    handler = [refusal.unary_unary, refusal.unary_stream, refusal.stream_unary,
               refusal.stream_stream][2 * requests + responses]

    class Aborted(Exception):
        pass

    class Context:
        async def abort(self, code, details):
            raise Aborted(code, details)

    async def run() -> None:
        result = handler(None, Context())
        if responses:
            await result.__anext__()
        else:
            await result

    with pytest.raises(Aborted) as info:
        asyncio.run(run())
    assert info.value.args == (grpc.StatusCode.UNAUTHENTICATED, "no token")


def _cert(name: str, issuer_key, issuer_name, key, ca: bool = False, san: str = "localhost"):
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pki")
    files = {}

    def authority(tag: str):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{tag} CA")])
        cert = _cert(f"{tag} CA", key, name, key, ca=True)
        files[f"{tag}_ca"] = out / f"{tag}_ca.pem"
        files[f"{tag}_ca"].write_bytes(_pem(cert))
        return key, name

    def leaf(tag: str, ca, san: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(tag, ca[0], ca[1], key, san=san)
        files[f"{tag}_cert"], files[f"{tag}_key"] = out / f"{tag}.pem", out / f"{tag}.key"
        files[f"{tag}_cert"].write_bytes(_pem(cert))
        files[f"{tag}_key"].write_bytes(_pem(key))

    good, foreign = authority("good"), authority("foreign")
    leaf("server", good, "localhost")
    leaf("client", good, "client.example")
    leaf("stranger", foreign, "stranger.example")
    return files


def test_tls_and_mutual_tls(tiny, pki) -> None:
    engine = make_engine(tiny)
    with RunningServer(engine, tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                       tls_client_ca=str(pki["good_ca"])) as srv:
        target = f"localhost:{srv.port}"
        ok = EagleClient(target, root_certificates=pki["good_ca"], client_cert=pki["client_cert"],
                         client_key=pki["client_key"], timeout=10, retries=False)
        with ok:
            assert ok.chat("hi", max_new_tokens=2).usage.completion_tokens == 2
            # without tokens, the client certificate's common name names the tenant
            assert ok.model_info().tenant.name == "client"
        failures = [
            EagleClient(target, timeout=5, retries=False),  # plaintext
            EagleClient(target, root_certificates=pki["good_ca"], timeout=5, retries=False),
            EagleClient(target, root_certificates=pki["good_ca"],
                        client_cert=pki["stranger_cert"], client_key=pki["stranger_key"],
                        timeout=5, retries=False),
        ]
        for client in failures:
            with client, pytest.raises(EagleError) as info:
                client.chat("hi", max_new_tokens=2)
            assert info.value.code is grpc.StatusCode.UNAVAILABLE
    engine.drain(0)


def test_tls_without_client_ca_accepts_any_client(tiny, pki) -> None:
    engine = make_engine(tiny)
    with RunningServer(engine, tls_cert=str(pki["server_cert"]),
                       tls_key=str(pki["server_key"])) as srv:
        with EagleClient(f"localhost:{srv.port}", root_certificates=pki["good_ca"],
                         timeout=10) as client:
            assert client.chat("hi", max_new_tokens=1).usage.completion_tokens == 1
    engine.drain(0)


def test_the_http_port_takes_the_grpc_ports_certificate(tiny, pki) -> None:
    """With TLS on, the HTTP port is HTTPS with the same certificate: a client trusting the
    CA gets its answer, a plaintext request is not served; mutual TLS without tokens is
    refused at start-up (the HTTP port cannot name tenants by certificate)."""
    import json
    import ssl
    import urllib.request

    from service.settings import Settings

    http = free_port()
    engine = make_engine(tiny)
    with RunningServer(engine, tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                       http_port=http):
        trust = ssl.create_default_context(cafile=str(pki["good_ca"]))
        req = urllib.request.Request(
            f"https://localhost:{http}/eagle.v1.ChatService/Chat", method="POST",
            data=json.dumps({"messages": [{"role": "ROLE_USER", "parts": [{"text": "hi"}]}],
                             "generation": {"maxNewTokens": 2}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=trust, timeout=30) as r:
            assert json.loads(r.read())["usage"]["completionTokens"] == 2
        with pytest.raises(OSError):  # plaintext to the TLS port: no HTTP answer
            urllib.request.urlopen(f"http://localhost:{http}/readyz", timeout=5).read()
    engine.drain(0)
    with pytest.raises(ValueError, match="^--http-port with --tls-client-ca names tenants"):
        Settings(tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                 tls_client_ca=str(pki["good_ca"]), http_port=8080).check()
