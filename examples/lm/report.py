"""The LM table from ``runs/lm/<name>_s<seed>/summary.json``.

    python -m examples.lm.report --runs runs/lm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from examples.statistics import mean_std

ORDER = ("fp", "bwn-ste", "laq", "blaq-m", "blaq")


def load(runs: Path) -> dict:
  """``{(method, bits): [summary, ...]}`` over the finished runs."""
  out: dict = {}
  for path in sorted(runs.glob("*_s*/summary.json")):
    s = json.loads(path.read_text())
    bits = 32 if s["method"] == "fp" else s["bits"]
    out.setdefault((s["method"], bits), []).append(s)
  return out


def table(groups: dict) -> str:
  key = lambda k: (k[1] if k[1] != 32 else 0, ORDER.index(k[0]) if k[0] in ORDER else 99)
  lines = ["| method | bits | seeds | validation bits per byte | packed KB | of float32 "
           "| step ms (median) | training s |", "|---|---|---|---|---|---|---|---|"]
  for method, bits in sorted(groups, key=key):
    runs = groups[(method, bits)]
    packed = runs[0]["packed_bytes"] / 1024
    lines.append(
        f"| {method} | {'float' if bits == 32 else bits} | {len(runs)} "
        f"| {mean_std([r['val_bpb'] for r in runs], fmt='{:.3f}')} | {packed:.1f} "
        f"| {runs[0]['packed_bytes'] / runs[0]['fp32_bytes']:.3f} "
        f"| {mean_std([r['step_ms_median'] for r in runs], fmt='{:.0f}')} "
        f"| {mean_std([r['train_s'] for r in runs], fmt='{:.0f}')} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/lm")
  args = parser.parse_args(argv)
  groups = load(Path(args.runs))
  print(table(groups) if groups else f"no finished runs under {args.runs}")


if __name__ == "__main__":
  main()
