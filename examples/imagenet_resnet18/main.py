"""Command line of the ImageNet ResNet18 example.

    python -m examples.imagenet_resnet18.main --workdir runs/r18_blaq_1bit \\
        --config default --data-dir /data/imagenet [--parallel jit] \\
        [--method laq] [--bits 2] [--set batch_size=512 ...] [--multihost]

``--config`` names a module in ``configs/`` (``default``, ``resnet18_2bit``,
``synthetic``, ``paper_resnet18`` — the paper's protocol, BLAQ every 10 epochs
from a full-precision checkpoint given by ``--init-from`` — and
``cifar_imagefolder``). Flags override that config, and ``--set field=value``
(repeatable) overrides any field of :class:`train.Config` (parsed by the
field's type, as the flags are). A run resumes from the latest checkpoint in ``--workdir`` if
that was written with the same config (``--fresh`` starts over, ``--force``
resumes anyway), as in the classification example.
``--eval-packed FILE`` evaluates the packed model a run wrote
(``<workdir>/model_packed.npz``) on the validation set as it is served; with
the run's ``--config`` and flags its ``eval_accuracy`` equals the run's final
one exactly.
``--multihost`` calls ``jax.distributed.initialize()`` first (TPU pod slices,
multi-node GPU clusters); every process runs the same command.
"""

from __future__ import annotations

import argparse
import logging

import jax

from examples import config_cli
from examples.imagenet_resnet18 import train

CONFIGS = ("default", "resnet18_2bit", "synthetic", "paper_resnet18", "cifar_imagefolder")

# Config fields with a flag of their own (typed by train.Config, as --set is).
FLAGS = ("data_dir", "parallel", "method", "bits", "a", "batch_size", "num_train_steps",
         "learning_rate", "seed", "m", "init_from")


def get_config(name: str) -> train.Config:
  return config_cli.load_config("examples.imagenet_resnet18", name, CONFIGS)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description="ResNet18 on ImageNet with LAQ/BLAQ weights.")
  parser.add_argument("--config", default="default", choices=CONFIGS)
  parser.add_argument("--workdir", help="checkpoints, metrics.jsonl and model_packed.npz "
                      "(required unless --eval-packed)")
  config_cli.add_field_flags(parser, train.Config(), FLAGS,
                             choices={"parallel": ("jit", "pmap"),
                                      "method": train.METHODS})
  parser.add_argument("--synthetic", action="store_true", help="random batches, no data")
  parser.add_argument("--multihost", action="store_true",
                      help="call jax.distributed.initialize() (one process per host)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  parser.add_argument("--eval-packed", metavar="FILE", default=None,
                      help="evaluate the packed model FILE (model_packed.npz of a run with "
                           "the same --config and flags) on the validation set, as it is "
                           "served: packed weights on the device, unpacked in the step")
  config_cli.add_resume_flags(parser)
  args = parser.parse_args(argv)
  if args.workdir is None and args.eval_packed is None:
    parser.error("the following arguments are required: --workdir")
  return args


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)   # orbax's chatter
  if args.multihost:
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  config = get_config(args.config)
  if args.synthetic:
    config.synthetic = True
  config_cli.apply_args(config, args, FLAGS)
  logging.info("config %s", config)
  if args.eval_packed:
    result = train.evaluate_packed(config, args.eval_packed)
    print(config_cli.format_summary(
        f"{config.model} {config.method} {config.bits}-bit, packed model "
        f"{args.eval_packed}", result))
    return result
  summary = train.train_and_evaluate(config, args.workdir, fresh=args.fresh, force=args.force)
  summary.pop("state")
  print(config_cli.format_summary(
      f"{config.model} {config.method} {config.bits}-bit -> {args.workdir}", summary))
  return summary


if __name__ == "__main__":
  config_cli.run_main(main)
