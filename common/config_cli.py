"""A command line generated from a frozen config dataclass (cleanrl's `Args`, tyro-style, no dependency).

Each field becomes `--field-name`; its help is the docstring written under the field
(the attribute-docstring convention), so `--help` explains every option.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written right after each annotated field of a dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parser_for(tp: Any):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        inner = [a for a in args if a is not type(None)]
        return _parser_for(inner[0])
    if origin is tuple:
        return ("tuple", _parser_for(args[0]))
    if tp is bool:
        return "bool"
    if tp in (int, float, str, Path):
        return tp
    if origin is typing.Literal:
        return str
    return str


def add_dataclass_args(ap: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """A nested dataclass field `ppo: PPOConfig` becomes the flags --ppo.lr, --ppo.epochs, ..."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            add_dataclass_args(ap, hints[f.name], prefix + f.name + ".")
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        p = _parser_for(hints[f.name])
        help_ = (docs.get(f.name, "") + ("" if required else f" (default: {default})")).replace("%", "%%")
        if p == "bool":
            ap.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(p, tuple):
            ap.add_argument(flag, dest=prefix + f.name, type=p[1], nargs="*", default=default, required=required, help=help_)
        else:
            ap.add_argument(flag, dest=prefix + f.name, type=p, default=default, required=required, help=help_)


def build_config(cls: type[T], ns: dict, prefix: str = "") -> T:
    """The config from parsed flags (dotted names for nested dataclasses)."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            kw[f.name] = build_config(hints[f.name], ns, prefix + f.name + ".")
        else:
            kw[f.name] = ns[prefix + f.name]
    return cls(**kw)


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> T:
    ap = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(ap, cls)
    ns = vars(ap.parse_args(argv))
    for k, v in ns.items():
        if isinstance(v, list):
            ns[k] = tuple(v)
    try:
        return build_config(cls, ns)
    except (ValueError, TypeError) as e:
        ap.error(str(e))
        raise  # unreachable; ap.error exits


def check_command_line(cls: type, prog: str, description: str | None = None) -> None:
    """Parses the process's command line against `cls` and drops the result: `--help`, an unknown flag or
    a bad value ends the command here. Called at the top of a command's module when it runs as
    __main__, before the module imports torch or transformers (3-7 s on 2 EPYC cores), so that those
    are answered at once; main() then parses the same arguments again (microseconds)."""
    parse_config(cls, sys.argv[1:], prog, description)
