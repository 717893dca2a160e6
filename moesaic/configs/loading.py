"""Configs on the command line, big_vision style.

`--config moesaic/configs/tiny.py:source=code` loads the file and calls `get_config("source=code")`;
`--config.model.d_model=256` then overrides one field. Values are parsed with the type of the
field they replace, so a typo or a wrong type is an error that names the field.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]  # where moesaic/configs/ sits


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` and returns `get_config(arg)`. A relative path that is not
    there is also looked up from the installed package's root, so the README's
    `moesaic/configs/tiny.py` works from any directory."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file() and not file.is_absolute() and (PACKAGE_ROOT / file).is_file():
        file = PACKAGE_ROOT / file
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist (looked in "
                                f"{pathlib.Path.cwd()} and {PACKAGE_ROOT})")
    module_spec = importlib.util.spec_from_file_location(f"moesaic_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config(arg) function")
    return module.get_config(arg or None)


def _literal(text: str):
    """A Python literal from an override's text: numbers without the parser, the rest with
    `ast.literal_eval`. CPython 3.11's AST parser keeps one recursion count for all threads
    (gh-106905), so a traceback printed by another thread (Orbax's, for a damaged checkpoint)
    while this parses fails it with SystemError; that parse is retried once."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return ast.literal_eval(text)
    except SystemError:
        return ast.literal_eval(text)


def _parse_value(text: str, old):
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(old, str) or old is None:
        try:
            return _literal(text) if old is None else text
        except (ValueError, SyntaxError):
            return text
    try:
        value = _literal(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"expected {type(old).__name__}, got {text!r}") from None
    if isinstance(value, bool):  # True is an int to Python, never to a config
        raise ValueError(f"expected {type(old).__name__}, got {text!r}")
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, (int, float)) and not isinstance(value, type(old)):
        raise ValueError(f"expected {type(old).__name__}, got {text!r}")
    if isinstance(old, (tuple, list)):
        if not isinstance(value, (tuple, list)):  # tuple('^embed$') would split the letters
            raise ValueError(f"expected a list such as ({text!r},), got {text!r}")
        value = type(old)(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies `a.b.c=value` overrides in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like --config.a.b=value")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise KeyError(f"config has no field {key!r} (no {name!r})")
            node = node[name]
        if leaf not in node:
            raise KeyError(f"config has no field {key!r}")
        try:
            node[leaf] = _parse_value(text, node[leaf])
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"config field {key!r}: {err}") from None


def resolve(spec: str, overrides: list[str]) -> ml_collections.ConfigDict:
    config = load_config_file(spec)
    apply_overrides(config, overrides)
    return config


# What `resolve` raises for a bad config file, field or value.
CONFIG_ERRORS = (KeyError, ValueError, FileNotFoundError)


def error_message(err: Exception) -> str:
    """One of CONFIG_ERRORS as the line a command prints (a KeyError's own text, unquoted)."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
