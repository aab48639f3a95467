"""Playbook parameters: a small JSON-Schema subset validator, defaults, and the reserved names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from evc.errors import ValidationError

JSON = dict[str, Any]

#: variable names a caller may never set: connection settings, Ansible's magic variables and
#: EVC's own inventory variables (an ``ansible_ssh_common_args`` from a request would run a
#: ProxyCommand on the worker)
RESERVED_PREFIXES = ("ansible_", "evc_", "role_", "playbook_", "inventory_")
RESERVED_NAMES = frozenset(
    {
        "hostvars", "groups", "group_names", "omit", "environment", "vars", "play_hosts",
        "lookup", "query", "q", "item", "ansible_loop_var",
    }
)  # fmt: skip
VAR_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
#: template markers: a value must reach a playbook as data, never as Jinja to evaluate
_TEMPLATE = re.compile(r"\{\{|\{%|\{#")

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
}

#: keywords this validator understands; a schema using others is refused when it is loaded
KEYWORDS = frozenset(
    {
        "type", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems",
        "maxItems", "items", "properties", "required", "additionalProperties", "default",
        "description", "title", "format", "secret", "examples", "uniqueItems",
    }
)  # fmt: skip

#: the schema of a playbook that ships without metadata: any variables with safe names
OPEN_SCHEMA: JSON = {"type": "object", "additionalProperties": True}


def check_schema(schema: Mapping[str, Any], where: str = "params") -> None:
    """Refuse a schema with keywords or types this validator does not implement."""
    unknown = set(schema) - KEYWORDS
    if unknown:
        raise ValueError(f"{where}: unsupported schema keywords {sorted(unknown)}")
    typ = schema.get("type")
    if typ is not None and typ not in _TYPES:
        raise ValueError(f"{where}: unsupported type {typ!r}")
    if "pattern" in schema:
        re.compile(str(schema["pattern"]))
    for name, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{where}.{name}")
    if isinstance(schema.get("items"), Mapping):
        check_schema(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        check_schema(schema["additionalProperties"], f"{where}.*")


def _is_type(value: Any, typ: str) -> bool:
    if typ in ("integer", "number") and isinstance(value, bool):
        return False
    if typ == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[typ])


def errors(schema: Mapping[str, Any], value: Any, path: str = "") -> dict[str, str]:
    """Every way *value* breaks *schema*, keyed by a dotted path (empty: none)."""
    out: dict[str, str] = {}
    here = path or "extra_vars"
    typ = schema.get("type")
    if typ and not _is_type(value, typ):
        out[here] = f"must be of type {typ}"
        return out
    if "enum" in schema and value not in schema["enum"]:
        out[here] = f"must be one of {list(schema['enum'])}"
    if isinstance(value, str):
        if _TEMPLATE.search(value):
            out[here] = "must not contain template markers ({{, {% or {#)"
        if "pattern" in schema and not re.search(str(schema["pattern"]), value):
            out[here] = f"does not match {schema['pattern']}"
        if len(value) < int(schema.get("minLength", 0)):
            out[here] = f"must be at least {schema['minLength']} characters"
        if "maxLength" in schema and len(value) > int(schema["maxLength"]):
            out[here] = f"must be at most {schema['maxLength']} characters"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out[here] = f"must be >= {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            out[here] = f"must be <= {schema['maximum']}"
    if isinstance(value, list | tuple):
        if len(value) < int(schema.get("minItems", 0)):
            out[here] = f"must have at least {schema['minItems']} items"
        if "maxItems" in schema and len(value) > int(schema["maxItems"]):
            out[here] = f"must have at most {schema['maxItems']} items"
        if schema.get("uniqueItems") and len({repr(v) for v in value}) != len(value):
            out[here] = "items must be unique"
        item_schema = schema.get("items") or {}
        for i, item in enumerate(value):
            out.update(errors(item_schema, item, f"{here}[{i}]"))
    if isinstance(value, dict):
        out.update(_object_errors(schema, value, here, top=not path))
    return out


def _object_errors(schema: Mapping[str, Any], value: dict[Any, Any], here: str, top: bool) -> JSON:
    out: dict[str, str] = {}
    props: Mapping[str, Any] = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in value:
            out[f"{here}.{name}"] = "is required"
    extra = schema.get("additionalProperties", not props)
    for key, item in value.items():
        where = f"{here}.{key}"
        if not isinstance(key, str):
            out[where] = "keys must be strings"
            continue
        if top and (not VAR_NAME.match(key) or is_reserved(key)):
            out[where] = "is not an allowed variable name (reserved or not [a-z_][a-z0-9_]*)"
            continue
        if key in props:
            out.update(errors(props[key], item, where))
        elif extra is False:
            out[where] = "is not a parameter of this playbook"
        elif isinstance(extra, Mapping):
            out.update(errors(extra, item, where))
        else:
            out.update(errors({}, item, where))
    return out


def is_reserved(name: str) -> bool:
    return name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES)


def with_defaults(schema: Mapping[str, Any], values: Mapping[str, Any]) -> JSON:
    """*values* plus the top-level defaults of *schema* for what is missing."""
    out = dict(values)
    for name, sub in (schema.get("properties") or {}).items():
        if name not in out and "default" in sub:
            out[name] = sub["default"]
    return out


def validate(schema: Mapping[str, Any], values: Mapping[str, Any] | None, playbook: str) -> JSON:
    """Check *values* against *schema*; return them with defaults filled, or raise a 422."""
    values = dict(values or {})
    errs = errors(schema, values)
    if errs:
        raise ValidationError(f"invalid extra_vars for playbook {playbook!r}", playbook=playbook, errors=errs)
    return with_defaults(schema, values)


def secret_names(schema: Mapping[str, Any]) -> list[str]:
    """Top-level parameters the schema marks ``secret: true`` (never echoed in events)."""
    return [n for n, s in (schema.get("properties") or {}).items() if s.get("secret")]
