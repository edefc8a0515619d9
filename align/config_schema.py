"""The config machinery shared by every command (runs, SFT, reward-model training, the reward service, the
diversity eval): dataclass sections whose field types are checked and converted on construction, with dotted
key paths and close-match suggestions in one-line `ConfigError`s; YAML / JSON files; dotted `key=value` overrides.

The run configs themselves (PPOConfig, GRPOConfig and their sections) are in `align.config`.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from align.errors import ConfigError
from align.key_names import peer_hint
from align.tools.registry import suggest

# ----------------------------------------------------------------------------------------------------
# Generic machinery: type checking / conversion of dataclass fields, with dotted key paths in errors.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = suggest(str(value), [str(a) for a in allowed])
        raise ConfigError(f"{key} = {value!r} is not allowed{close} (allowed: {', '.join(repr(a) for a in allowed)})")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key} = {value!r} must be {_type_name(tp)}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} must be a {_type_name(tp)} (write it as [a, b, ...])")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} must be a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (a mapping of {tp.__name__} fields), got {value!r}")
        return build(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} = {value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r} must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        # a Dataset's repr is many lines: name the type (and, for data.path, where an object goes)
        shown = repr(value) if len(repr(value)) <= 80 and "\n" not in repr(value) else f"<{type(value).__name__}>"
        is_dataset = type(value).__module__.startswith("datasets.")
        hint = "; pass a dataset object as align.train(config, dataset=...)" if is_dataset else ""
        raise ConfigError(f"{key} = {shown} must be a string{hint}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key} = {value!r} must be {_type_name(tp)}")
    return value


_KEY_ERRORS = ("unknown config key '", "config key '")  # messages that quote a dotted key path


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Construct dataclass `cls` from a mapping, rejecting unknown keys with a close-match suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__} must be a mapping, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    removed: dict[str, str] = getattr(cls, "removed_keys", {})
    for key in data:
        if key in removed and key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"config key {where!r} was removed: {removed[key]}")
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            # a TRL / OpenRLHF / verl name first (a typo of ours is the closest match only when it is not one)
            close = peer_hint(where, data[key], names, prefix) or suggest(str(key), names)
            if close and prefix and "`" not in close:
                close = close.replace("'", f"'{prefix}.", 1)
            raise ConfigError(f"unknown config key {where!r}{close} (valid keys here: {', '.join(names)})")
    try:
        obj = cls(**data)
    except ConfigError as err:
        text = str(err)
        if prefix and text.startswith(_KEY_ERRORS):  # a nested section's key: prefix the quoted key paths
            raise ConfigError(text.replace(" '", f" '{prefix}.")) from None
        if prefix and not text.startswith(prefix):
            raise ConfigError(f"{prefix}.{err}") from None
        raise
    return obj


class Section:
    """Base for config sections: converts and checks field types, then runs `validate()`.

    `removed_keys` {old key: the fix} names keys that no longer exist and what replaces them."""

    removed_keys: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _convert(value, hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Value checks; raise ConfigError via `self.check`."""

    def check(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key} = {getattr(self, key)!r}: {message}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if callable(obj) and not isinstance(obj, (str, int, float, bool)):
        return f"<callable {getattr(obj, '__qualname__', type(obj).__name__)}>"
    return obj


# ----------------------------------------------------------------------------------------------------
# Files and overrides


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=1e-5)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for text in overrides or []:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data
