"""marshmallow schemas for every API input and output; validators for hosts, users and labels."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from evc.choices import SCOPES
from evc.inventory_import import FORMATS
from evc.model import JOB_STATES, JobKindName

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
POSIX_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
LABEL_KEY_RE = re.compile(r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
HOST_KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]{16,2048}$")


def _check_host(value: str) -> None:
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    if not HOSTNAME_RE.match(value) or value.replace(".", "").isdigit():
        raise ValidationError("must be a host name (RFC 1123) or an IP address")


# validators that are also documented: the OpenAPI schema carries their pattern and length;
#: a host name (RFC 1123) or an IP address, documented as a string of at most 253 characters
validate_host: list[Callable[[Any], Any]] = [validate.Length(min=1, max=253), _check_host]
#: what `validate_host` admits, as JSON Schema (a field's ``metadata={"openapi": HOST_OPENAPI}``)
HOST_OPENAPI = {
    "anyOf": [
        {"format": "ipv4"},
        {"format": "ipv6"},
        {"pattern": "^(?![0-9.]+$)" + HOSTNAME_RE.pattern[1:]},
    ]
}
#: a ``key=value`` label filter (query parameters), as JSON Schema
LABEL_FILTER_OPENAPI = {"pattern": "^[^=]+="}
#: what `validate_labels` admits, as JSON Schema
LABELS_OPENAPI = {
    "maxProperties": 64,
    "propertyNames": {"pattern": LABEL_KEY_RE.pattern},
    "additionalProperties": {"type": "string", "pattern": LABEL_VALUE_RE.pattern},
}


def one_of(*names: str) -> dict[str, Any]:
    """A schema's ``openapi_extra`` for "give exactly one of *names*"."""
    return {"oneOf": [{"required": [n], "properties": {n: {"not": {"type": "null"}}}} for n in names]}


#: a schema's ``openapi_extra`` for "give at least one field"
NOT_EMPTY = {"minProperties": 1}


def Host(**kw: Any) -> fields.String:  # noqa: N802 - a field factory reads like a field
    """A host name (RFC 1123) or an IP address, documented as such."""
    return fields.String(validate=validate_host, metadata={"openapi": HOST_OPENAPI}, **kw)


validate_name = validate.Regexp(
    NAME_RE, error="1-63 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
)
validate_user = validate.Regexp(
    POSIX_USER_RE, error="must be a POSIX user name: lower-case letters, digits, '_', '-', '.', at most 32"
)


def validate_labels(value: dict[str, str]) -> None:
    if len(value) > 64:
        raise ValidationError("at most 64 labels")
    for k, v in value.items():
        if not LABEL_KEY_RE.match(k):
            raise ValidationError(f"label key {k!r} is invalid (letters, digits, '.', '_', '-', optional prefix/)")
        if not isinstance(v, str) or not LABEL_VALUE_RE.match(v):
            raise ValidationError(f"label value for {k!r} is invalid (at most 63 letters, digits, '.', '_', '-')")


def Labels(**kw: Any) -> fields.Dict:  # noqa: N802 - a field factory reads like a field
    return fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        validate=validate_labels,
        metadata={"openapi": LABELS_OPENAPI},
        **kw,
    )


class StrictSchema(Schema):
    """Unknown fields are an error (the default), kept explicit for readers."""


# ----------------------------------------------------------------------------- paging
class PageArgs(StrictSchema):
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=10_000_000))
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))


class PageSchema(Schema):
    total = fields.Integer()
    offset = fields.Integer()
    limit = fields.Integer()
    next_offset = fields.Integer(allow_none=True)


def page(items: list[Any], total: int, args: dict[str, Any]) -> dict[str, Any]:
    nxt = args["offset"] + len(items)
    return {
        "items": items, "total": total, "offset": args["offset"], "limit": args["limit"],
        "next_offset": nxt if nxt < total else None,
    }  # fmt: skip


# ----------------------------------------------------------------------------- errors
class ErrorSchema(Schema):
    """Every error answer: HTTP code and phrase, a message a person can act on, and for input
    errors the per-field messages; EVC errors add their code, details and reason."""

    code = fields.Integer(metadata={"description": "HTTP status code"})
    status = fields.String(metadata={"description": "HTTP status phrase"})
    message = fields.String(metadata={"description": "what went wrong, in words a person can act on"})
    errors = fields.Dict(metadata={"description": "per-location, per-field messages (422)"})
    error = fields.String(metadata={"description": "EVC's error code"})
    details = fields.Dict()
    reason = fields.String(metadata={"description": "device failures: unreachable, auth_refused, ..."})


