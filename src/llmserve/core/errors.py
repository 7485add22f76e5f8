"""Errors that carry their HTTP status and OpenAI error type/code; each dialect renders them."""

from __future__ import annotations


class LLMServeError(Exception):
    """Base error: an HTTP status plus OpenAI's `type`, `code` and the offending `param`."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(LLMServeError):
    """The request is malformed or asks for something impossible (400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested tokens do not fit the context (400)."""

    code = "context_length_exceeded"


class UnsupportedSamplerError(InvalidRequestError):
    """A sampler the engine cannot apply was given a non-neutral value (400)."""

    code = "unsupported_sampler"


class PayloadTooLargeError(InvalidRequestError):
    """The request body exceeds the configured limit (413)."""

    status = 413
    code = "request_too_large"


class AuthenticationError(LLMServeError):
    """No key or an unknown key (401)."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(LLMServeError):
    """A valid key without the permission the route needs (403)."""

    status = 403
    type = "permission_error"
    code = "insufficient_permissions"


class NotFoundError(LLMServeError):
    """A named resource does not exist (404)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The requested model is not served here (404)."""

    code = "model_not_found"


class ConflictError(LLMServeError):
    """The request clashes with what exists: a taken name, a record owned elsewhere (409)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class QueueFullError(LLMServeError):
    """Too many requests are already waiting (429)."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class ServiceUnavailableError(LLMServeError):
    """No model is ready, or the engine has stopped (503)."""

    status = 503
    type = "service_unavailable"
    code = "model_not_ready"


class EngineError(LLMServeError):
    """The engine failed while serving this request (500)."""

    status = 500
    type = "server_error"
    code = "engine_error"
