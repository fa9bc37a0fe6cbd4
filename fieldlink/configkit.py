"""Loading TOML configs into typed schemas, and reporting every problem at once.

Each program (gateway, cloud, simulator) declares one pydantic schema; this module
turns a file into that schema or into a list of problems, each naming the file and
the dotted key, for example::

    configs/gateway.toml: sources[0].port: must be 1..65535, got 70000

String values may reference environment variables as ``${NAME}`` or
``${NAME:-default}``; that is how secrets (tokens, passwords) stay out of files.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from fieldlink.wire import check_topic_level

T = TypeVar("T", bound=BaseModel)

__all__ = [
    "Bind",
    "ByteSize",
    "ConfigError",
    "Duration",
    "MetricsSection",
    "Port",
    "Problem",
    "Schema",
    "TopicLevel",
    "TopicPrefix",
    "check_plugin_kinds",
    "load_config",
    "parse_byte_size",
    "parse_duration",
]


class Schema(BaseModel):
    """Base for every config section: unknown keys are errors, models are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, located by its dotted key."""

    key: str
    message: str

    def render(self, path: str) -> str:
        return f"{path}: {self.key}: {self.message}" if self.key else f"{path}: {self.message}"


class ConfigError(Exception):
    """A config file could not be loaded; ``problems`` lists every reason."""

    def __init__(self, path: str, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [p.render(self.path) for p in self.problems]


# --- value types shared by all schemas -------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``1.5``, ``"250ms"``, ``"10s"``, ``"5m"``, ``"2h"`` or ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '500ms' or '10s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as '500ms' or '10s', got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


_BYTE_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$")
_UNIT_BYTES = {
    None: 1, "B": 1,
    "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
}  # fmt: skip


def parse_byte_size(value: Any) -> int:
    """Bytes from ``1048576``, ``"512kB"``, ``"64MB"``, ``"1GiB"`` (kB/MB/GB are powers of 1000)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '64MB' or '1GiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _BYTE_SIZE.match(value)):
        size = round(float(match.group(1)) * _UNIT_BYTES[match.group(2)])
    else:
        raise ValueError(f"expected a size such as '64MB' or '1GiB', got {value!r}")
    if size < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return size


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be 1..65535, got {value}")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; accepts numbers and strings with a unit (ms, s, m, h, d)."""

ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]
"""Bytes; accepts integers and strings with a unit (B, kB, MB, GB, KiB, MiB, GiB)."""

Port = Annotated[int, AfterValidator(_check_port)]

TopicLevel = Annotated[str, AfterValidator(check_topic_level)]


