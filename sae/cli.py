"""Command lines built from config dataclasses: each field is a flag, its docstring the --help text.

Shared by every package's `__main__` (`python -m sae harvest`, `python -m graphs train`, ...), so a
config field added once shows up on the command line with its documentation.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of a dataclass (attribute docstrings),
    inherited fields included (a subclass's own docs win)."""
    docs: dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # the class statement's body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, required: tuple[str, ...] = ()
) -> None:
    """One `--field-name` flag per dataclass field, typed from its annotation."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse %-formats help strings
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
            kwargs["type"] = type(kwargs["choices"][0])
        elif typing.get_origin(kind) is list:  # `--flag A --flag B` or `--flag A B`
            kwargs["type"], kwargs["nargs"], kwargs["action"] = (
                typing.get_args(kind)[0],
                "+",
                "extend",
            )
        else:
            kwargs["type"] = kind
        if f.name in required:
            kwargs["required"] = True
            kwargs.pop("default")
        else:
            kwargs["help"] = f"{help_text} (default: {default})"
        parser.add_argument(flag, **kwargs)


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def command_parser(
    prog: str, description: str | None
) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A package's `python -m PKG COMMAND …` parser (the module docstring as its description) and
    the sub-parser group its commands are added to."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser, parser.add_subparsers(dest="command", required=True)
