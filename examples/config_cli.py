"""Command-line helpers shared by the examples' ``main.py`` files.

A config is a dataclass whose defaults live in its class; ``configs/*.py``
return one with the fields that differ. On the command line every field is set
one way, typed by the dataclass's own annotations: a flag for the common ones
(``--batch-size 32``) or ``--set field=value`` for any; both go through
:func:`parse_value`, so ``--set batch_size=abc`` is a one-line error naming the
field. :func:`run_main` turns the errors a user can cause into one line on
stderr (exit status 2) instead of a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union


def load_config(package: str, name: str, names):
  """``<package>.configs.<name>.get_config()``; ``name`` must be in ``names``."""
  if name not in names:
    raise ValueError(f"--config must be one of {names}, got {name!r}")
  return importlib.import_module(f"{package}.configs.{name}").get_config()


def field_types(config) -> dict[str, Any]:
  """``{field: type}`` of a dataclass instance (string annotations resolved)."""
  hints = typing.get_type_hints(type(config))
  return {f.name: hints[f.name] for f in dataclasses.fields(config)}


def _is_union(tp) -> bool:
  """``Optional[X]``, ``Union[X, Y]`` or ``X | Y``."""
  return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp) -> str:
  if _is_union(tp):
    return " or ".join(_type_name(a) for a in typing.get_args(tp))
  if tp is type(None):
    return "None"
  return getattr(tp, "__name__", str(tp))


def _parse(tp, text: str):
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if _is_union(tp):
    if type(None) in args and text.strip() in ("None", "none", "null"):
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _parse(arg, text)
      except ValueError:
        pass
    raise ValueError
  if tp is bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError
  if tp is int:
    return int(text)          # "1.5" and "abc" are errors
  if tp is float:
    return float(text)
  if tp is str:
    try:
      value = ast.literal_eval(text)   # a quoted string: --set model='ResNet1'
    except (ValueError, SyntaxError):
      return text
    return value if isinstance(value, str) else text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError from None
  kind = origin or tp
  if kind is tuple and isinstance(value, list):
    value = tuple(value)
  if isinstance(kind, type) and not isinstance(value, kind):
    raise ValueError
  return value


def parse_value(config, name: str, text: str, source: str = "--set"):
  """``text`` parsed as the type of field ``name`` of ``config``."""
  types = field_types(config)
  if name not in types:
    raise ValueError(f"{source}: {type(config).__name__} has no field {name!r}; "
                     f"fields: {', '.join(types)}")
  try:
    return _parse(types[name], text)
  except ValueError:
    raise ValueError(f"{source}: {name} must be {_type_name(types[name])}, "
                     f"got {text!r}") from None


def set_field(config, item: str) -> None:
  """Applies ``--set field=value`` (typed by the dataclass) to ``config``."""
  key, sep, value = item.partition("=")
  if not sep:
    raise ValueError(f"--set expects field=value, got {item!r}")
  setattr(config, key, parse_value(config, key.strip(), value))


def add_field_flags(parser, config, names, choices=None) -> None:
  """``--field-name VALUE`` for each field in ``names`` (parsed by :func:`parse_value`)."""
  types = field_types(config)
  for name in names:
    parser.add_argument("--" + name.replace("_", "-"), default=None, metavar=name.upper(),
                        choices=(choices or {}).get(name), help=_type_name(types[name]))


def add_resume_flags(parser) -> None:
  """``--fresh`` and ``--force``: what to do with a workdir that holds another run."""
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--fresh", action="store_true",
                     help="move the workdir's old run aside (to WORKDIR.old-N) and start over")
  group.add_argument("--force", action="store_true",
                     help="resume even if the saved config differs from this one (only a "
                          "run whose saved state fits; nothing is ever deleted)")


def apply_args(config, args, flags) -> None:
  """Sets the fields in ``flags`` that were given, then applies every ``--set``."""
  for name in flags:
    value = getattr(args, name)
    if value is not None:
      flag = "--" + name.replace("_", "-")
      setattr(config, name, parse_value(config, name, value, source=flag))
  for item in args.set:
    set_field(config, item)


def _how(name: str) -> str:
  return f"set it with --{name.replace('_', '-')} or --set {name}=VALUE"


def check_number(config, name: str, *, lo=None, hi=None, lo_open: bool = False,
                 none_ok: bool = False, integer: bool = False) -> None:
  """Raises a one-line ValueError unless ``config.<name>`` is a finite number in
  range (``lo``/``hi``; ``lo_open``: ``> lo``), an int if ``integer``, or None
  if ``none_ok``. The message names the field, the allowed values and the flag."""
  value = getattr(config, name)
  if value is None and none_ok:
    return
  kind = "an int" if integer else "a number"
  rng = []
  if lo is not None:
    rng.append(f"{'>' if lo_open else '>='} {lo}")
  if hi is not None:
    rng.append(f"<= {hi}")
  allowed = f"{kind} {' and '.join(rng)}".strip() + (" or None" if none_ok else "")
  bad = isinstance(value, bool) or not isinstance(value, (int, float))
  if integer and not bad and isinstance(value, float):
    bad = True
  if not bad:
    bad = (not math.isfinite(value) or (lo is not None and (value <= lo if lo_open
                                                             else value < lo))
           or (hi is not None and value > hi))
  if bad:
    raise ValueError(f"config.{name} must be {allowed}, got {value!r}; {_how(name)}")


def check_choice(config, name: str, options) -> None:
  value = getattr(config, name)
  if value not in options:
    raise ValueError(f"config.{name} must be one of {tuple(options)}, got {value!r}; "
                     f"{_how(name)}")


def check_kwargs(config, name: str, fn, reserved=()) -> None:
  """``config.<name>`` (a dict of keyword arguments for ``fn``) names only
  parameters of ``fn`` (``reserved`` ones are set by the example itself)."""
  kwargs = getattr(config, name)
  if not isinstance(kwargs, dict):
    raise ValueError(f"config.{name} must be a dict, got {kwargs!r}; {_how(name)}")
  params = inspect.signature(fn.__init__ if isinstance(fn, type) else fn).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return
  allowed = [k for k, p in params.items() if k not in ("self", "rngs", *reserved)
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
  unknown = [k for k in kwargs if k not in allowed]
  if unknown:
    raise ValueError(f"config.{name} has unknown key(s) {unknown}; allowed: {allowed}")


def check_workdir(workdir) -> None:
  """A workdir that exists must be a directory."""
  path = Path(workdir)
  if path.exists() and not path.is_dir():
    raise ValueError(f"--workdir {str(path)!r} is a file, not a directory; pass a "
                     "directory (it is created if missing)")


def format_summary(title: str, summary: dict) -> str:
  """A readable end-of-run summary: one ``key: value`` line per entry."""
  width = max((len(k) for k in summary), default=0)
  lines = [title]
  for key, value in summary.items():
    if isinstance(value, float):
      value = f"{value:.6g}"
    lines.append(f"  {key:<{width}}  {value}")
  return "\n".join(lines)


# The errors a user's input causes (a bad flag value, a missing or corrupt
# file, a workdir of another run, a download without a network); anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, EOFError, PermissionError,
               ConnectionError)


def run_main(main, argv=None) -> None:
  """Runs ``main(argv)``; a user error ends the process with one line on stderr."""
  try:
    main(argv)
  except USER_ERRORS as e:
    message = str(e).strip().splitlines()
    print(f"error: {message[0] if message else type(e).__name__}", file=sys.stderr)
    raise SystemExit(2) from None
