"""The GPU evidence of blaq_jax in one command: step times, the PyTorch reference,
the ImageNet example's throughput and the paper-size reproductions.

    python -m benchmarks.gpu_suite --out outputs/gpu_suite [--data-dir DATA] \\
        [--cifar-dir data/cifar10] [--seeds 0,1,2] [--concurrency 6]
    python -m benchmarks.gpu_suite --dry-run --out /tmp/suite   # CPU, tiny, seconds

Parts, each skipped with a printed reason when what it needs is missing
(torch, grain, data, a blaq_jax method):

1. ``step_time`` (``benchmarks/step_time.py``): ResNet18 224² batch 256
   bfloat16, ResNet18 32² batch 256 and the MNIST MLP at batch 100, methods
   fp, bwn-ste@1, laq@1, laq@2, blaq@1 and blaq-m@1 (the two-stage update on
   one step in 10); means and medians.
2. ``torch_bwn_ste`` (``benchmarks/torch_bwn_ste.py``): PyTorch eager BWN-STE
   ResNet18 at the same batch and size.
3. ``imagenet_synthetic``: the ResNet18 example, synthetic batches, jit data
   parallel, LAQ and BLAQ, images per second.
4. ``paper_runs``: ``paper_mnist_mlp`` and ``paper_fashion_lenet5`` with fp,
   bwn-ste, laq, blaq and blaq-m, 3 seeds, ``--concurrency`` processes at once
   on the one GPU; the report table of each (``report --paper``).
5. ``cifar10_vgg``: ``paper_cifar10_vgg`` when ``--cifar-dir`` holds
   ``cifar-10-batches-py``.

Writes ``suite.json`` and ``suite.md`` (plus each part's own files) into
``--out``; the ratios against the GPU targets come from the side-by-side
measurements of part 1 (ResNet18 224²) and part 2. ``--dry-run`` runs every part
at tiny sizes on the CPU, with fake MNIST-format data written into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

STEP_METHODS = ("fp", "bwn-ste@1", "laq@1", "laq@2", "blaq@1", "blaq-m@1")
STEP_M = 10   # blaq-m: the two-stage update on one step in STEP_M
# (model, batch, dtype) on the GPU
STEP_MODELS = (("resnet18_imagenet", 256, "bfloat16"), ("resnet18_cifar", 256, "float32"),
               ("mlp", 100, "float32"))
PAPER_CONFIGS = ("paper_mnist_mlp", "paper_fashion_lenet5")
PAPER_METHODS = ("fp", "bwn-ste", "laq", "blaq", "blaq-m")
# (name, numerator, denominator, target, statistic): the GPU targets.
TARGETS = (
    ("LAQ / Adam", "laq@1", "fp", 1.03, "median_ms"),
    ("2-bit LAQ / Adam", "laq@2", "fp", 1.05, "median_ms"),
    ("BLAQ every step / LAQ", "blaq@1", "laq@1", 1.90, "median_ms"),
    ("BLAQ every 10th step / LAQ", "blaq-m@1", "laq@1", 1.12, "mean_ms"),
    ("blaq_jax LAQ / PyTorch eager BWN-STE", "laq@1", "torch_bwn_ste", 0.80, "median_ms"),
)


def log(msg: str) -> None:
  print(f"[gpu_suite] {msg}", flush=True)


def part_step_time(out: Path, dry: bool) -> dict:
  from benchmarks import step_time
  methods = STEP_METHODS if not dry else ("fp", "laq@1", "blaq@1", "blaq-m@1")
  models = (("mlp_tiny", 16, "float32"),) if dry else STEP_MODELS
  results = {}
  for model, batch, dtype in models:
    argv = ["--model", model, "--batch", str(batch), "--dtype", dtype,
            "--methods", ",".join(methods), "--m", str(STEP_M), "--out", str(out / "step_time")]
    argv += (["--warmup", "1", "--rounds", "2", "--steps", "2", "--no-components"] if dry
             else ["--rounds", "5", "--steps", "20"])
    report = step_time.main(argv)
    results[f"{model}_b{batch}_{dtype}"] = {
        # A scheduled method's mean is its schedule's: (active + (m-1) inactive) / m.
        name: {"median_ms": r["time"]["median_ms"],
               "mean_ms": r["time"].get("schedule_mean_ms", r["time"]["mean_ms"]),
               "grad_evals": r["grad_evals"]} for name, r in report["results"].items()}
  return {"status": "ok", "results": results}


def part_torch(out: Path, dry: bool) -> dict:
  from benchmarks import torch_bwn_ste
  kw = dict(batch=2, image_size=32, num_classes=10, steps=2, warmup=1) if dry else {}
  result = torch_bwn_ste.run(**kw)
  if "skipped" in result:
    return {"status": "skipped", "reason": result["skipped"]}
  (out / "torch_bwn_ste.json").write_text(json.dumps(result, indent=1))
  return {"status": "ok", "result": result}


def part_imagenet(out: Path, dry: bool) -> dict:
  try:
    import grain  # noqa: F401
  except ImportError:
    return {"status": "skipped", "reason": "grain is not installed (pip install '.[examples]')"}
  import dataclasses
  from examples.imagenet_resnet18 import main as inet_main
  from examples.imagenet_resnet18 import train as inet_train
  results = {}
  for opt in ("laq", "blaq"):
    config = inet_main.get_config("synthetic")
    config = dataclasses.replace(config, method=opt, parallel="jit")
    if dry:
      config = dataclasses.replace(config, model="ResNet1", num_filters=4, image_size=32,
                                   num_classes=10, batch_size=8, num_train_steps=2,
                                   log_every_steps=2, checkpoint_every_steps=10**9)
    summary = inet_train.train_and_evaluate(config, str(out / "imagenet_synthetic" / opt))
    results[opt] = {"images_per_sec": summary.get("images_per_sec"), "steps": summary["step"],
                    "batch": config.batch_size, "image_size": config.image_size}
  return {"status": "ok", "results": results}


def _fake_idx_data(root: Path) -> Path:
  """Tiny MNIST / Fashion-MNIST IDX files (class = brightness) for the dry run."""
  from examples.classification import input_pipeline as ip
  rng = np.random.default_rng(0)
  for name in ("mnist", "fashion_mnist"):
    (root / name).mkdir(parents=True, exist_ok=True)
    for n, prefix in ((48, "train"), (16, "t10k")):
      y = rng.integers(0, 10, n)
      x = (rng.integers(0, 40, (n, 28, 28)) + (y * 20)[:, None, None]).astype(np.uint8)
      ip.write_idx(root / name / f"{prefix}-images-idx3-ubyte.gz", x)
      ip.write_idx(root / name / f"{prefix}-labels-idx1-ubyte.gz", y.astype(np.uint8))
  return root


def run_jobs(jobs: list[tuple[list[str], Path]], concurrency: int) -> dict[str, int]:
  """Runs ``python -m ...`` commands, ``concurrency`` at a time; returns exit codes."""
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if concurrency > 1:  # several processes share the one GPU
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  pending, running, codes = list(jobs), [], {}
  while pending or running:
    while pending and len(running) < concurrency:
      argv, log_path = pending.pop(0)
      log_path.parent.mkdir(parents=True, exist_ok=True)
      f = open(log_path, "w")
      running.append((subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT,
                                       cwd=REPO_ROOT, env=env), f, log_path))
    for proc, f, log_path in list(running):
      if proc.poll() is not None:
        f.close()
        codes[str(log_path)] = proc.returncode
        running.remove((proc, f, log_path))
        if proc.returncode:
          log(f"FAILED ({proc.returncode}): see {log_path}")
    time.sleep(0.2)
  return codes


def _paper_jobs(group_dir: Path, configs, methods, seeds, extra) -> list:
  jobs = []
  for config in configs:
    for seed in seeds:
      for method in methods:
        workdir = group_dir / config / f"{method}_s{seed}"
        argv = ["-m", "examples.classification.main", "--config", config, "--method", method,
                "--seed", str(seed), "--workdir", str(workdir), "--no-progress",
                *extra(config)]
        jobs.append((argv, workdir.parent / f"{method}_s{seed}.log"))
  return jobs


def part_paper(out: Path, dry: bool, data_dir: str | None, seeds, concurrency: int,
               configs=PAPER_CONFIGS, group="paper_runs") -> dict:
  from examples.classification import report
  from examples.metrics_io import best_validation
  methods = list(PAPER_METHODS)
  if dry:
    data_dir = str(_fake_idx_data(out / "dry_data"))
    methods, seeds = [m for m in methods if m in ("fp", "laq")], seeds[:1]
    tiny = ["--num-epochs", "1", "--batch-size", "16", "--val-split", "16", "--no-export",
            "--set", "plot=False", "--set", "checkpoint=False", "--set", "eval_batch_size=16"]
    mlp = ("model_kwargs={'hidden': (16,), 'head_norm': True, 'bn_eps_on_std': True, "
           "'bn_eps': 1e-4}")

    def extra(config):
      return ["--data-dir", data_dir, *tiny] + (["--set", mlp] if "mlp" in config else [])
    configs = configs[:1]
  else:
    def extra(config):
      flags = ["--data-dir", data_dir] if data_dir else []
      return flags + ["--set", "plot=False"]
  group_dir = out / group
  codes = run_jobs(_paper_jobs(group_dir, configs, methods, seeds, extra), concurrency)
  runs = report.load_runs(group_dir, with_config=True)
  tables = {c: report.paper_table(runs[c]) for c in configs if c in runs}
  summary = {}
  for c in configs:
    for name, by_seed in runs.get(c, {}).items():
      finals = [best_validation(rows).get("test_acc_at_best_val") for rows, _ in by_seed.values()]
      lasts = [rows[-1]["test_acc"] for rows, _ in by_seed.values()]
      summary[f"{c}/{name}"] = {"seeds": sorted(by_seed), "test_acc_at_best_val": finals,
                                "test_acc_last": lasts,
                                "train_s": [rows[-1]["train_s"] for rows, _ in by_seed.values()]}
  failed = [k for k, v in codes.items() if v]
  return {"status": "failed" if failed else "ok", "failed_logs": failed, "tables": tables,
          "results": summary, "concurrency": concurrency}


def part_cifar(out: Path, dry: bool, cifar_dir: str | None, seeds, concurrency) -> dict:
  from examples.classification import input_pipeline as ip
  if dry:
    return {"status": "skipped", "reason": "dry run: no CIFAR-10 run at tiny size (the "
            "paper_cifar10_vgg config runs one tiny epoch in tests/test_paper_protocol.py)"}
  try:
    ip.find_cifar10_dir(cifar_dir)
  except (ip.DataNotFoundError, ValueError) as e:
    return {"status": "skipped", "reason": f"no CIFAR-10 data: {e}"}
  return part_paper(out, False, cifar_dir, seeds, concurrency, configs=("paper_cifar10_vgg",),
                    group="cifar10_runs")


def ratios(parts: dict, dry: bool) -> list[dict]:
  st = parts.get("step_time", {}).get("results", {})
  key = "mlp_tiny_b16_float32" if dry else "resnet18_imagenet_b256_bfloat16"
  times = dict(st.get(key, {}))
  torch_res = parts.get("torch_bwn_ste", {}).get("result")
  if torch_res:
    times["torch_bwn_ste"] = torch_res
  out = []
  for name, num, den, target, stat in TARGETS:
    row = {"ratio": name, "of": f"{num}/{den}", "statistic": stat, "target": target,
           "measured_on": key, "value": None, "meets_target": None}
    if num in times and den in times:
      row["value"] = times[num][stat] / times[den][stat]
      row["meets_target"] = bool(row["value"] <= target)
    else:
      missing = [m for m in (num, den) if m not in times]
      row["missing"] = missing
    out.append(row)
  return out


def environment() -> dict:
  import jax
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=10).stdout.strip()
  except OSError:
    commit = ""
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
          "device_count": jax.device_count(), "jax": jax.__version__, "commit": commit,
          "python": platform.python_version(),
          "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def markdown(report: dict) -> str:
  env = report["env"]
  dry = " (DRY RUN: tiny sizes, not figures)" if report["dry_run"] else ""
  lines = [f"# blaq_jax GPU suite{dry}",
           "", f"{env['device']} ({env['backend']}, {env['device_count']} device(s)), jax "
           f"{env['jax']}, commit {env['commit']}, {env['date_utc']} UTC.", "",
           "| part | status | note |", "|---|---|---|"]
  for name, p in report["parts"].items():
    notes = [f"{p['seconds']:.0f} s"] if p.get("seconds") is not None else []
    notes += [p["reason"]] if p.get("reason") else []
    lines.append(f"| {name} | {p['status']} | {'; '.join(notes)} |")
  lines += ["", "## Ratios against the targets", "",
            "| ratio | of | statistic | measured | target | meets |", "|---|---|---|---|---|---|"]
  for r in report["ratios"]:
    v = "–" if r["value"] is None else f"{r['value']:.3f}"
    meets = {None: "–", True: "yes", False: "**no**"}[r["meets_target"]]
    lines.append(f"| {r['ratio']} | {r['of']} | {r['statistic']} | {v} | ≤ {r['target']:.2f} "
                 f"| {meets} |")
  st = report["parts"].get("step_time", {}).get("results", {})
  for key, res in st.items():
    lines += ["", f"## step_time {key}", "", "| method | grad evals | median ms | mean ms |",
              "|---|---|---|---|"]
    for name, r in res.items():
      lines.append(f"| {name} | {r['grad_evals']} | {r['median_ms']:.2f} | {r['mean_ms']:.2f} |")
  torch_res = report["parts"].get("torch_bwn_ste", {}).get("result")
  if torch_res:
    lines += ["", f"PyTorch eager BWN-STE ({torch_res['model']}, {torch_res['dtype']}, batch "
              f"{torch_res['batch']}, {torch_res['image_size']}²): median "
              f"{torch_res['median_ms']:.2f} ms, mean {torch_res['mean_ms']:.2f} ms."]
  inet = report["parts"].get("imagenet_synthetic", {}).get("results")
  if inet:
    lines += ["", "## ImageNet example, synthetic batches (jit)", "",
              "| optimizer | batch | image | images/s |", "|---|---|---|---|"]
    for opt, r in inet.items():
      ips = "–" if r["images_per_sec"] is None else f"{r['images_per_sec']:.1f}"
      lines.append(f"| {opt} | {r['batch']} | {r['image_size']} | {ips} |")
  for part in ("paper_runs", "cifar10_vgg"):
    for config, table in report["parts"].get(part, {}).get("tables", {}).items():
      lines += ["", f"## {config}", "", table]
  return "\n".join(lines) + "\n"


PARTS = ("step_time", "torch_bwn_ste", "imagenet_synthetic", "paper_runs", "cifar10_vgg")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "gpu_suite"))
  p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (seconds)")
  p.add_argument("--data-dir", default=None, help="MNIST / Fashion-MNIST IDX files")
  p.add_argument("--cifar-dir", default=None, help="holds cifar-10-batches-py")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--concurrency", type=int, default=None,
                 help="paper runs at once on the one device (default 6; dry run 2)")
  p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  dry = args.dry_run
  seeds = [int(s) for s in args.seeds.split(",") if s]
  concurrency = args.concurrency or (2 if dry else 6)
  report = {"dry_run": dry, "env": environment(), "parts": {}}
  if report["env"]["backend"] == "cpu" and not dry:
    log("WARNING: no GPU found; the figures of this run are CPU figures")
  calls = {
      "step_time": lambda: part_step_time(out, dry),
      "torch_bwn_ste": lambda: part_torch(out, dry),
      "imagenet_synthetic": lambda: part_imagenet(out, dry),
      "paper_runs": lambda: part_paper(out, dry, args.data_dir, seeds, concurrency),
      "cifar10_vgg": lambda: part_cifar(out, dry, args.cifar_dir, seeds, concurrency),
  }
  for name in [p for p in args.parts.split(",") if p]:
    if name not in calls:
      raise ValueError(f"--parts: unknown part {name!r}; expected a subset of {PARTS}")
    t0 = time.perf_counter()
    log(f"part {name} ...")
    try:
      result = calls[name]()
    except Exception as e:  # one part failing must not lose the others
      result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    result["seconds"] = time.perf_counter() - t0
    if result["status"] == "skipped":
      log(f"part {name} skipped: {result['reason']}")
    report["parts"][name] = result
  report["ratios"] = ratios(report["parts"], dry)
  (out / "suite.json").write_text(json.dumps(report, indent=1, default=str))
  (out / "suite.md").write_text(markdown(report))
  log(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")
  return report


if __name__ == "__main__":
  main()