# ----------------------------------------------------------------------------- ssh key
class SSHKeySchema(Schema):
    public_key = fields.String(metadata={"description": "EVC's public key, authorized_keys format"})
    install_command = fields.String(metadata={"description": "run this on the device as the account EVC will use"})
    fingerprint = fields.String()


class SSHKeyArgs(StrictSchema):
    format = fields.String(load_default="json", validate=validate.OneOf(["json", "text", "sh"]))


# ----------------------------------------------------------------------------- jobs
class RecordSchema(Schema):
    """A schema of pass-through fields over a record the store keeps as plain JSON values: the
    dump of one record (a dict) is its projection onto the fields, which is what marshmallow's
    dump gives for such fields, without its per-field cost (see :class:`Projected`)."""

    def dump(self, obj: Any, *, many: bool | None = None) -> Any:
        if type(obj) is dict and not (self.many if many is None else many):
            return {name: obj[name] for name in self.dump_fields if name in obj}
        return super().dump(obj, many=many)


class JobSchema(RecordSchema):
    id = fields.String()
    kind = fields.String()
    state = fields.String(
        metadata={"description": "queued, running, succeeded, partial (some targets fell short), failed or cancelled"}
    )
    progress = fields.Dict()
    targets = fields.List(fields.String())
    params = fields.Dict()
    summary = fields.Dict()
    results = fields.Dict(metadata={"description": "per-target results"})
    error = fields.Dict(allow_none=True)
    created_by = fields.String()
    created_at = fields.Float()
    started_at = fields.Float(allow_none=True)
    finished_at = fields.Float(allow_none=True)
    cancel_requested = fields.Boolean()
    attempt = fields.Integer(metadata={"description": "executions started so far (each a new fencing number)"})
    lost = fields.Integer(metadata={"description": "how often the worker running it was lost"})
    retry_of = fields.String(allow_none=True)


class Projected(fields.List):
    """A list of records the store keeps as plain JSON values, dumped by projecting each record
    onto *schema*'s fields (what marshmallow's dump of those pass-through fields gives, without
    its per-field cost: a page of 200 jobs in well under a millisecond); documented as
    ``List(Nested(schema))``."""

    def __init__(self, schema: type[Schema], **kwargs: Any) -> None:
        super().__init__(fields.Nested(schema), **kwargs)
        self.names = tuple(schema._declared_fields)

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> Any:
        if value is None:
            return None
        return [{n: rec[n] for n in self.names if n in rec} for rec in value]


class JobPageSchema(PageSchema):
    items = Projected(JobSchema)


class JobListArgs(PageArgs):
    kind = fields.String(validate=validate.Length(max=32))
    state = fields.String(validate=validate.OneOf(JOB_STATES))
    target = fields.String(validate=validate.Length(max=64))


class NoopParamsSchema(StrictSchema):
    sleep_s = fields.Float(load_default=0.0, validate=validate.Range(min=0, max=60))


class JobCreateSchema(StrictSchema):
    kind = fields.String(required=True, validate=validate.OneOf([JobKindName.NOOP.value]))
    params = fields.Nested(NoopParamsSchema, load_default=dict)

    def load(self, data: Any, **kwargs: Any) -> Any:
        """A plain valid body (``{"kind": "noop"}``, a ``sleep_s`` in range) loads as the fields
        above would load it, without their cost (the API's busiest input); anything else,
        every invalid body included, is loaded by the fields: the same errors, word for word."""
        if not kwargs and type(data) is dict:
            loaded = _plain_noop(data)
            if loaded is not None:
                return loaded
        return super().load(data, **kwargs)


def _plain_noop(data: dict[str, Any]) -> dict[str, Any] | None:
    """What :class:`JobCreateSchema` loads from *data* when it is a plain valid body, else None."""
    if (
        data.get("kind") != JobKindName.NOOP.value
        or type(data["kind"]) is not str
        or not data.keys() <= {"kind", "params"}
    ):
        return None
    if "params" not in data:
        return {"kind": JobKindName.NOOP.value, "params": {}}
    params = data["params"]
    if type(params) is not dict or not params.keys() <= {"sleep_s"}:
        return None
    sleep = params.get("sleep_s", 0.0)
    if type(sleep) not in (int, float) or not 0 <= sleep <= 60:
        return None
    return {"kind": JobKindName.NOOP.value, "params": {"sleep_s": float(sleep)}}


class EventArgs(StrictSchema):
    after = fields.Integer(load_default=0, validate=validate.Range(min=0, max=10_000_000))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


