"""Jit step time and memory of the methods of ``examples/methods.py``, side by side.

All methods run in one process on the same synthetic batch. Each step is
jit-compiled (params, batch statistics and optimizer state donated), warmed
up, then timed one call at a time with ``block_until_ready``, round-robin over
the methods for several rounds (the starting method rotates every round), so
that background load on a shared machine hits every method alike. A method's
time is summarised by its mean and median over all timed steps; ratios are
ratios of means, with the ratio of medians beside them.

Methods are the registry's (``--methods``, comma-separated): ``fp`` (Adam on
full-precision weights, the reference), ``bwn-ste``, ``laq``, ``blaq`` (the
two-stage update on every step), ``blaq-m``, ``laq-noskip``, ``blaq-noskip``,
``blaq-reuse``, ``blaq-model``, ... Each quantized method runs at every width
of ``--bits`` (default 1 and 2), or at the one width a ``@k`` suffix names
(``laq@4``, k in 1..8); a result is named ``<method>@<bits>`` (``fp`` alone).

``blaq-m`` runs the paper's schedule the fast way: two compiled steps, the
two-stage one on the steps where the registry's ``lookahead_at`` says so (one
in every ``--m``, one "epoch" being one step here) and the one-stage one
(``grad_fn=None``, LAQ's step) on the others, chosen in Python. Its active and
inactive steps are summarised apart, and its mean is the schedule's,
``(active + (m-1) inactive) / m``; each of the three has its ratio to LAQ.

Components (on unless ``--no-components``): ``grad_eval`` is one
``value_and_grad`` of the loss at fixed weights; ``<method>:update`` is the
rest of the step: projection, ``tx.update`` and ``apply_updates``, with BLAQ's
lookahead gradient replaced by an elementwise stand-in. They show what a step
costs beyond its gradient evaluations.

Memory: the optimizer state in bytes, XLA's memory analysis of each compiled
step (arguments + outputs - aliased + temporaries: the step's peak), and the
device's ``peak_bytes_in_use`` where the backend reports it (GPU/TPU; a
process-wide running maximum, recorded after each method's warm-up).

Usage::

  python -m benchmarks.step_time --model mlp
  python -m benchmarks.step_time --model mlp --methods fp,laq@1,laq@4,blaq@1,blaq-m@1 --m 5
  python -m benchmarks.step_time --model resnet18_cifar
  python -m benchmarks.step_time --model lm --bits 2,4
  python -m benchmarks.step_time --model resnet18_imagenet --batch 256 --dtype bfloat16  # GPU
  python -m benchmarks.step_time --quick          # seconds on CPU (the test runs it)

Results go to ``outputs/step_time/<model>_<dtype>_b<batch>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import blaq_jax as bq
from examples import methods as methods_lib

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> input shape (images; a context length for "lm"), classes, batch on an
# accelerator, batch on CPU.
MODELS = {
    "mlp": dict(shape=(28, 28, 1), classes=10, batch=100, cpu_batch=100,
                about="MNIST MLP 784-2048-2048-2048-10 (examples/classification)"),
    "resnet18_cifar": dict(shape=(32, 32, 3), classes=10, batch=256, cpu_batch=32,
                           about="ResNet18 at CIFAR shape 32x32, 10 classes "
                                 "(examples/imagenet_resnet18)"),
    "resnet18_imagenet": dict(shape=(224, 224, 3), classes=1000, batch=256, cpu_batch=4,
                              about="ResNet18 at ImageNet shape 224x224, 1000 classes "
                                    "(examples/imagenet_resnet18)"),
    "mlp_tiny": dict(shape=(28, 28, 1), classes=10, batch=16, cpu_batch=16,
                     about="MNIST MLP 784-32-10 (--quick)"),
    # Byte windows in, next-byte logits out; the classes are the 256 bytes.
    "lm": dict(shape=(128,), classes=256, batch=64, cpu_batch=16,
               about="byte-level transformer LM, 2 layers, width 128, context 128; kernels "
                     "in groups of 64, embeddings and head at 8 bits (examples/lm)"),
}

DEFAULT_METHODS = ("fp", "bwn-ste", "laq", "blaq")
DEFAULT_BITS = (1, 2)

# (numerator, denominator, target on CPU, target on a GPU, blaq-m's m or None);
# None: no target. A target with an m holds for runs with that --m only.
TARGETS = (
    ("laq@1", "fp", 1.15, 1.03, None),
    ("laq@2", "fp", 1.35, 1.05, None),
    ("laq@4", "fp", 1.50, None, None),
    ("laq@8", "fp", 1.60, None, None),
    ("bwn-ste@1", "fp", 1.10, None, None),
    ("blaq@1", "laq@1", 2.20, 2.00, None),
    ("blaq-m@1", "laq@1", 1.25, None, 5),
    ("blaq-m@1:inactive", "laq@1", 1.03, None, 5),
    ("blaq-m@1:active", "laq@1", None, None, 5),
    ("blaq-m@1", "laq@1", 1.15, 1.12, 10),
    ("blaq-m@1:inactive", "laq@1", 1.03, None, 10),
    ("blaq-m@1:active", "laq@1", None, None, 10),
    ("blaq@2", "laq@2", None, None, None),
    ("laq-noskip@1", "fp", None, None, None),
    ("blaq-reuse@1", "laq@1", None, None, None),
    ("blaq-model@1", "laq@1", None, None, None),
)


@dataclasses.dataclass
class Bench:
  """One entry of the registry at one width, ready to step."""

  method: methods_lib.Method
  bits: int | None           # None: full precision (no quantized leaf)
  options: methods_lib.Options
  tx: optax.GradientTransformation
  spec: Any = None

  @property
  def name(self) -> str:
    return self.method.name if self.bits is None else f"{self.method.name}@{self.bits}"

  @property
  def grad_evals(self) -> float:
    """Gradient evaluations per step, on average over the lookahead period."""
    return self.method.grad_evals_per_step(self.options)

  @property
  def period(self) -> int:
    """Steps in one period of the lookahead (1: the same step every time)."""
    o = self.options
    kinds = {self.method.lookahead_at(o, s) for s in range(o.m * o.steps_per_epoch)}
    return o.m * o.steps_per_epoch if len(kinds) == 2 else 1


# ----------------------------------------------------------------------------
# Model, loss and methods


def build_model(name: str, dtype, seed: int = 0):
  """Returns ``(model, apply)`` with ``apply(model, x) -> logits`` (training mode)."""
  info = MODELS[name]
  if not name.startswith("resnet") and dtype != jnp.float32:
    raise ValueError(f"--dtype: {name} runs in float32 only, got {jnp.dtype(dtype).name}")
  if name in ("mlp", "mlp_tiny"):
    from examples.classification import models as cls_models
    hidden = (2048, 2048, 2048) if name == "mlp" else (32,)
    model = cls_models.MLP(in_features=int(np.prod(info["shape"])), hidden=hidden,
                           num_classes=info["classes"], rngs=nnx.Rngs(seed))
    return model, lambda m, x: m(x, train=True)
  if name == "lm":
    from examples.lm import train as lm_train
    from examples.lm.configs import base as lm_config
    model = lm_train.build_model(lm_config.Config(seq_len=info["shape"][0]), seed)
    return model, lambda m, x: m(x)
  from examples.imagenet_resnet18 import models as resnet_models
  model = resnet_models.ResNet18(num_classes=info["classes"], dtype=dtype,
                                 rngs=nnx.Rngs(seed))
  model.train()
  return model, lambda m, x: m(x)


def parse_methods(text: str, bits=DEFAULT_BITS) -> list[tuple[methods_lib.Method, int | None]]:
  """``--methods``: registry names, each at every width of ``bits`` or at the
  width of its ``@k`` suffix; ``(entry, bits)`` pairs (bits None for ``fp``)."""
  out = []
  for item in (t.strip() for t in text.split(",")):
    if not item:
      continue
    name, at, width = item.partition("@")
    try:
      method = methods_lib.get(name)
    except ValueError as e:
      raise ValueError(f"--methods: {e}") from None
    if at and not width.isdigit():
      raise ValueError(f"--methods: {item!r}: the width after @ must be an int in 1..8")
    widths = [int(width)] if at else list(bits)
    if not method.quantized:
      if at:
        raise ValueError(f"--methods: {item!r}: {name} has no quantized weights, no width")
      out.append((method, None))
      continue
    for k in widths:
      if not 1 <= k <= 8:
        raise ValueError(f"--methods: {item!r}: widths are 1..8, got {k}")
      out.append((method, k))
  names = [m.name if k is None else f"{m.name}@{k}" for m, k in out]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f"--methods: {', '.join(twice)} named more than once")
  return out


def make_spec(model_name: str, params, bits: int, first_last_bits: int | None):
  """The model's quantization at ``bits``: ResNet's first and last layers at
  ``first_last_bits``; the LM as ``examples/lm`` quantizes it."""
  if model_name == "lm":
    from examples.lm import train as lm_train
    from examples.lm.configs import base as lm_config
    return lm_train.make_spec(lm_config.Config(bits=bits), params)
  overrides = {}
  if model_name.startswith("resnet") and first_last_bits != bits:
    overrides = {r"^conv_init/kernel": first_last_bits, r"^head/kernel": first_last_bits}
  return bq.quant_spec(params, bits=bits, overrides=overrides)


def make_benches(chosen, params, *, lr: float, a: float, m: int, spec_for) -> list[Bench]:
  """A :class:`Bench` per ``(entry, bits)`` of :func:`parse_methods`, quantized by
  ``spec_for(bits)``; blaq-m's "epoch" is one step, so it looks ahead on one
  step in every ``m``."""
  options = methods_lib.Options(a=a, m=m, steps_per_epoch=1)
  out = []
  for method, bits in chosen:
    spec = None if bits is None else spec_for(bits)
    out.append(Bench(method, bits, options, method.optimizer(lr, spec, options), spec))
  return out


def make_loss(graphdef, apply):
  def loss_fn(params, stats, x, y):
    model = nnx.merge(graphdef, params, stats, copy=True)
    logits = apply(model, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, nnx.state(model, nnx.BatchStat)

  return loss_fn


def make_step(bench: Bench, loss_fn, lookahead: bool = True):
  """The training step of ``bench``: ``examples/methods.py``'s ``Method.step``
  (``lookahead=False``: BLAQ's one-stage step, ``grad_fn=None``)."""
  tx, spec = bench.tx, bench.spec

  def step(params, stats, opt_state, x, y):
    updates, opt_state, loss, new_stats = bench.method.step(
        tx, spec, params, opt_state, lambda p: loss_fn(p, stats, x, y), lookahead=lookahead)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def make_update_only(bench: Bench):
  """The step without its gradient evaluations (given ``g``)."""
  tx, spec, entry = bench.tx, bench.spec, bench.method

  def update_only(params, opt_state, g):
    q = entry.weights(params, spec, opt_state) if entry.quantized else None
    # Elementwise stand-in for BLAQ's lookahead gradient; it reads its argument,
    # so the trial projection is not dead code.
    grad_fn = lambda p: jax.tree.map(lambda w, gw: gw + 1e-12 * w, p, g)
    updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, q

  return update_only


# ----------------------------------------------------------------------------
# Timing


# --clock: wall time, or the process's CPU time over all threads (steadier on
# a loaded machine: another job's time slices are not counted).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class Runner:
  """One compiled function and its arguments; ``carry`` threads the state."""

  def __init__(self, name, compiled, args, carry: int = 0, clock=time.perf_counter):
    self.name, self.compiled, self.args, self.carry = name, compiled, list(args), carry
    self.clock = clock

  def __call__(self) -> float:
    t0 = self.clock()
    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    dt = self.clock() - t0
    if self.carry:
      self.args[:self.carry] = out[:self.carry]
    return dt


class ScheduledRunner(Runner):
  """Two compiled steps on one state: ``active`` on the calls where
  ``lookahead(call)`` holds, ``inactive`` on the others; each call's seconds
  are also kept by kind."""

  def __init__(self, name, active, inactive, args, carry: int, lookahead, period: int,
               clock=time.perf_counter):
    super().__init__(name, inactive, args, carry, clock)
    self.steps = {True: active, False: inactive}
    self.lookahead, self.period, self.calls = lookahead, period, 0
    self.by_kind = {True: [], False: []}

  def __call__(self) -> float:
    active = self.lookahead(self.calls)
    self.calls += 1
    self.compiled = self.steps[active]
    dt = super().__call__()
    self.by_kind[active].append(dt)
    return dt

  def reset(self):
    """Forgets the warm-up calls; the next call is the period's first active
    one, so that a short run times both kinds."""
    self.calls = next(c for c in range(self.period) if self.lookahead(c))
    self.by_kind = {True: [], False: []}


def compile_fn(fn, args, donate=()):
  t0 = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  mem = {}
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    ma = None
  if ma is not None:
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes"):
      mem[key.removesuffix("_in_bytes")] = int(getattr(ma, key, 0) or 0)
    mem["peak_estimate"] = (mem["argument_size"] + mem["output_size"] - mem["alias_size"]
                            + mem["temp_size"])
  return compiled, seconds, mem


def device_peak_bytes() -> int | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  if not stats:
    return None
  return int(stats.get("peak_bytes_in_use", 0)) or None


def round_robin(runners: list[Runner], rounds: int, steps: int) -> dict[str, list[list[float]]]:
  """Per runner, per round, the seconds of each timed call."""
  times = {r.name: [] for r in runners}
  for i in range(rounds):
    order = runners[i % len(runners):] + runners[:i % len(runners)]
    for r in order:
      times[r.name].append([r() for _ in range(steps)])
  return times


def summarize(samples: list[list[float]]) -> dict:
  flat = [t for rnd in samples for t in rnd]
  q10, q90 = np.percentile(flat, [10, 90])
  return {"median_ms": 1e3 * statistics.median(flat), "mean_ms": 1e3 * statistics.fmean(flat),
          "p10_ms": 1e3 * float(q10),
          "p90_ms": 1e3 * float(q90), "min_ms": 1e3 * min(flat), "n": len(flat),
          "round_medians_ms": [1e3 * statistics.median(r) for r in samples]}


def tree_bytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# Environment and output


def git_commit() -> str:
  try:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "blaq_jax", "benchmarks/*.py"],
                           cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    return sha + ("+dirty" if dirty else "")
  except Exception:  # noqa: BLE001
    return "unknown"


