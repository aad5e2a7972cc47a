"""Typed configuration plumbing shared by the CLI, Flower's ``run_config`` and tests.

Every config is a frozen dataclass whose field defaults are *the* defaults. Flat mappings with
kebab-case keys (Flower's ``[tool.flwr.app.config]`` / ``--run-config "k=v"`` style) are
turned into dataclasses here, with values coerced to the field types and unknown keys refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import shlex
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeGuard, TypeVar

from shared.errors import ConfigError

T = TypeVar("T")

Scalar = bool | int | float | str


def kebab(name: str) -> str:
    """``cold_user_fraction`` -> ``cold-user-fraction``."""
    return name.replace("_", "-")


def parse_run_config(text: str, *, flag: str = "--run-config") -> dict[str, Scalar]:
    """Parse ``"a=1 b=0.5 c='x' d=true"`` (TOML values; bare words are strings); errors
    name ``flag``, the option the text came from.

    >>> parse_run_config("rounds=3 dataset=ml-100k dp=true")
    {'rounds': 3, 'dataset': 'ml-100k', 'dp': True}
    """
    out: dict[str, Scalar] = {}
    try:
        tokens = shlex.split(text)
    except ValueError as exc:  # shlex: "No closing quotation", "No escaped character"
        raise ConfigError(
            f"{flag}: cannot split {text!r} into key=value entries ({exc}); close the quote, "
            "or quote a value with spaces as key='a b'"
        ) from None
    for token in tokens:
        if "=" not in token:
            raise ConfigError(f"{flag} entry {token!r} is not of the form key=value")
        key, raw = token.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{flag} entry {token!r} has an empty key")
        if key in out:
            raise ConfigError(f"{flag}: {key!r} is given twice in {text!r}; give each key once")
        out[key] = _parse_value(raw)
    return out


class _SpelledInt(int):
    """A TOML integer that remembers how it was typed (``0x10``, ``1_000``)."""

    raw: str


class _SpelledFloat(float):
    """A TOML float that remembers how it was typed (``1e3``)."""

    raw: str


def _parse_value(raw: str) -> Scalar:
    """``raw`` as the one TOML value it is, else as text. A value that TOML reads only in
    part is text too: ``1#x`` (a comment) or ``1`` and a line ``b = 2`` were read as 1, the
    rest dropped without a word."""
    whole, value = _whole_toml_value(raw)
    if not whole:
        return raw
    if isinstance(value, int | float) and not isinstance(value, bool) and str(value) != raw:
        # a text setting (e.g. name=1e3) must get the text as typed, not "1000.0"
        spelled: _SpelledInt | _SpelledFloat = (
            _SpelledInt(value) if isinstance(value, int) else _SpelledFloat(value)
        )
        spelled.raw = raw.strip()
        return spelled
    if isinstance(value, bool | int | float | str):
        return value
    return raw


def _whole_toml_value(raw: str) -> tuple[bool, Any]:
    """``(True, value)`` if ``raw`` is one TOML value as a whole, else ``(False, None)``."""
    try:
        document = tomllib.loads(f"v = {raw}")
        if len(document) != 1:
            return False, None
        tomllib.loads(f"v = [{raw}]")  # a comment would swallow the closing bracket
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        # ValueError: an integer of more digits than Python converts (4300); RecursionError:
        # brackets nested deeper than the parser goes. Both are text, for the field to judge
        return False, None
    return True, document["v"]


def field_names(cls: type) -> set[str]:
    """The kebab-case keys a dataclass accepts."""
    return {kebab(f.name) for f in dataclasses.fields(cls)}


def from_flat(
    cls: type[T],
    values: Mapping[str, Any],
    *,
    strict: bool = True,
    built: Mapping[str, Any] | None = None,
) -> T:
    """Build dataclass ``cls`` from a flat kebab- or snake-case mapping.

    Missing keys keep their defaults; with ``strict`` an unknown key is an error that lists
    the valid keys. Values are coerced to the annotated field type (``"3"`` -> 3).
    ``built`` passes fields already built (e.g. a nested config) as they are, so that
    ``cls`` is validated once, with them.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    by_key = {kebab(f.name): f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        f = by_key.get(kebab(key))
        if f is None:
            if strict:
                valid = ", ".join(sorted(by_key))
                close = difflib.get_close_matches(kebab(key), sorted(by_key), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(
                    f"unknown config key {key!r} for {cls.__name__}{hint}; valid: {valid}"
                )
            continue
        if f.name in kwargs:  # cohort_size and cohort-size name one setting
            raise ConfigError(
                f"{kebab(key)!r} is given twice ({f.name} and {kebab(key)} name the same "
                "setting); give each key once"
            )
        kwargs[f.name] = coerce(value, hints[f.name], kebab(key))
    return cls(**kwargs, **(built or {}))


def unknown_keys_error(
    unknown: Collection[str],
    valid: Collection[str],
    *,
    flag: str = "--run-config",
    unused: Collection[str] = (),
) -> ConfigError:
    """The error for ``unknown`` keys of ``flag``: each with the closest ``valid`` keys (a
    typo is found at a glance, as :func:`from_flat` says it), then every valid key. A key
    of ``unused`` (a real setting the command does not take) is no typo: it gets none."""
    named = []
    for key in sorted(unknown):
        close = [] if key in unused else difflib.get_close_matches(key, sorted(valid), n=3)
        named.append(f"{key} (did you mean {', '.join(close)}?)" if close else key)
    return ConfigError(
        f"unknown {flag} keys: {', '.join(named)}; valid: {', '.join(sorted(valid))}"
    )


def to_flat(obj: Any) -> dict[str, Any]:
    """Dataclass instance -> flat kebab-case dict (tuples become lists for JSON/TOML)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[kebab(f.name)] = list(value) if isinstance(value, tuple) else value
    return out


def is_int(value: object) -> TypeGuard[int]:
    """``value`` is an integer, Python's or numpy's (numpy registers its integer types as
    :class:`numbers.Integral`), and not a bool (Python's ``True`` is the int ``1``): how a
    count, a round or a seed is checked, whether read from JSON or a run config or passed
    by a caller. ``1.5`` or ``"7"`` would pass a comparison and fail later, deep in numpy.
    The one definition; numpy is not imported for it."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite real number (integer or float, Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


MAX_ROUNDS = 1_000_000
"""The most federated rounds a run may ask for: far beyond any convergence (ml-100k converges
in about 100), and small enough that round numbers, checkpoint names and Flower's 64-bit
counters never overflow."""


def check_rounds(rounds: int, key: str) -> None:
    """Refuse a round count outside ``1 .. MAX_ROUNDS`` (a typo such as ``1e22``), naming the
    setting ``key``."""
    if not 1 <= rounds <= MAX_ROUNDS:
        raise ConfigError(f"{key} must be between 1 and {MAX_ROUNDS:,}, got {rounds}")


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Coerce ``value`` to the type ``hint`` or raise a ConfigError naming ``key``.

    The one rule for a setting's value, whoever reads it (:func:`from_flat`, the server's
    ``ServerConfig``, the toy task's settings), so that a value one reader takes is not
    refused, or read otherwise, by another: an ``int`` takes ``2``, ``2.0``, ``"2"`` and ``"2.0"``
    but not ``2.5`` or ``true``; a ``float`` takes any number or numeric text but not ``true``;
    a ``bool`` takes ``true``/``false``, ``1``/``0`` and ``"yes"``/``"no"``/``"on"``/``"off"``;
    a ``str`` takes the text as typed. In a union, a value already of one of its types keeps
    that type (``int | float``: ``1.0`` is the fraction, ``1`` the count).
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (
            isinstance(value, str) and value.lower() in ("none", "null", "")
        )
        if is_none and type(None) in args:
            return None
        # a value already of one of the types keeps it: in ``int | float`` (a count, or a
        # fraction) 1.0 is the fraction 1.0, not the count 1
        own = [a for a in args if _is_instance(value, a)]
        errors = []
        for arg in [*own, *(a for a in args if a not in own)]:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if origin is tuple:
        if isinstance(value, str):  # "1,3", or a TOML list "[1, 3]" kept as text
            text = value.strip()
            listed = _toml_list(text)
            if listed is not None:  # its strings without their quotes: ["a", "b"] is a, b
                items = listed
            else:  # [a,b]: a list whose quotes the shell took, or no list at all
                if text.startswith("[") and text.endswith("]"):
                    text = text[1:-1]
                items = [v for v in text.split(",") if v.strip()] if text.strip() else []
        elif isinstance(value, list | tuple):
            items = list(value)
        else:  # one value: shots=2
            items = [value]
        inner = args[0] if args else str
        return tuple(coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in items)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float):
        try:
            if isinstance(value, bool):  # true/false is not a number, though Python says 1/0
                raise ValueError
            number = value
            if hint is int and isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
                number = float(value)  # "2.0" as 2.0 is: 2
            if hint is int and isinstance(number, float) and not number.is_integer():
                raise ValueError
            return hint(number)
        except (TypeError, ValueError, OverflowError):  # Overflow: float(10**400)
            raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}") from None
    if hint is str:  # a text setting gets what was typed: true, 1e3, 0x10 (not True, 1000.0)
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(getattr(value, "raw", value))
    return value


def _toml_list(text: str) -> list[Any] | None:
    """The items of ``text`` if it is one TOML array (``["teacher", "pop"]``), else None.
    :func:`parse_run_config` keeps a list as text (a run config holds scalars); split on
    its commas as text, a string item kept its TOML quotes (``'"teacher"'``)."""
    whole, value = _whole_toml_value(text) if text.startswith("[") else (False, None)
    return value if whole and isinstance(value, list) else None


def _is_instance(value: Any, hint: Any) -> bool:
    """``value`` is of the plain type ``hint`` (a bool is no int or float here)."""
    if not isinstance(hint, type) or hint is type(None):
        return False
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, hint)