class EventSchema(Schema):
    class Meta:
        unknown = "include"

    seq = fields.Integer()
    ts = fields.Float()
    type = fields.String()
    message = fields.String()


class EventPageSchema(Schema):
    items = fields.List(fields.Dict())
    next_after = fields.Integer()
    state = fields.String()


# ----------------------------------------------------------------------------- devices
class JumpHostSchema(StrictSchema):
    host = Host(required=True)
    port = fields.Integer(load_default=22, validate=validate.Range(min=1, max=65535))
    username = fields.String(required=True, validate=validate_user)
    host_key = fields.String(validate=validate.Regexp(HOST_KEY_RE), allow_none=True)


class DeviceCreateSchema(StrictSchema):
    name = fields.String(required=True, validate=validate_name)
    host = Host(required=True)
    port = fields.Integer(load_default=22, validate=validate.Range(min=1, max=65535))
    username = fields.String(required=True, validate=validate_user)
    labels = Labels(load_default=dict)
    jump_host = fields.Nested(JumpHostSchema, load_default=None, allow_none=True)


class DeviceImportSchema(StrictSchema):
    content = fields.String(
        required=True,
        validate=validate.Length(min=1, max=512 * 1024),
        metadata={"description": "the inventory file's text: Ansible INI or YAML inventory, or CSV"},
    )
    format = fields.String(
        load_default=None, allow_none=True, validate=validate.OneOf(FORMATS),
        metadata={"description": "default: detected (csv by file name; yaml for a YAML mapping; else ini)"},
    )  # fmt: skip
    filename = fields.String(load_default="", validate=validate.Length(max=255))
    default_user = fields.String(load_default=None, allow_none=True, validate=validate_user)
    dry_run = fields.Boolean(load_default=False, metadata={"description": "say what would change; change nothing"})


class DeviceImportResultSchema(Schema):
    dry_run = fields.Boolean()
    devices = fields.List(
        fields.Dict(),
        metadata={"description": "per device: name, action (create, update, register, unchanged, invalid), "
                                 "device_id, changes ({field: [old, new]}), reason"},
    )  # fmt: skip
    job = fields.Nested(JobSchema, allow_none=True)
    tokens = fields.Dict(metadata={"description": "the new devices' own tokens by name (shown once)"})


class ConnectionSchema(StrictSchema):
    """New connection details of a device; what is left out stays as it is."""

    openapi_extra = NOT_EMPTY

    host = Host()
    port = fields.Integer(validate=validate.Range(min=1, max=65535))
    username = fields.String(validate=validate_user)
    host_key = fields.String(
        validate=validate.Regexp(HOST_KEY_RE),
        allow_none=True,
        metadata={"description": "pin this key (null or left out with a new address: the key presented)"},
    )
    jump_host = fields.Nested(JumpHostSchema, allow_none=True, metadata={"description": "null: connect directly"})

    @validates_schema
    def not_empty(self, data: dict[str, Any], **kw: Any) -> None:
        if not data:
            raise ValidationError("nothing to change: give host, port, username, host_key and/or jump_host")


class DeviceUpdateSchema(StrictSchema):
    openapi_extra = NOT_EMPTY

    name = fields.String(validate=validate_name)
    labels = Labels()
    connection = fields.Nested(
        ConnectionSchema,
        metadata={"description": "new connection details: applied by a re-verification job when the device answers"},
    )

    @validates_schema
    def not_empty(self, data: dict[str, Any], **kw: Any) -> None:
        if not data:
            raise ValidationError("nothing to change: give name, labels and/or connection")


class DeviceSchema(Schema):
    id = fields.String()
    name = fields.String()
    host = fields.String()
    port = fields.Integer()
    username = fields.String()
    labels = fields.Dict()
    jump_host = fields.Dict(allow_none=True)
    state = fields.String()
    host_key = fields.String(allow_none=True)
    privilege = fields.String(allow_none=True)
    capabilities = fields.List(fields.String())
    facts = fields.Dict()
    level = fields.Integer(metadata={"description": "function level reached: 0 connected .. 4 application"})
    level_detail = fields.Dict(allow_none=True, metadata={"description": "why not higher"})
    cluster_id = fields.String(allow_none=True)
    health = fields.Dict(allow_none=True)
    exporter = fields.Dict(allow_none=True, metadata={"description": "the installed exporter (monitored devices)"})
    fl_client = fields.Dict(allow_none=True, metadata={"description": "the installed federated-learning client"})
    error = fields.Dict(allow_none=True)
    created_at = fields.Float()
    registered_at = fields.Float(allow_none=True)
    last_seen = fields.Float(allow_none=True)


