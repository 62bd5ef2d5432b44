"""Command line of the classification examples.

    python -m examples.classification.main --config mnist_mlp --method blaq \\
        --workdir runs/mnist_mlp_blaq_s0 [--bits 1 --a 0.6 --m 5 --seed 0 \\
        --num-epochs 10 --data-dir DIR --download] [--fresh | --force]

``--eval-packed FILE`` evaluates the packed model a run wrote
(``<workdir>/model_packed.npz``: packed weights and batch-norm statistics)
on the test set as it is served, packed on the device and unpacked inside the
jitted step; with the run's ``--config`` and flags, its ``test_acc`` equals
the run's final one exactly.

``--config`` names a module in ``configs/`` (``mnist_mlp``, ``mnist_lenet5``,
``fashion_lenet5``, ``cifar10_vgg``, and the paper's protocol
``paper_mnist_mlp``, ``paper_mnist_lenet5``, ``paper_fashion_lenet5``,
``paper_cifar10_vgg``, whose learning-rate schedule ``--schedule-reading
reference|appendix`` picks); every flag overrides that config, and
``--set field=value`` (repeatable) overrides any other field of
:class:`examples.classification.configs.base.Config`; flags and ``--set`` are parsed
by the type of the field (``--set batch_size=abc`` is a one-line error naming
``batch_size``; dicts and tuples as Python literals, e.g. ``--set
'model_kwargs={"hidden": (512, 512, 512)}'``).

Running the same command again resumes from the latest checkpoint in
``--workdir``; a different config there is refused before any data is read
(``--fresh`` moves the old run aside and starts over, ``--force`` resumes
anyway if the saved state fits), as in the ImageNet example. Every flag is
checked first: a bad value is one line on stderr naming the flag (exit
status 2). Each epoch prints the steps it skipped (non-finite loss, gradient
or weights); ``--set max_consecutive_skips=N`` stops the run after N in a row.
"""

from __future__ import annotations

import argparse

from examples import config_cli
from examples import methods
from examples.classification import train
from examples.classification.configs import base

CONFIGS = ("mnist_mlp", "mnist_lenet5", "fashion_lenet5", "cifar10_vgg",
           "paper_mnist_mlp", "paper_mnist_lenet5", "paper_fashion_lenet5", "paper_cifar10_vgg")

# Config fields with a flag of their own (typed by base.Config, as --set is).
FLAGS = ("method", "bits", "scheme", "a", "m", "seed", "num_epochs", "learning_rate",
         "batch_size", "train_subset", "test_subset", "val_split", "loss", "track_weights",
         "track_last_epochs", "data_dir", "stop_after_epoch")


def get_config(name: str) -> base.Config:
  return config_cli.load_config("examples.classification", name, CONFIGS)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description="Train a low-bit classifier (blaq_jax).")
  parser.add_argument("--config", required=True, choices=CONFIGS)
  parser.add_argument("--workdir", help="metrics, checkpoints, packed model (required unless "
                      "--eval-packed)")
  config_cli.add_field_flags(parser, base.Config(), FLAGS,
                             choices={"method": tuple(methods.METHODS), "loss": base.LOSSES})
  parser.add_argument("--schedule-reading", choices=("reference", "appendix"), default=None,
                      help="the paper's learning-rate schedule, read as its reference code "
                           "or its appendix does (configs/paper.py); flags still override")
  parser.add_argument("--download", action="store_true",
                      help="fetch the canonical files into --data-dir (md5-checked)")
  config_cli.add_resume_flags(parser)
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--no-export", action="store_true")
  parser.add_argument("--eval-packed", metavar="FILE", default=None,
                      help="evaluate the packed model FILE (model_packed.npz of a run with "
                           "the same --config and flags) on the test set, as it is served: "
                           "packed weights on the device, unpacked inside the jitted step")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  args = parser.parse_args(argv)
  if args.workdir is None and args.eval_packed is None:
    parser.error("the following arguments are required: --workdir")
  return args


def main(argv=None):
  args = parse_args(argv)
  config = get_config(args.config)
  if args.schedule_reading:
    from examples.classification.configs import paper
    paper.apply_reading(config, args.schedule_reading)
  if args.download:
    config.download = True
  if args.no_progress:
    config.progress = False
  if args.no_export:
    config.export = False
  config_cli.apply_args(config, args, FLAGS)
  if args.eval_packed:
    result = train.evaluate_packed(config, args.eval_packed)
    print(config_cli.format_summary(
        f"{config.dataset} {config.model} {config.method} {config.bits}-bit, packed model "
        f"{args.eval_packed}", result))
    return result
  result = train.train_and_evaluate(config, args.workdir, fresh=args.fresh, force=args.force)
  keys = ("epoch", "step", "grad_evals", "train_s", "train_loss", "test_acc", "val_acc",
          "osc_flip_frequency")
  row = {k: result["metrics"][k] for k in keys if k in result["metrics"]}
  print(config_cli.format_summary(
      f"{config.dataset} {config.model} {config.method} {config.bits}-bit "
      f"-> {args.workdir}", {**row, **result["summary"]}))
  return result


if __name__ == "__main__":
  config_cli.run_main(main)
