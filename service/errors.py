"""One table from domain errors to gRPC status codes, and the rich status built from them."""
from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from preprocess.errors import (
    ContextOverflow,
    MediaError,
    PreprocessError,
    ReferenceDenied,
    ReferenceNotFound,
)
from service.engine.job import EngineError

log = logging.getLogger(__name__)

_PREPROCESS = {
    MediaError: grpc.StatusCode.INVALID_ARGUMENT,
    ContextOverflow: grpc.StatusCode.INVALID_ARGUMENT,
    ReferenceNotFound: grpc.StatusCode.NOT_FOUND,
    ReferenceDenied: grpc.StatusCode.PERMISSION_DENIED,
}
_ENGINE = {name: getattr(grpc.StatusCode, name) for name in (
    "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED",
    "INTERNAL", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED")}


# A status message travels percent-encoded in the grpc-message header, and again inside the
# base64 details (BadRequest repeats it): kept to 1,000 UTF-8 bytes, the whole status stays
# under 6 KB, well inside the 16 KB of metadata a default client accepts.
MAX_MESSAGE_BYTES = 1000


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` cut to `limit` UTF-8 bytes with a note of how much was cut."""
    data = message.encode("utf-8")
    if len(data) <= limit:
        return message
    head = data[:limit - 60].decode("utf-8", "ignore")
    return f"{head}... ({len(message) - len(head):,} more characters cut)"


class RequestError(Exception):
    """A request field that fails validation: INVALID_ARGUMENT naming the field."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = f"{field}: {message}"


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(status code, message, field) for any exception; unknown ones are INTERNAL and logged."""
    if isinstance(exc, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message, exc.field
    if isinstance(exc, PreprocessError):
        for kind, code in _PREPROCESS.items():
            if isinstance(exc, kind):
                return code, exc.message, exc.field
    if isinstance(exc, EngineError):
        return _ENGINE.get(exc.code, grpc.StatusCode.INTERNAL), exc.message, exc.field
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); it has been logged", ""


def rich_status(code: grpc.StatusCode, message: str, field: str = "", retry_ms: int = 0,
                trailers: tuple[tuple[str, str], ...] = ()) -> grpc.Status:
    """A google.rpc.Status with BadRequest (the field) or RetryInfo (overload) attached, and
    `trailers` sent beside it in the trailing metadata."""
    message = bounded(message)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message,
                               details=status_details(message, field, retry_ms))
    out = rpc_status.to_status(status)
    if trailers:
        out = _Status(out.code, out.details, tuple(out.trailing_metadata) + tuple(trailers))
    return out


def status_details(message: str, field: str = "", retry_ms: int = 0) -> list[any_pb2.Any]:
    """The details every transport attaches to an error: BadRequest naming the field that
    was wrong, RetryInfo with the wait before a retry (gRPC's status details, Connect's
    error details)."""
    details = []
    if field:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)])
        details.append(_pack(bad))
    if retry_ms:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(retry_ms)
        details.append(_pack(info))
    return details


class _Status(grpc.Status):
    """grpc.Status is an interface: this is the plain value grpc_status builds, with room
    for more trailing metadata than the status details."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, object], ...]) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