class DeviceUpdatedSchema(DeviceSchema):
    job = fields.Nested(JobSchema, metadata={"description": "the re-verification job of new connection details"})


class DevicePageSchema(PageSchema):
    items = fields.List(fields.Nested(DeviceSchema))


class DeviceListArgs(PageArgs):
    state = fields.String(validate=validate.Length(max=32))
    label = fields.List(
        fields.String(validate=validate.Length(max=320), metadata={"openapi": LABEL_FILTER_OPENAPI}),
        metadata={"description": "key=value, repeatable"},
    )
    cluster = fields.String(validate=validate.Length(max=64))
    name = fields.String(validate=validate.Length(max=63), metadata={"description": "name prefix"})


class DeviceCreatedSchema(Schema):
    device = fields.Nested(DeviceSchema)
    job = fields.Nested(JobSchema)
    token = fields.String(metadata={"description": "the device's own token, shown once"})


class HostKeySchema(StrictSchema):
    host_key = fields.String(validate=validate.Regexp(HOST_KEY_RE), load_default=None, allow_none=True)
    jump_host_key = fields.String(
        validate=validate.Regexp(HOST_KEY_RE),
        allow_none=True,
        metadata={"description": "re-pin the jump host too: to this key, or (null) to the key it presents now"},
    )


class HeartbeatSchema(StrictSchema):
    load1 = fields.Float(validate=validate.Range(min=0, max=10_000))
    mem_used_ratio = fields.Float(validate=validate.Range(min=0, max=1))
    disk_used_ratio = fields.Float(validate=validate.Range(min=0, max=1))
    temperature_c = fields.Float(validate=validate.Range(min=-100, max=200))
    uptime_s = fields.Float(validate=validate.Range(min=0))


# ----------------------------------------------------------------------------- tokens
class TokenCreateSchema(StrictSchema):
    name = fields.String(required=True, validate=validate_name)
    scopes = fields.List(
        fields.String(validate=validate.OneOf(SCOPES)), required=True, validate=validate.Length(min=1, max=len(SCOPES))
    )
    expires_in_s = fields.Integer(validate=validate.Range(min=60, max=10 * 365 * 86400), load_default=None)


class TokenSchema(Schema):
    id = fields.String()
    name = fields.String()
    scopes = fields.List(fields.String())
    created_at = fields.Float()
    created_by = fields.String()
    revoked = fields.Boolean()
    expires_at = fields.Float(allow_none=True)
    prefix = fields.String()
    token = fields.String(metadata={"description": "only in the response that creates it"})


class TokenPageSchema(PageSchema):
    items = fields.List(fields.Nested(TokenSchema))


_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: what `validate_cidr` admits, as JSON Schema (an address, or an IPv4 network with its prefix)
CIDR_OPENAPI = {
    "anyOf": [
        {"format": "ipv4"},
        {"format": "ipv6"},
        {"pattern": rf"^({_OCTET}\.){{3}}{_OCTET}/(3[0-2]|[12]?[0-9])$"},
    ]
}


def validate_cidr(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValidationError("must be an IP network in CIDR notation, e.g. 10.20.0.0/16") from exc


class EnrollmentCreateSchema(StrictSchema):
    ttl_s = fields.Integer(validate=validate.Range(min=60, max=30 * 86400), load_default=None)
    max_uses = fields.Integer(validate=validate.Range(min=1, max=100_000), load_default=None)
    labels = Labels(load_default=dict)
    allow_networks = fields.List(
        fields.String(validate=[validate.Length(min=2, max=49), validate_cidr], metadata={"openapi": CIDR_OPENAPI}),
        load_default=list,
        validate=validate.Length(max=32),
        metadata={
            "description": "CIDRs devices registered with this token must be in (host and jump host). "
            "Empty: any address except loopback, link-local and this controller; those need a network "
            "inside their range listed here (e.g. 127.0.0.0/8)"
        },
    )


class EnrollmentSchema(Schema):
    id = fields.String()
    created_at = fields.Float()
    expires_at = fields.Float()
    uses_left = fields.Integer()
    max_uses = fields.Integer()
    labels = fields.Dict()
    allow_networks = fields.List(fields.String())
    revoked = fields.Boolean()
    prefix = fields.String()
    token = fields.String(metadata={"description": "only in the response that creates it"})


class EnrollmentPageSchema(PageSchema):
    items = fields.List(fields.Nested(EnrollmentSchema))


class AuditPageSchema(PageSchema):
    items = fields.List(fields.Dict())
