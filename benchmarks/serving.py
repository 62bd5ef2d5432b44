"""Serving latency: a model running from its packed weights against the float model.

For each model the float ``ŵ`` (``bq.quantize_params``) and the packed model
(``bq.pack_params``: bit-packed codes plus scales, ``bq.dequantize_tree``
inside the jitted forward pass) are placed on the device, and three jitted
functions are timed one call at a time with ``block_until_ready``,
round-robin (the starting one rotates every round):

  float      forward pass at the float ``ŵ`` (4 bytes per weight on the device)
  packed     the same forward pass from the packed weights, unpacked inside it
  dequantize ``bq.dequantize_tree`` alone (every ``ŵ`` written out): what the
             unpacking costs by itself, for one call

``packed - float`` is what unpacking inside the forward pass costs; at batch 1
the forward pass is small, so it is close to ``dequantize``; at batch 256 it
is spread over the batch. Times are medians over all timed calls. The
logits of packed and float are checked to agree (to float32 rounding).

Models (Flax NNX, from the examples): ``mlp`` (784-2048-2048-2048-10 with
batch norm), ``lenet5`` (28x28x1) and ``resnet18`` (64 filters, 32x32x3
input, 10 classes), with the kernels at ``--bits`` (ResNet18's first
convolution and head at 8 bits, as the ImageNet example trains them).

Usage::

  python -m benchmarks.serving                    # all three, batches 1 and 256
  python -m benchmarks.serving --models mlp --bits 2 --batches 1,64
  python -m benchmarks.serving --quick            # tiny models, seconds (the test runs it)

Results go to ``outputs/serving/serving_<bits>bit.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import blaq_jax as bq
from benchmarks.step_time import git_commit
from examples.classification import models as cls_models
from examples.imagenet_resnet18 import models as r18_models

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "lenet5", "resnet18")


def build(name: str, quick: bool = False):
  """``(model, input shape without batch, spec overrides)``."""
  rngs = nnx.Rngs(0)
  if name == "mlp":
    hidden = (32, 32) if quick else (2048, 2048, 2048)
    return cls_models.MLP(in_features=784, hidden=hidden, rngs=rngs), (28, 28, 1), {}
  if name == "lenet5":
    return cls_models.LeNet5(image_size=28, rngs=rngs), (28, 28, 1), {}
  if name == "resnet18":
    model = r18_models.ResNet18(num_classes=10, num_filters=4 if quick else 64, rngs=rngs)
    return model, (32, 32, 3), {"conv_init": 8, "head": 8}
  raise ValueError(f"--models: unknown model {name!r}; expected some of {MODELS}")


def time_round_robin(fns: dict, rounds: int, calls: int) -> dict:
  """Per function, the seconds of each timed call."""
  names = list(fns)
  times = {n: [] for n in names}
  for i in range(rounds):
    order = names[i % len(names):] + names[:i % len(names)]
    for n in order:
      for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fns[n]())
        times[n].append(time.perf_counter() - t0)
  return times


def tree_bytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def run_model(name: str, bits: int, batches, *, rounds: int, calls: int, quick: bool) -> dict:
  model, shape, overrides = build(name, quick)
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  spec = bq.quant_spec(params, bits=bits, overrides=overrides)
  w_hat = jax.device_put(bq.quantize_params(params, spec))
  packed = jax.device_put(bq.pack_params(params, spec))
  rest = jax.device_put(rest)
  forward = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))
  packed_forward = jax.jit(lambda p, r, x: nnx.merge(graphdef, bq.dequantize_tree(p), r)(x))
  dequantize = jax.jit(bq.dequantize_tree)
  out = {"model": name, "bits": bits, "params": int(sum(x.size for x in jax.tree.leaves(params))),
         "float_bytes": tree_bytes(w_hat), "packed_bytes": tree_bytes(packed),
         "rest_bytes": tree_bytes(rest), "batches": {}}
  for batch in batches:
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(batch), (batch, *shape)))
    fns = {"float": lambda: forward(w_hat, rest, x),
           "packed": lambda: packed_forward(packed, rest, x),
           "dequantize": lambda: dequantize(packed)}
    for fn in fns.values():   # compile and warm up
      jax.block_until_ready(fn())
    np.testing.assert_allclose(np.asarray(fns["packed"]()), np.asarray(fns["float"]()),
                               rtol=1e-5, atol=1e-5)
    times = time_round_robin(fns, rounds, calls)
    out["batches"][str(batch)] = {
        n: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "n": len(t)}
        for n, t in times.items()}
  return out


def environment() -> dict:
  dev = jax.devices()[0]
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      "commit": git_commit(), "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
      "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "jax": jax.__version__, "python": platform.python_version(),
      "command": "python -m benchmarks.serving " + " ".join(sys.argv[1:]),
  }


def markdown(report: dict) -> str:
  env = report["env"]
  lines = [
      f"Serving latency, {env['backend']} ({env['device']}, {env['cpu_count']} cores), "
      f"jax {env['jax']}, commit {env['commit']}, {env['date_utc']} UTC; 1-min load average "
      f"{env['load_avg_1min']}; medians of {report['config']['rounds']} rounds x "
      f"{report['config']['calls']} calls.",
      "",
      "| model | bits | float bytes on device | packed bytes on device | batch | float ms "
      "| packed ms | packed / float | dequantize alone ms |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in report["results"]:
    for batch, t in r["batches"].items():
      f, p, d = (t[k]["median_ms"] for k in ("float", "packed", "dequantize"))
      lines.append(f"| {r['model']} | {r['bits']} | {r['float_bytes']:,} | "
                   f"{r['packed_bytes']:,} | {batch} | {f:.3f} | {p:.3f} | {p / f:.2f} | "
                   f"{d:.3f} |")
  lines += ["", "(bytes: the parameters the forward pass reads from the device; the "
            "batch-norm statistics, the same in both, are left out)"]
  return "\n".join(lines) + "\n"


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
  p.add_argument("--bits", type=int, default=1, help="bits of the kernels (1..8)")
  p.add_argument("--batches", default="1,256", help="comma-separated batch sizes")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--calls", type=int, default=5, help="timed calls per function per round")
  p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "serving"))
  p.add_argument("--quick", action="store_true",
                 help="tiny models, batches 1 and 8, few calls: a smoke run in seconds")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  for m in models:
    if m not in MODELS:
      raise ValueError(f"--models: unknown model {m!r}; expected some of {MODELS}")
  if not 1 <= args.bits <= 8:
    raise ValueError(f"--bits must be in 1..8, got {args.bits}")
  try:
    batches = [int(b) for b in args.batches.split(",") if b]
  except ValueError:
    raise ValueError(f"--batches must be comma-separated integers, got {args.batches!r}") \
        from None
  rounds, calls = args.rounds, args.calls
  if args.quick:
    batches, rounds, calls = [1, 8], 2, 2
  report = {"env": environment(),
            "config": {"models": models, "bits": args.bits, "batches": batches,
                       "rounds": rounds, "calls": calls, "quick": args.quick},
            "results": [run_model(m, args.bits, batches, rounds=rounds, calls=calls,
                                  quick=args.quick) for m in models]}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"serving_{args.bits}bit{'_quick' if args.quick else ''}"
  stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
  stem.with_suffix(".md").write_text(markdown(report))
  print(markdown(report))
  print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
  return report


if __name__ == "__main__":
  main()
