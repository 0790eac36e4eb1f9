"""Settings declared once: a dataclass field carries its default, its help text and, where the command line needs
more than its name, its flag. The same declaration builds the config from a nested mapping (a YAML file, keyword
arguments) with one-line errors, turns it back into a plain mapping, and generates the command line
(``foldgpt.cli.schema``)::

    @dataclass(frozen=True)
    class GateConfig:
        steps: int = setting(80, help="optimiser steps")
        loss: Literal["kl", "lm"] = setting("kl", help="kl: KL(dense || gated) on logits; lm: next-token loss")

Choices are ``Literal[...]`` types; ranges stay in each dataclass's ``__post_init__``. A field whose type is itself a
config is a *section* (``section(...)``): ``CompressConfig.heal`` is a ``HealConfig`` whose settings carry the prefix
``heal-``, so that ``HealConfig.steps`` is ``--heal-steps`` on the command line and ``heal_steps`` as a flat keyword.
Torch-free, like every config module, so that ``foldgpt --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass
from typing import Any, Literal

from foldgpt.errors import FoldGPTError


@dataclass(frozen=True)
class Section:
    """How a config nested in another is presented: its flag prefix, its help group, and which of its settings the
    outer config leaves out (``exclude``), renames (``flags``) or shows with another default text (``shown``)."""

    prefix: str = ""
    title: str | None = None
    exclude: tuple[str, ...] = ()
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    shown: Mapping[str, str] = dataclasses.field(default_factory=dict)


def setting(default: Any = MISSING, *, help: str, default_factory: Callable[[], Any] | Any = MISSING,
            flag: str | None = None, metavar: str | None = None, exclusive: str | None = None, internal: bool = False,
            none_means: str | None = None, positional: bool = False) -> Any:
    """A dataclass field declared once, with what the command line and the docs need.

    ``help`` may name a sibling setting as ``{name}``; it is shown as that setting's flag (``--heal-steps`` in
    ``compress``, ``--steps`` in ``heal``). ``flag``: the flag when it is not the field's name (``"lambda"`` gives
    ``--gate-lambda`` under the prefix ``gate-``; a leading ``--`` ignores the prefix). ``exclusive``: settings with the
    same tag are mutually exclusive on the command line, and giving one of them in a later layer (YAML, then the
    command line) resets the others. ``internal``: set by the code, never by the user (not a flag, not a YAML key).
    ``none_means``: how the docs show a ``None`` default. ``positional``: an optional positional argument (``MODEL``).
    """
    metadata = {"help": help, "flag": flag, "metavar": metavar, "exclusive": exclusive, "internal": internal,
                "none_means": none_means, "positional": positional}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(factory: Callable[[], Any], *, help: str, prefix: str = "", title: str | None = None,
            exclude: Sequence[str] = (), flags: Mapping[str, str] | None = None, shown: Mapping[str, str] | None = None) -> Any:
    """A field holding a whole config (``factory()`` is its default), presented as described by ``Section``."""
    where = Section(prefix, title, tuple(exclude), dict(flags or {}), dict(shown or {}))
    return dataclasses.field(default_factory=factory, metadata={"help": help, "section": where})


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config class (its module's ``from __future__ import annotations`` strings)."""
    return typing.get_type_hints(cls)


def section_of(field: Field) -> Section | None:
    return field.metadata.get("section")


def user_fields(cls: type, exclude: Sequence[str] = ()) -> list[Field]:
    """The fields of ``cls`` a user may set, in declaration order (internal and excluded ones left out)."""
    return [field for field in dataclasses.fields(cls) if not field.metadata.get("internal") and field.name not in exclude]


def default_of(field: Field) -> Any:
    return field.default_factory() if field.default_factory is not MISSING else field.default


@dataclass(frozen=True)
class Option:
    """One user-facing setting of a config tree: ``name`` is its flat keyword and the command line's dest
    (``gate_lambda``), ``flag`` its option string (``--gate-lambda``; ``MODEL`` for a positional), ``path`` the fields
    that reach it (``("gates", "lam")``)."""

    name: str
    flag: str
    path: tuple[str, ...]
    field: Field
    type: Any
    title: str | None
    shown: str | None
    siblings: Mapping[str, str]


