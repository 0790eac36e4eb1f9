"""Pipeline settings: one flat dictionary whose keys are the ``foldgpt compress`` options.

The CLI parser is the single schema: a YAML ``--config`` file, the Python API's keyword arguments and the command line
all set the same keys (``--gate-steps`` is ``gate_steps``), are checked by the same argparse types and choices, and
resolve in the order parser defaults < YAML < explicit options. The resolved settings are saved as
``DIR/config.yaml``, which is itself a valid ``--config``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from foldgpt.errors import FoldGPTError
from foldgpt.workflows.compress import run_pipeline

NOT_SETTINGS = {"command", "handler", "debug", "data_dir", "config", "out", "overwrite", "default_remove"}
TARGET_KEYS = ("remove", "remove_ratio", "target_params", "target_flops")


def compress_parser() -> argparse.ArgumentParser:
    """The ``compress`` sub-command's parser (a fresh one: defaults are set on it)."""
    from foldgpt.cli.main import build_parser  # noqa: PLC0415

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["compress"]


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings in a parsed ``compress`` namespace, with the default target filled in."""
    settings = {key: list(value) if isinstance(value, tuple) else value for key, value in vars(args).items() if key not in NOT_SETTINGS}
    if all(settings[key] is None for key in TARGET_KEYS):
        settings["remove"] = args.default_remove
    return settings


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings, with dashes in keys turned into underscores."""
    path = Path(path)
    if not path.is_file():
        raise FoldGPTError(f"config file '{path}' does not exist; give the path of a YAML file (e.g. a previous run's config.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise FoldGPTError(f"config file '{path}' is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(data, dict):
        raise FoldGPTError(f"config file '{path}' must be a mapping of settings (key: value), not a {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def checked_settings(parser: argparse.ArgumentParser, values: dict[str, Any], origin: str) -> dict[str, Any]:
    """``values`` converted and validated with the parser's own types and choices; unknown keys refused."""
    actions = {action.dest: action for action in parser._actions if action.dest not in NOT_SETTINGS and action.dest != "help"}
    checked = {}
    for key, value in values.items():
        if key in ("out", "overwrite", "config"):
            raise FoldGPTError(f"{origin}: '{key}' is not a setting; give it on the command line (--{key})")
        if key not in actions:
            raise FoldGPTError(f"{origin}: unknown setting {str(key)!r}; valid settings: {', '.join(sorted(actions))}")
        checked[key] = _convert(actions[key], value, f"{origin}: setting '{key}'")
    return checked


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise FoldGPTError(f"{where} must be true or false, not {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        value = ",".join(str(item) for item in value)
    if isinstance(value, bool) or (isinstance(value, float) and action.type is int):
        raise FoldGPTError(f"{where} has the wrong type: {value!r}")
    converter = action.type or str
    try:
        converted = converter(str(value)) if action.type is not None else value
    except (argparse.ArgumentTypeError, ValueError, FoldGPTError) as error:
        raise FoldGPTError(f"{where} has an invalid value {value!r}: {error}") from None
    if action.choices is not None and converted not in action.choices:
        raise FoldGPTError(f"{where} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return converted


def resolve_settings(model: str, config: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Settings for ``foldgpt.compress`` from Python: defaults < the YAML ``config`` < ``options``."""
    parser = compress_parser()
    layered = checked_settings(parser, read_yaml(config), f"config '{config}'") if config else {}
    explicit = checked_settings(parser, {key.replace("-", "_"): value for key, value in options.items()}, "compress()")
    if any(key in explicit for key in TARGET_KEYS):  # a target given explicitly replaces the config's target
        layered = {key: value for key, value in layered.items() if key not in TARGET_KEYS}
    parser.set_defaults(**{**layered, **explicit})
    return settings_from_args(parser.parse_args([model, "--out", "unused"]))


def apply_yaml_config(argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse a ``compress`` command line with its ``--config`` YAML as defaults (the command line wins)."""
    parser = compress_parser()
    layered = checked_settings(parser, read_yaml(args.config), f"config '{args.config}'")
    if any(getattr(args, key) is not None for key in TARGET_KEYS):
        layered = {key: value for key, value in layered.items() if key not in TARGET_KEYS}
    parser.set_defaults(**layered)
    reparsed = parser.parse_args(argv[argv.index("compress") + 1:])
    for key in ("command", "handler", "debug", "data_dir"):
        setattr(reparsed, key, getattr(args, key))
    return reparsed


def compress(model: str, out: str | Path, config: str | Path | None = None, overwrite: bool = False, **options: Any) -> dict:
    """Run (or resume) the whole pipeline on ``model`` into ``out``; return the summary.

    Settings: the ``foldgpt compress`` options as keywords (``group_size=2``, ``heal_steps=200``, ``remove=8``, ...),
    over a YAML ``config``, over the defaults. ``overwrite`` starts from scratch instead of resuming.
    """
    return run_pipeline(resolve_settings(model, config, **options), out, overwrite)