def environment() -> dict:
  import flax
  dev = jax.devices()[0]
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      "commit": git_commit(),
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "cpu": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
      "python": platform.python_version(),
      "command": "python -m benchmarks.step_time " + " ".join(sys.argv[1:]),
  }


def _timing(results: dict, name: str) -> dict | None:
  """``name``'s time summary; ``<name>:active`` / ``<name>:inactive`` are the
  kinds of a scheduled method, and its plain name's mean is the schedule's."""
  base, _, kind = name.partition(":")
  if base not in results:
    return None
  t = results[base]["time"]
  if kind:
    return t.get("by_kind", {}).get(kind)
  if "schedule_mean_ms" in t:
    return {**t, "mean_ms": t["schedule_mean_ms"]}
  return t


def ratios(results: dict) -> list[dict]:
  out = []
  on_cpu = jax.default_backend() == "cpu"
  for num, den, target_cpu, target_gpu, m in TARGETS:
    a, b = _timing(results, num), _timing(results, den)
    if a is None or b is None or (m is not None and m != results[num.partition(":")[0]]["m"]):
      continue
    per_round = [x / y for x, y in zip(a["round_medians_ms"], b["round_medians_ms"])]
    value = a["mean_ms"] / b["mean_ms"]
    target = target_cpu if on_cpu else target_gpu
    out.append({"ratio": f"{num}/{den}", "value": value,
                "value_of_medians": a["median_ms"] / b["median_ms"],
                "round_min": min(per_round), "round_max": max(per_round), "target": target,
                "meets_target": None if target is None else bool(value <= target)})
  return out


