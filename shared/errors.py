"""The one error hierarchy of imagefn.

Invocation failures are named after the image-function contract's error types
(``../shared/reference/scf-image-contract.md``) so that a user who knows SCF recognises
them. Every error knows its contract code (where the contract has one) and its HTTP status;
the gateway turns any ``ImagefnError`` into an HTTP response in exactly one place
(``gateway.errors``), and workers carry them across the queue by ``type`` name.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ImagefnError(Exception):
    """Base of every error imagefn raises on purpose."""

    http_status: ClassVar[int] = 500
    scf_code: ClassVar[int | None] = None

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    @property
    def type_name(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type_name, "message": self.message}
        if self.scf_code is not None:
            body["code"] = self.scf_code
        body.update(self.details)
        return body


# --- caller errors: the request itself is wrong; never retried -------------------------


class InvalidRequest(ImagefnError):
    http_status = 400


class InvalidSpec(InvalidRequest):
    """A function spec failed validation; ``details["fields"]`` names every bad field."""

    def __init__(self, fields: dict[str, str]) -> None:
        names = ", ".join(sorted(fields))
        super().__init__(f"invalid function spec: {names}", details={"fields": fields})
        self.fields = fields


class Unauthorized(ImagefnError):
    """Missing, unknown, expired or revoked credentials (an API key, or the registry
    token service's HTTP Basic credentials)."""

    http_status = 401


class Forbidden(ImagefnError):
    """Valid credentials without the scope the route needs."""

    http_status = 403


class KeyNotFound(ImagefnError):
    """No API key with that id."""

    http_status = 404


class RequestIdConflict(ImagefnError):
    """The caller-chosen request id belongs to another caller's invocation."""

    http_status = 409


class FunctionNotFound(ImagefnError):
    http_status = 404


class TriggerNotFound(ImagefnError):
    """The function has no trigger of that name."""

    http_status = 404


class InvocationNotFound(ImagefnError):
    """No record of that request id (unknown, or past the records' retention)."""

    http_status = 404


class BatchNotFound(ImagefnError):
    """No batch with that id (unknown, or finished longer ago than its retention)."""

    http_status = 404


class VersionNotFound(ImagefnError):
    """The function exists, but not the version or alias an invocation named."""

    http_status = 404


class RequestTooLarge(ImagefnError):
    http_status = 413
    scf_code = 406


# --- throttling ---------------------------------------------------------------------------


class ResourceLimitReached(ImagefnError):
    http_status = 429
    scf_code = 429


class ConcurrencyLimitExceeded(ImagefnError):
    http_status = 429
    scf_code = 432


# --- the function's own failures ----------------------------------------------------------


class UserCodeError(ImagefnError):
    http_status = 502
    scf_code = 443


class FunctionTimeout(ImagefnError):
    http_status = 504
    scf_code = 433


class OutOfMemory(ImagefnError):
    http_status = 502
    scf_code = 434


class UserProcessExited(ImagefnError):
    http_status = 502
    scf_code = 439


class ContainerStateExited(ImagefnError):
    http_status = 502
    scf_code = 405


class ResultTooLarge(ImagefnError):
    http_status = 502
    scf_code = 407


# --- instance start failures --------------------------------------------------------------


class PullImageFailed(ImagefnError):
    http_status = 502
    scf_code = 444


class ContainerInitError(ImagefnError):
    http_status = 502
    scf_code = 445


class PortBindingFailed(ImagefnError):
    http_status = 502
    scf_code = 446


class PullImageTimeout(ImagefnError):
    http_status = 504
    scf_code = 447


class InitContainerTimeout(ImagefnError):
    http_status = 504
    scf_code = 450


class RequestCanceled(ImagefnError):
    http_status = 499
    scf_code = 499


# --- the platform's own failures ----------------------------------------------------------


class ServiceUnavailable(ImagefnError):
    """A platform dependency (Redis, the Docker engine, any worker) cannot serve now."""

    http_status = 503


class QueueUnavailable(ServiceUnavailable):
    """The invocation queue (Redis Streams or Kafka) cannot be reached now. Every queue
    backend raises this, never its client's own exceptions."""


class InternalError(ImagefnError):
    http_status = 500


def _all_subclasses(cls: type[ImagefnError]) -> list[type[ImagefnError]]:
    found: list[type[ImagefnError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


_KNOWN: list[type[ImagefnError]] = [ImagefnError, *_all_subclasses(ImagefnError)]
ERROR_TYPES: dict[str, type[ImagefnError]] = {c.__name__: c for c in _KNOWN}


def error_from_dict(data: dict[str, Any]) -> ImagefnError:
    """Rebuild an error that crossed the queue; unknown types become InternalError."""
    type_name = str(data.get("type", "InternalError"))
    message = str(data.get("message", "unknown error"))
    details = {k: v for k, v in data.items() if k not in ("type", "message", "code")}
    cls = ERROR_TYPES.get(type_name, InternalError)
    if cls is InvalidSpec:
        return InvalidSpec(dict(details.get("fields", {})))
    return cls(message, details=details)
