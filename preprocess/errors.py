"""Typed preprocessing errors; the service maps each class to one gRPC status."""
from __future__ import annotations


class FieldError(Exception):
    """An error with a message for the caller and, when known, the request field it is about."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class PreprocessError(FieldError):
    """Base of the preprocessing errors. `field` is filled in by the service."""


class MediaError(PreprocessError):
    """Media that cannot be used: bad format, damaged data, over a limit (INVALID_ARGUMENT)."""


class ReferenceNotFound(PreprocessError):
    """A media reference that points at nothing (NOT_FOUND)."""


class ReferenceDenied(PreprocessError):
    """A media reference that points where the policy forbids (PERMISSION_DENIED)."""


class ContextOverflow(PreprocessError):
    """The request does not fit the context even at the minimum vision budget (INVALID_ARGUMENT)."""
