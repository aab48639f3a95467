"""EVC's one exception tree: every error a user can see derives from :class:`EVCError`."""

from __future__ import annotations

from typing import Any


class EVCError(Exception):
    """Base of all EVC errors. ``status`` maps to HTTP, ``retryable`` to Celery retry policy."""

    status = 500
    code = "internal"
    retryable = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class ConfigError(EVCError):
    code = "config"


class ValidationError(EVCError):
    status = 422
    code = "invalid"


class NotFound(EVCError):
    status = 404
    code = "not_found"


class Conflict(EVCError):
    status = 409
    code = "conflict"


class AuthError(EVCError):
    status = 401
    code = "unauthorized"


class Forbidden(EVCError):
    status = 403
    code = "forbidden"


class RateLimited(EVCError):
    status = 429
    code = "rate_limited"


class PreconditionFailed(EVCError):
    """An operation is refused up front: level, privilege or state too low."""

    status = 409
    code = "precondition"


class StoreUnavailable(EVCError):
    status = 503
    code = "store_unavailable"
    retryable = True


class JobCancelled(EVCError):
    code = "cancelled"


class LevelNotReached(EVCError):
    """A level job in which no device reached its target; ``details["stopped"]`` says why,
    per device."""

    code = "level_not_reached"


class ComponentDied(EVCError):
    """A process of the local stack (`evc up`) ended while the stack was running."""

    code = "component_died"


class StaleAttempt(EVCError):
    """This execution of a job is no longer its current attempt (its lease expired and another
    took over): its writes are refused and it stops quietly at its next check point."""

    status = 409
    code = "stale_attempt"


# --- device / SSH errors: each carries a reason a person can act on -------------------------


class DeviceError(EVCError):
    """Something went wrong talking to a device. ``reason`` is a stable machine-readable code."""

    code = "device"
    reason = "error"

    def __init__(self, message: str, *, device_id: str | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.device_id = device_id

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["reason"] = self.reason
        if self.device_id:
            out["device_id"] = self.device_id
        return out


class Unreachable(DeviceError):
    reason = "unreachable"
    retryable = True


class SSHTimeout(DeviceError):
    reason = "timeout"
    retryable = True


class AuthRefused(DeviceError):
    reason = "auth_refused"


class HostKeyMismatch(DeviceError):
    reason = "host_key_mismatch"


class JumpHostKeyMismatch(HostKeyMismatch):
    """The jump host a device is reached through presented a key other than the pinned one
    (or has none pinned where one is required)."""

    reason = "jump_host_key_mismatch"


class ConnectionDropped(DeviceError):
    reason = "connection_dropped"
    retryable = True


class CommandFailed(DeviceError):
    reason = "command_failed"

    def __init__(self, message: str, *, exit_status: int | None = None, stderr: str = "", **kw: Any) -> None:
        super().__init__(message, exit_status=exit_status, stderr=stderr[-2000:], **kw)
        self.exit_status = exit_status
        self.stderr = stderr


class DeviceOffline(DeviceError):
    reason = "offline"
    status = 409


class InferFailed(DeviceError):
    """An edge server's inference request failed: unreachable, timed out, or not a 200."""

    reason = "infer_failed"
    status = 502


class BatchFailed(EVCError):
    """Some targets of a batch job failed; each one's reason is its per-target result."""

    code = "batch_failed"


#: errors a Celery task may retry with backoff; everything else fails the job at once
TRANSIENT_ERRORS: tuple[type[EVCError], ...] = (Unreachable, SSHTimeout, ConnectionDropped, StoreUnavailable)