def _bind(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    return value


Bind = Annotated[str, AfterValidator(_bind)]
"""``HOST:PORT`` to listen on."""


class MetricsSection(BaseModel):
    """``[metrics]``: Prometheus /metrics. Off unless ``bind`` is set; keep it off public interfaces."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bind: Bind | None = None  # e.g. "127.0.0.1:9108"


def _topic_prefix(prefix: str) -> str:
    if any(c in prefix for c in "+#\0"):
        raise ValueError(f"must not contain MQTT wildcards, got {prefix!r}")
    if prefix.startswith(("/", "$")):
        raise ValueError(f"must not start with '/' or '$', got {prefix!r}")
    prefix = prefix.rstrip("/")
    return f"{prefix}/" if prefix else ""


TopicPrefix = Annotated[str, AfterValidator(_topic_prefix)]
"""Levels put in front of every topic on a shared broker (``tenant-a`` becomes ``tenant-a/``)."""
"""A name used as one MQTT topic level (site, gateway, device)."""


# --- environment interpolation ---------------------------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, key: str, env: dict[str, str], problems: list[Problem]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(key, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{key}[{i}]", env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if default is not None:
            return value or default  # like the shell: ${VAR:-x} also covers a set but empty VAR
        if value is not None:
            return value
        problems.append(Problem(key, f"environment variable {name} is not set"))
        return ""

    return _ENV_REF.sub(substitute, node)


# Secrets may come from files (systemd credentials, Docker/Kubernetes secrets):
# ``password_file = "/run/credentials/fieldlink-gateway.service/uplink"`` sets ``password``.
SECRET_FILE_KEYS = {
    "password_file": "password",
    "token_file": "token",
    # The notifiers' secrets (cloud/notify/sms.py, webhook.py).
    "auth_token_file": "auth_token",
    "bearer_token_file": "bearer_token",
}


def _secret_files(node: Any, key: str, problems: list[Problem]) -> Any:
    """Replace ``password_file``/``token_file`` by ``password``/``token`` read from the file."""
    if isinstance(node, list):
        return [_secret_files(v, f"{key}[{i}]", problems) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out = {k: _secret_files(v, _join(key, k), problems) for k, v in node.items() if k not in SECRET_FILE_KEYS}
    for file_key, secret_key in SECRET_FILE_KEYS.items():
        if file_key not in node:
            continue
        where = _join(key, file_key)
        if secret_key in node:
            problems.append(Problem(where, f"set {secret_key} or {file_key}, not both"))
            continue
        path = node[file_key]
        if not isinstance(path, str) or not path:
            problems.append(Problem(where, f"must be a file path, got {path!r}"))
            continue
        try:
            # One trailing newline is what editors and `echo` leave; the secret is the rest.
            out[secret_key] = Path(path).read_text().removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            problems.append(Problem(where, f"cannot read {path}: {exc.strerror or exc}"))
    return out


def _join(prefix: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{prefix}[{name}]"
    return f"{prefix}.{name}" if prefix else str(name)


# --- pydantic errors -> problems -------------------------------------------------------

_TYPE_NAMES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def _location(loc: tuple[str | int, ...], tags: frozenset[str]) -> str:
    key = ""
    for i, part in enumerate(loc):
        # Tagged unions add the tag ("modbus_tcp") to the location; the user never wrote it.
        if isinstance(part, str) and part in tags and 0 < i < len(loc) - 1:
            continue
        key = _join(key, part)
    return key


def _message(error: dict[str, Any]) -> str:
    kind = error["type"]
    given = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {given!r}"
    if kind in {"literal_error", "enum"}:
        return f"must be one of {ctx.get('expected')}, got {given!r}"
    if kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        bound = next(iter(ctx.values()))
        word = {
            "greater_than_equal": ">=",
            "greater_than": ">",
            "less_than_equal": "<=",
            "less_than": "<",
        }[kind]
        return f"must be {word} {bound}, got {given!r}"
    if kind in {"too_short", "too_long"}:
        return error["msg"].replace("List", "list").replace("Value", "value")
    if kind == "union_tag_invalid":
        return f"unknown kind {ctx.get('tag')!r}; known kinds: {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"required key {ctx.get('discriminator', 'kind')} is missing"
    return str(error["msg"])


def problems_from_validation(error: ValidationError, tags: frozenset[str] = frozenset()) -> list[Problem]:
    return [Problem(_location(tuple(e["loc"]), tags), _message(dict(e))) for e in error.errors(include_url=False)]


# --- the loader ------------------------------------------------------------------------


def load_config(
    path: str | Path,
    schema: type[T],
    *,
    env: dict[str, str] | None = None,
    union_tags: frozenset[str] = frozenset(),
    prechecks: Callable[[dict[str, Any]], list[Problem]] | None = None,
    checks: Callable[[T], list[Problem]] | None = None,
) -> T:
    """Read, interpolate and validate one TOML file; raise ConfigError listing every problem.

    ``prechecks`` sees the raw tables first (an unknown plugin kind); the schema's own
    complaints about an entry a precheck already reported are dropped, so that one
    mistake gives one message, not ten.
    ``checks`` runs after the schema accepted the file, for rules that span keys
    (unique names, references between sections); it returns problems instead of raising.
    """
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(shown, [Problem("", f"cannot read file: {exc.strerror}")]) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(shown, [Problem("", f"not valid TOML: {exc}")]) from exc

    problems: list[Problem] = []
    data = _interpolate(raw, "", dict(os.environ) if env is None else env, problems)
    data = _secret_files(data, "", problems)
    early = prechecks(data) if prechecks is not None else []
    problems.extend(early)
    reported = [p.key.rsplit(".", 1)[0] for p in early]
    try:
        config = schema.model_validate(data)
    except ValidationError as exc:
        problems.extend(
            p
            for p in problems_from_validation(exc, union_tags)
            if not any(_under(p.key, prefix) for prefix in reported)
        )
        raise ConfigError(shown, problems) from None
    if checks is not None and not problems:
        problems.extend(checks(config))
    if problems:
        raise ConfigError(shown, problems)
    return config


def check_plugin_kinds(data: dict[str, Any], section: str, known: Sequence[str], noun: str) -> list[Problem]:
    """Problems for entries of ``data[section]`` whose ``kind`` is not a registered plugin."""
    entries = data.get(section)
    if not isinstance(entries, list):
        return []
    problems: list[Problem] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("kind") in known:
            continue
        kind = entry.get("kind")
        message = (
            f"required key is missing (one of: {', '.join(known)})"
            if kind is None
            else f"unknown {noun} kind {kind!r} (known: {', '.join(known)})"
        )
        problems.append(Problem(f"{section}[{i}].kind", message))
    return problems


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((f"{prefix}.", f"{prefix}["))
