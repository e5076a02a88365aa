"""How env variables (RLHF_LIVE_<FIELD>) and command-line flags (--field-name) become a Config: defaults < env < flags.

Knows the Config's fields, types and the documentation written under each; knows nothing of what the fields mean.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import typing
from dataclasses import fields

from rlhf_live.config import Config

ENV_PREFIX = "RLHF_LIVE_"


def field_docs() -> dict[str, str]:
    """Map field name -> the docstring written on the line below it."""
    tree = ast.parse(inspect.getsource(Config))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and documented and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value  # type: ignore[union-attr]
    return docs


def _coerce(f: dataclasses.Field, text: str) -> object:
    """An env variable's text as the field's type (booleans: 1/0, true/false, yes/no, on/off)."""
    typ = typing.get_type_hints(Config)[f.name]
    if typ is not bool:
        return typ(text)
    low = text.strip().lower()
    if low in {"1", "true", "yes", "on", "0", "false", "no", "off", ""}:
        return low in {"1", "true", "yes", "on"}
    raise ValueError(f"expected a boolean (1/0, true/false), got {text!r}")


def from_env(environ: typing.Mapping[str, str] | None = None) -> Config:
    """Config with defaults overridden by RLHF_LIVE_<FIELD> variables."""
    environ = os.environ if environ is None else environ
    cfg = Config()
    for f in fields(Config):
        key = ENV_PREFIX + f.name.upper()
        if key in environ:
            try:
                setattr(cfg, f.name, _coerce(f, environ[key]))
            except ValueError as exc:
                raise SystemExit(f"{key}: {exc}") from None
    return _checked(cfg)


def add_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per Config field but `skip` (default None: unset flags leave env/defaults alone)."""
    docs = field_docs()
    group = parser.add_argument_group("configuration (env RLHF_LIVE_<FIELD> works too)")
    parser.set_defaults(_config_skip=skip)
    for f in fields(Config):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = typing.get_type_hints(Config)[f.name]
        if typ is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=docs.get(f.name))
        else:
            group.add_argument(flag, type=typ, default=None, help=docs.get(f.name), dest=f.name)


def from_args(args: argparse.Namespace, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Defaults < env < flags."""
    cfg = from_env(environ)
    skip = getattr(args, "_config_skip", ())
    for f in fields(Config):
        if f.name in skip:
            continue
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    return _checked(cfg)


def _checked(cfg: Config) -> Config:
    """`cfg` once its fields were set from env and flags, checked as Config() checks; a sentence where it is wrong."""
    try:
        cfg.__post_init__()
    except ValueError as exc:
        raise SystemExit(f"rlhf-live: {exc}") from None
    return cfg
