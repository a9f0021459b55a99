"""``python -m pagoda_engine --model DIR [--port N] [...]``: serve the engine over gRPC.

Every EngineConfig field is a flag (``max_num_seqs`` -> ``--max-num-seqs``) whose default comes from
the environment variable ``PAGODA_MAX_NUM_SEQS`` when set, else from the dataclass. The flags are
generated from the dataclass, so a new field is a new flag with nothing else to edit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pagoda_engine.config import EngineConfig
from pagoda_engine.server import serve

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> EngineConfig:
    parser = argparse.ArgumentParser(prog="python -m pagoda_engine", description=__doc__,
                                     formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        _add_flag(parser, field, hints[field.name], environ)
    args = parser.parse_args(argv)
    try:
        return EngineConfig(**vars(args))
    except ValueError as error:  # a value of the right type but out of range
        parser.error(str(error))


def _add_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, hint: Any,
              environ: Mapping[str, str]) -> None:
    flag = "--" + field.name.replace("_", "-")
    env = "PAGODA_" + field.name.upper()
    required = field.default is dataclasses.MISSING and env not in environ
    default = None if field.default is dataclasses.MISSING else field.default
    if hint is bool:
        if env in environ:
            default = _env_bool(parser, env, environ[env])
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"env {env}")
    else:
        convert = _converter(hint)
        if env in environ:  # converted here, so that a bad value is reported under the variable's name
            default = _env_value(parser, env, environ[env], convert)
        parser.add_argument(flag, type=convert, default=default, required=required, help=f"env {env}")


def _converter(hint: Any) -> Callable[[str], Any]:
    """The parser of one field's type; ``X | None`` takes "none" (or an empty string) for None."""
    if isinstance(hint, types.UnionType) and type(None) in hint.__args__:
        (inner,) = (arg for arg in hint.__args__ if arg is not type(None))

        def optional(text: str):
            return None if text.strip().lower() in ("", "none") else inner(text)

        optional.__name__ = f"{inner.__name__} or none"  # how argparse names the type in its errors
        return optional
    return hint


def _env_value(parser: argparse.ArgumentParser, env: str, text: str, convert: Callable[[str], Any]) -> Any:
    try:
        return convert(text)
    except ValueError as error:
        parser.error(f"{env}={text!r}: {error}")


def _env_bool(parser: argparse.ArgumentParser, env: str, text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        parser.error(f"{env}={text!r} is not a boolean (1/0, true/false, yes/no, on/off)")
    return value in _TRUE


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
