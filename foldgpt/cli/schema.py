"""The command line generated from the config dataclasses: one flag per setting, read back into the config.

A flag is the field's name with dashes (``micro_batch`` is ``--micro-batch``) under its section's prefix
(``--gate-micro-batch``), or the ``flag`` its declaration gives (``GateConfig.lam`` is ``--gate-lambda``); the help
is the declaration's, with the default. Choices come from ``Literal`` types, booleans are ``--x/--no-x``, name lists
are comma-separated (or repeated). Every setting's argparse default is ``SUPPRESS``, so that the parsed namespace
holds only what the user typed: ``read_config`` applies it over a base config (the command's defaults, or for
``compress`` the ``--config`` YAML over them), and the command line wins.
"""

from __future__ import annotations

import argparse
from typing import Any

from foldgpt.core.settings import (
    Option,
    choices_of,
    from_mapping,
    help_text,
    is_name_list,
    options,
    shown_default,
    value_at,
    without_none,
)


def add_config(parser: argparse.ArgumentParser, base: Any) -> None:
    """Add every setting of ``base``'s config tree to ``parser``, grouped by section title, with ``base``'s values as
    the defaults shown."""
    groups: dict[str | None, Any] = {None: parser}
    exclusive: dict[tuple[str | None, str], Any] = {}
    for option in options(type(base)):
        if option.title not in groups:
            groups[option.title] = parser.add_argument_group(option.title)
        group = groups[option.title]
        tag = option.field.metadata.get("exclusive")
        if tag is not None:
            if (option.title, tag) not in exclusive:
                exclusive[option.title, tag] = group.add_mutually_exclusive_group()
            group = exclusive[option.title, tag]
        names, kwargs = argument(option, value_at(base, option.path))
        group.add_argument(*names, **kwargs)


METAVARS = {int: "N", float: "X", str: "TEXT"}


def argument(option: Option, default: Any) -> tuple[list[str], dict[str, Any]]:
    """The ``add_argument`` call of one setting."""
    text = f"{help_text(option)} (default: {shown_default(option, default)})".replace("%", "%%")
    kwargs: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS}
    metavar = option.field.metadata.get("metavar")
    if option.field.metadata.get("positional"):
        return [option.name], {**kwargs, "nargs": "?", "metavar": metavar or option.name.upper()}
    kwargs["dest"] = option.name
    kind = without_none(option.type)
    choices = choices_of(option.type)
    if choices is not None:
        kwargs["choices"] = choices
    elif kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif is_name_list(kind):
        kwargs.update(type=name_list, action="extend", metavar=metavar or "NAMES")
    else:
        kwargs.update(type=kind, metavar=metavar or METAVARS[kind])
    if metavar and "metavar" not in kwargs:
        kwargs["metavar"] = metavar
    return [option.flag], kwargs


def name_list(text: str) -> list[str]:
    """``a,b,c`` as names (empty items dropped); at least one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name, e.g. wikitext2,ptb")
    return names


def read_config(args: argparse.Namespace, base: Any) -> Any:
    """``base`` with the settings given on the command line applied (and checked by the configs' ``__post_init__``)."""
    given = vars(args)
    nested: dict[str, Any] = {}
    for option in options(type(base)):
        if option.name not in given:
            continue
        place = nested
        for name in option.path[:-1]:
            place = place.setdefault(name, {})
        place[option.path[-1]] = given[option.name]
    return from_mapping(type(base), nested, base=base)
