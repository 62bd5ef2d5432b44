"""Command line of the byte-level LM example.

    python -m examples.lm.main --workdir runs/lm/laq_2bit --config default \\
        [--method laq] [--bits 2] [--group-size 64] [--set num_train_steps=4000 ...]

``--config`` names a module in ``configs/`` (``default``, ``tiny``); flags and
``--set field=value`` override its fields (:class:`configs.base.Config`). A run
resumes from the latest checkpoint in ``--workdir`` written with the same
config (``--fresh`` starts over, ``--force`` resumes anyway). On several
devices the run is fully sharded over all of them (``--set fsdp_devices=N``
for fewer); on CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
simulates 8 devices.
"""

from __future__ import annotations

import argparse

from examples import config_cli
from examples.lm.configs.base import METHODS
from examples.lm.configs.base import Config

CONFIGS = ("default", "tiny")
FLAGS = ("method", "bits", "group_size", "a", "m", "batch_size", "learning_rate",
         "num_train_steps", "seed", "corpus_dir")


def get_config(name: str) -> Config:
  return config_cli.load_config("examples.lm", name, CONFIGS)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description="A byte-level transformer LM with 2-8-bit "
                                   "weights, trained fully sharded.")
  parser.add_argument("--config", default="default", choices=CONFIGS)
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, summary")
  config_cli.add_field_flags(parser, Config(), FLAGS, choices={"method": METHODS})
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  config_cli.add_resume_flags(parser)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  config = get_config(args.config)
  config_cli.apply_args(config, args, FLAGS)
  config.validate()
  config_cli.check_workdir(args.workdir)
  from examples.lm import train   # after the flags: a bad flag costs no JAX import

  summary = train.train_and_evaluate(config, args.workdir, fresh=args.fresh, force=args.force)
  summary.pop("state")
  print(config_cli.format_summary(
      f"lm {config.method} {config.bits}-bit (groups of {config.group_size}) -> "
      f"{args.workdir}", summary))
  return summary


if __name__ == "__main__":
  config_cli.run_main(main)