def options(cls: type, *, prefix: str = "", exclude: Sequence[str] = (), flags: Mapping[str, str] | None = None,
            shown: Mapping[str, str] | None = None, title: str | None = None, path: tuple[str, ...] = ()) -> list[Option]:
    """Every setting of the config tree rooted at ``cls``, sections expanded in place, in declaration order."""
    flags, shown = flags or {}, shown or {}
    hints = type_hints(cls)
    fields = user_fields(cls, exclude)
    siblings = {field.name: option_flag(field, prefix, flags) for field in fields if section_of(field) is None}
    found: list[Option] = []
    for field in fields:
        where = section_of(field)
        if where is not None:
            found += options(hints[field.name], prefix=where.prefix, exclude=where.exclude, flags=where.flags,
                             shown=where.shown, title=where.title, path=(*path, field.name))
            continue
        flag = siblings[field.name]
        name = field.name if field.metadata.get("positional") else flag.removeprefix("--").replace("-", "_")
        found.append(Option(name, flag, (*path, field.name), field, hints[field.name], title, shown.get(field.name), siblings))
    names = [option.name for option in found]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"settings of {cls.__name__} share the names {duplicated}: give one of them a flag or a prefix")
    return found


def option_flag(field: Field, prefix: str, flags: Mapping[str, str]) -> str:
    """``--prefix-name`` (or the ``flag`` given for the field, by its section or in its metadata); ``MODEL`` for a
    positional."""
    if field.metadata.get("positional"):
        return field.metadata.get("metavar") or field.name.upper()
    flag = flags.get(field.name) or field.metadata.get("flag") or field.name.replace("_", "-")
    return flag if flag.startswith("--") else f"--{prefix}{flag}"


def help_text(option: Option) -> str:
    """The option's help, with ``{sibling}`` shown as that sibling's flag."""
    return _with_flags(option.field.metadata["help"], option)


def shown_default(option: Option, value: Any) -> str:
    """How a default reads in the help and the docs."""
    if option.shown is not None:
        return _with_flags(option.shown, option)
    if value is None:
        return _with_flags(option.field.metadata.get("none_means") or "none", option)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _with_flags(text: str, option: Option) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: option.siblings.get(match.group(1), match.group(0)), text)