def markdown(report: dict) -> str:
  env, cfg = report["env"], report["config"]
  mb = lambda b: "–" if b is None else f"{b / 2**20:.1f}"
  load = lambda x: "–" if x is None else f"{x:.1f}"
  lines = [
      f"**{cfg['model']}** ({MODELS[cfg['model']]['about']}), batch {cfg['batch']}, "
      f"{cfg['dtype']}; {env['backend']} ({env['device']}, {env['cpu_count']} cores), "
      f"jax {env['jax']}, commit {env['commit']}, {env['date_utc']} UTC; "
      f"{cfg['rounds']} rounds x {cfg['steps']} steps per method after {cfg['warmup']} "
      f"warm-up steps, {cfg.get('clock', 'wall')} clock; "
      f"1-min load average {load(env.get('load_avg_1min'))} at start, "
      f"{load(env.get('load_avg_1min_end'))} at end.",
      "",
      "| method | grad evals | median ms | p10–p90 ms | × fp | opt state MB "
      "| XLA peak MB | device peak MB | compile s |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  fp = report["results"].get("fp")
  for name, r in report["results"].items():
    rows = [(name, r["time"])] + [(f"{name}:{kind}", t)
                                  for kind, t in r["time"].get("by_kind", {}).items()]
    for label, t in rows:
      rel = f"{t['median_ms'] / fp['time']['median_ms']:.3f}" if fp else "–"
      lines.append(
          f"| {label} | {r['grad_evals']} | {t['median_ms']:.2f} | {t['p10_ms']:.2f}–"
          f"{t['p90_ms']:.2f} | {rel} | {mb(r['opt_state_bytes'])} | "
          f"{mb(r['memory'].get('peak_estimate'))} | {mb(r['device_peak_bytes'])} | "
          f"{r['compile_s']:.1f} |")
  if report.get("components"):
    comp = report["components"]
    g = comp["grad_eval"]["median_ms"]
    lines += ["", f"Components: one `value_and_grad` at fixed weights = {g:.2f} ms.", "",
              "| method | step ms | update-only ms (% of step) | step − n·grad_eval ms "
              "(% of step) |", "|---|---|---|---|"]
    for name, r in report["results"].items():
      u = comp.get(f"{name}:update")
      if u is None:
        continue
      step = r["time"]["median_ms"]
      rest = step - r["grad_evals"] * g
      lines.append(f"| {name} | {step:.2f} | {u['median_ms']:.2f} "
                   f"({100 * u['median_ms'] / step:.1f}%) | {rest:.2f} "
                   f"({100 * rest / step:.1f}%) |")
  if report["ratios"]:
    lines += ["", "| ratio | ratio of means | ratio of medians | range over rounds (medians) "
              f"| target ({'CPU' if env.get('backend') == 'cpu' else 'GPU'}) |",
              "|---|---|---|---|---|"]
    for r in report["ratios"]:
      tgt = "–" if r["target"] is None else f"≤ {r['target']:.2f}"
      lines.append(f"| {r['ratio']} | {r['value']:.3f} | {r['value_of_medians']:.3f} | "
                   f"{r['round_min']:.3f}–{r['round_max']:.3f} | {tgt} |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------


def run(model_name: str, *, batch: int | None = None, dtype: str = "float32",
        methods: str = ",".join(DEFAULT_METHODS), bits=DEFAULT_BITS, m: int = 5,
        warmup: int = 3, rounds: int = 5, steps: int | None = None, components: bool = True,
        first_last_bits: int | None = 8, a: float = 0.6, lr: float = 1e-3,
        dump_hlo: str | None = None, profile_dir: str | None = None, seed: int = 0,
        clock: str = "wall") -> dict:
  """Builds, compiles, warms up and times every method of ``methods`` (the
  ``--methods`` text, :func:`parse_methods`); returns the report dict."""
  if model_name not in MODELS:
    raise ValueError(f"--model must be one of {sorted(MODELS)}, got {model_name!r}")
  if m < 1:
    raise ValueError(f"--m must be >= 1, got {m}")
  chosen = parse_methods(methods, bits)
  info = MODELS[model_name]
  on_cpu = jax.default_backend() == "cpu"
  if batch is None:
    batch = info["cpu_batch"] if on_cpu else info["batch"]
  if steps is None:
    steps = 10 if not on_cpu else (2 if model_name == "resnet18_imagenet" else 5)
  env = environment()  # load average at the start
  jdtype = jnp.dtype(dtype).type
  is_resnet = model_name.startswith("resnet")

  model, apply = build_model(model_name, jdtype, seed)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  loss_fn = make_loss(graphdef, apply)
  key_x, key_y = jax.random.split(jax.random.key(seed))
  if model_name == "lm":  # a window of bytes and the next byte at each position
    x = jax.random.randint(key_x, (batch, *info["shape"]), 0, info["classes"])
    y = jax.random.randint(key_y, (batch, *info["shape"]), 0, info["classes"])
  else:
    x = jax.random.normal(key_x, (batch, *info["shape"]), jnp.float32)
    y = jax.random.randint(key_y, (batch,), 0, info["classes"])
  benches = make_benches(
      chosen, params, lr=lr, a=a, m=m,
      spec_for=lambda bits: make_spec(model_name, params, bits, first_last_bits))

  results, runners, hlo = {}, [], {}
  copy = lambda t: jax.tree.map(jnp.copy, t)
  for b in benches:
    p, s = copy(params), copy(stats)
    # Fresh buffers: a state whose leaves share one array (laq/blaq's init did,
    # for `count` and `skipped`) cannot be donated.
    opt_state = copy(b.tx.init(p))
    opt_bytes = tree_bytes(opt_state)
    args = (p, s, opt_state, x, y)
    compiled, compile_s, mem = compile_fn(make_step(b, loss_fn), args, donate=(0, 1, 2))
    if dump_hlo:
      hlo[b.name] = compiled.as_text()
    if b.period > 1:
      inactive, off_s, _ = compile_fn(make_step(b, loss_fn, lookahead=False), args,
                                      donate=(0, 1, 2))
      compile_s += off_s
      if dump_hlo:
        hlo[f"{b.name}:inactive"] = inactive.as_text()
      lookahead = lambda call, b=b: b.method.lookahead_at(b.options, call)
      runner = ScheduledRunner(b.name, compiled, inactive, args, carry=3, lookahead=lookahead,
                               period=b.period, clock=CLOCKS[clock])
      for _ in range(max(warmup, 2) * b.period):  # both steps warm
        runner()
      runner.reset()
    else:
      runner = Runner(b.name, compiled, args, carry=3, clock=CLOCKS[clock])
      for _ in range(warmup):
        runner()
    runners.append(runner)
    results[b.name] = {"method": b.method.name, "bits": b.bits, "m": m,
                       "grad_evals": b.grad_evals, "opt_state_bytes": opt_bytes,
                       "memory": mem, "compile_s": compile_s,
                       "device_peak_bytes": device_peak_bytes()}
    print(f"compiled {b.name} in {compile_s:.1f}s", flush=True)

  comp_runners = []
  if components:
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    compiled, _, _ = compile_fn(value_and_grad, (params, stats, x, y))
    comp_runners.append(Runner("grad_eval", compiled, (params, stats, x, y),
                               clock=CLOCKS[clock]))
    g = jax.tree.map(lambda w: 1e-3 * jnp.ones_like(w), params)
    for b in benches:
      opt_state = b.tx.init(params)
      compiled, _, _ = compile_fn(make_update_only(b), (params, opt_state, g))
      if dump_hlo:
        hlo[f"{b.name}:update"] = compiled.as_text()
      comp_runners.append(Runner(f"{b.name}:update", compiled, (params, opt_state, g),
                                 clock=CLOCKS[clock]))
    for r in comp_runners:
      for _ in range(warmup):
        r()

  if dump_hlo:
    Path(dump_hlo).mkdir(parents=True, exist_ok=True)
    for name, text in hlo.items():
      (Path(dump_hlo) / f"{name.replace(':', '_')}.hlo.txt").write_text(text)

  if profile_dir:
    jax.profiler.start_trace(profile_dir)
  try:
    times = round_robin(runners + comp_runners, rounds, steps)
  finally:
    if profile_dir:
      jax.profiler.stop_trace()

  for name in results:
    results[name]["time"] = summarize(times[name])
  for r in runners:
    if isinstance(r, ScheduledRunner):
      kinds = {kind: summarize([r.by_kind[on]])
               for kind, on in (("active", True), ("inactive", False)) if r.by_kind[on]}
      results[r.name]["time"]["by_kind"] = kinds
      if len(kinds) == 2:  # the schedule's mean: its active steps' share of a period
        share = sum(map(r.lookahead, range(r.period))) / r.period
        results[r.name]["time"]["schedule_mean_ms"] = (
            share * kinds["active"]["mean_ms"] + (1 - share) * kinds["inactive"]["mean_ms"])
  report = {
      "env": env,
      "config": {"model": model_name, "batch": batch, "dtype": jnp.dtype(jdtype).name,
                 "methods": [b.name for b in benches], "m": m, "warmup": warmup, "rounds": rounds,
                 "steps": steps, "clock": clock,
                 "first_last_bits": first_last_bits if is_resnet else None,
                 "a": a, "lr": lr, "param_bytes": tree_bytes(params),
                 "num_params": int(sum(p.size for p in jax.tree.leaves(params)))},
      "results": results,
      "components": {r.name: summarize(times[r.name]) for r in comp_runners},
      "device_peak_bytes_final": device_peak_bytes(),
  }
  report["env"]["load_avg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  report["ratios"] = ratios(results)
  return report


def save(report: dict, out_dir) -> Path:
  cfg = report["config"]
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = out_dir / f"{cfg['model']}_{cfg['dtype']}_b{cfg['batch']}"
  stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
  stem.with_suffix(".md").write_text(markdown(report))
  return stem.with_suffix(".json")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.step_time", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="mlp", choices=sorted(MODELS))
  p.add_argument("--batch", type=int, default=None,
                 help="default: the model's batch (smaller on CPU)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of ResNet18 (params stay float32)")
  p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                 help="comma-separated names of examples/methods.py, each optionally at one "
                      "width: 'fp,laq,blaq' or 'fp,laq@1,laq@4,blaq-m@1'")
  p.add_argument("--bits", default=",".join(map(str, DEFAULT_BITS)),
                 help="the widths of the methods named without @k (comma-separated, 1..8)")
  p.add_argument("--m", type=int, default=5,
                 help="blaq-m: the two-stage update on one step in every m")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                 help="wall time, or the process's CPU time (all threads; steadier under load)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=None, help="timed steps per method per round")
  p.add_argument("--no-components", action="store_true",
                 help="skip timing grad_eval and the update-only parts")
  p.add_argument("--first-last-bits", default="8",
                 help="ResNet: bits of conv_init and head kernels ('none': same as the rest)")
  p.add_argument("--a", type=float, default=0.6, help="BLAQ's mixing weight")
  p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "step_time"))
  p.add_argument("--dump-hlo", default=None, help="directory for the compiled HLO text")
  p.add_argument("--profile", default=None, help="jax.profiler trace directory")
  p.add_argument("--quick", action="store_true",
                 help="tiny MLP, few steps: a smoke run in seconds on CPU")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  try:
    bits = tuple(int(k) for k in args.bits.split(",") if k.strip())
  except ValueError:
    raise ValueError(f"--bits: comma-separated ints in 1..8, got {args.bits!r}") from None
  flb = None if args.first_last_bits.lower() == "none" else int(args.first_last_bits)
  kwargs = dict(batch=args.batch, dtype=args.dtype, methods=args.methods, bits=bits, m=args.m,
                warmup=args.warmup,
                rounds=args.rounds, steps=args.steps, components=not args.no_components,
                first_last_bits=flb, a=args.a, dump_hlo=args.dump_hlo,
                profile_dir=args.profile, clock=args.clock)
  model = args.model
  if args.quick:
    model = "mlp_tiny"
    kwargs.update(warmup=1, rounds=2, steps=2 if args.steps is None else args.steps)
  report = run(model, **kwargs)
  path = save(report, args.out)
  print(markdown(report))
  print(f"wrote {path} and {path.with_suffix('.md')}")
  return report


if __name__ == "__main__":
  main()
