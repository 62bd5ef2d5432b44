"""Command-line helpers shared by the examples' ``main.py`` files."""

from __future__ import annotations

import ast
import dataclasses
import importlib


def load_config(package: str, name: str, names):
  """``<package>.configs.<name>.get_config()``; ``name`` must be in ``names``."""
  if name not in names:
    raise ValueError(f"--config must be one of {names}, got {name!r}")
  return importlib.import_module(f"{package}.configs.{name}").get_config()


def set_field(config, item: str) -> None:
  """Applies ``--set field=value`` (a Python literal, else a string) to a dataclass."""
  key, sep, value = item.partition("=")
  fields = {f.name for f in dataclasses.fields(config)}
  if not sep or key not in fields:
    raise ValueError(f"--set expects field=value with field in {sorted(fields)}, got {item!r}")
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  setattr(config, key, parsed)


def add_resume_flags(parser) -> None:
  """``--fresh`` and ``--force``: what to do with a workdir that holds another run."""
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--fresh", action="store_true",
                     help="delete the workdir's checkpoints and logs and start over")
  group.add_argument("--force", action="store_true",
                     help="resume even if the saved config differs from this one")


def apply_args(config, args, flags) -> None:
  """Copies the flags in ``flags`` that were given, then applies every ``--set``."""
  for flag in flags:
    value = getattr(args, flag)
    if value is not None:
      setattr(config, flag, value)
  for item in args.set:
    set_field(config, item)