def value_at(config: Any, path: Sequence[str]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def choices_of(kind: Any) -> tuple | None:
    """The choices of a ``Literal[...]`` type (also inside ``X | None``), else None."""
    kind = without_none(kind)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def without_none(kind: Any) -> Any:
    """``X`` of ``X | None``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def allows_none(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def is_name_list(kind: Any) -> bool:
    """``tuple[str, ...]`` (names, paths): a YAML list, or comma-separated on the command line."""
    kind = without_none(kind)
    return typing.get_origin(kind) is tuple


def convert(value: Any, kind: Any, where: str, origin: str = "") -> Any:
    """``value`` checked against the field type ``kind`` (and converted: a YAML list to a tuple, an integer to a
    float, a numeric string to a number); a one-line ``FoldGPTError`` naming ``where`` otherwise."""
    def invalid(expected: str) -> FoldGPTError:
        return FoldGPTError(f"{_prefix(origin)}setting '{where}' has an invalid value {value!r}: give {expected}")

    if value is None:
        if allows_none(kind):
            return None
        raise invalid("a value (it cannot be null)")
    choices = choices_of(kind)
    if choices is not None:
        if value not in choices or isinstance(value, bool):
            raise FoldGPTError(f"{_prefix(origin)}setting '{where}' must be one of {', '.join(map(str, choices))}, not {value!r}")
        return value
    kind = without_none(kind)
    if is_name_list(kind):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, (str, os.PathLike)) for item in items):
            raise invalid("a list of names")
        return tuple(str(item).strip() for item in items if str(item).strip())
    if kind is bool:
        if not isinstance(value, bool):
            raise invalid("true or false")
        return value
    if kind in (int, float):
        return _number(value, kind, invalid)
    if kind is str:
        if not isinstance(value, (str, os.PathLike)):
            raise invalid("a text")
        return str(value)
    raise TypeError(f"settings of type {kind} are not supported")


def _number(value: Any, kind: type, invalid: Callable[[str], FoldGPTError]) -> Any:
    expected = "an integer" if kind is int else "a number"
    if isinstance(value, str):  # YAML reads 5e-3 (no dot) as a string
        try:
            value = kind(value)
        except ValueError:
            raise invalid(expected) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise invalid(expected)
    return kind(value)


def _prefix(origin: str) -> str:
    return f"{origin}: " if origin else ""


def from_mapping(cls: type, values: Any, *, origin: str = "", base: Any = None, exclude: Sequence[str] = (),
                 where: str = "") -> Any:
    """The config ``base`` (default ``cls()``) with the settings of the nested mapping ``values`` applied: sections
    as mappings (or config instances), every other setting checked by ``convert``. Unknown keys, wrong types, bad
    choices and the dataclass's own checks give one-line ``FoldGPTError``s that start with ``origin``. Giving one of
    a set of ``exclusive`` settings resets the others of the set to their defaults (a target given on the command
    line replaces the YAML's)."""
    base = cls() if base is None else base
    if not isinstance(values, Mapping):
        raise FoldGPTError(f"{_prefix(origin)}setting '{where or cls.__name__}' must be a mapping of settings, not {values!r}")
    fields = {field.name: field for field in user_fields(cls, exclude)}
    hints = type_hints(cls)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise unknown_setting(name, [f"{where}.{known}" if where else known for known in fields], origin)
        nested = section_of(fields[key])
        if nested is None:
            changes[key] = convert(value, hints[key], name, origin)
        elif isinstance(value, hints[key]):
            changes[key] = value
        else:
            changes[key] = from_mapping(hints[key], value, origin=origin, base=getattr(base, key), exclude=nested.exclude, where=name)
    for tag in {fields[key].metadata.get("exclusive") for key in changes} - {None}:
        for field in fields.values():
            if field.metadata.get("exclusive") == tag and field.name not in changes:
                changes[field.name] = default_of(field)
    try:
        return dataclasses.replace(base, **changes)
    except FoldGPTError as error:
        raise FoldGPTError(f"{_prefix(origin)}{error}") from None


def unknown_setting(name: str, known: Sequence[str], origin: str = "") -> FoldGPTError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see docs/cli.md for the settings"
    return FoldGPTError(f"{_prefix(origin)}unknown setting {str(name)!r}{hint}")


def nest(cls: type, values: Mapping[str, Any], *, origin: str = "") -> dict[str, Any]:
    """Settings given each as a section (``heal: {steps: 3}``) or by its flat name (``heal_steps: 3``), as one nested
    mapping for ``from_mapping``. Flat values are checked here, so that an error names the key as it was given. A key
    that is both a section and a flat name (``calibration``) is the section when its value is a mapping or a config."""
    by_name = {option.name: option for option in options(cls)}
    sections = {field.name: field for field in user_fields(cls) if section_of(field) is not None}
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if key in sections and (isinstance(value, Mapping) or dataclasses.is_dataclass(value) or key not in by_name):
            given = to_mapping(value, exclude=section_of(sections[key]).exclude) if dataclasses.is_dataclass(value) else value  # type: ignore[union-attr]
            if not isinstance(given, Mapping):
                raise FoldGPTError(f"{_prefix(origin)}setting '{key}' must be a mapping of settings, not {value!r}")
            nested.setdefault(key, {}).update(given)
        elif key in by_name:
            option = by_name[key]
            place = nested
            for name in option.path[:-1]:
                place = place.setdefault(name, {})
            place[option.path[-1]] = convert(value, option.type, key, origin)
        else:
            raise unknown_setting(str(key), [*by_name, *sections], origin)
    return nested


def to_mapping(config: Any, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The user-facing settings of ``config`` as plain data (sections nested, tuples as lists): what ``from_mapping``
    reads back, e.g. a saved ``config.yaml``."""
    plain: dict[str, Any] = {}
    for field in user_fields(type(config), exclude):
        value = getattr(config, field.name)
        nested = section_of(field)
        if nested is not None:
            plain[field.name] = to_mapping(value, nested.exclude)
        else:
            plain[field.name] = list(value) if isinstance(value, tuple) else value
    return plain


def flat_settings(config: Any) -> dict[str, Any]:
    """Every setting of ``config`` by its flat name (``gate_steps``)."""
    return {option.name: value_at(config, option.path) for option in options(type(config))}
