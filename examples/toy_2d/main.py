"""Fig. 1 of the BLAQ paper: LAQ vs BLAQ with 1-bit weights on 2-D toy losses.

    python -m examples.toy_2d.main [--steps 2000] [--lr 0.01] [--outdir outputs/toy_2d]

Runs full-precision Adam ("fp"), LAQ and BLAQ on

* ``5 (w1 - 0.054)^2 + (w2 + 0.055)^2`` (the loss of Fig. 1), and
* ``c |w|^{3/2}`` with one weight (where the paper proves that LAQ's update
  with the exact curvature never converges) and its 2-weight version
  ``c (|w1|^{3/2} + |w2|^{3/2})``,

prints a table (final loss at ŵ, code flips over the last 100 steps and in
all, the largest loss over the second half of the run, steps to settle) and
writes ``toy_2d.png`` with the latent and quantized trajectories.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from examples.toy_2d import train

CASES = (
    ("quadratic", "5(w1-0.054)^2+(w2+0.055)^2"),
    ("power_1.5", "c·abs(w)^1.5, one weight"),
    ("power_1.5", "c·(abs(w1)^1.5+abs(w2)^1.5)"),
)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--a", type=float, default=0.6, help="BLAQ's mixing weight")
  p.add_argument("--w0", type=float, nargs=2, default=(-0.2, 0.15),
                 help="start of the quadratic case")
  p.add_argument("--w0-power", type=float, nargs=2, default=(0.5, -0.3),
                 help="start of the |w|^1.5 cases (the one-weight case uses the first)")
  p.add_argument("--outdir", default="outputs/toy_2d")
  p.add_argument("--no-plot", action="store_true")
  return p.parse_args(argv)


def settle_step(tr: train.Trajectory, frac: float = 1e-4, window: int = 100):
  """First step after which ŵ's signs never change again and its loss stays
  within ``frac · (loss_0 - loss_T)`` of the final loss; None (not settled)
  if that step falls in the last ``window`` steps."""
  signs = tr.quantized >= 0
  changed = np.nonzero(np.any(signs[1:] != signs[:-1], axis=1))[0]
  t_code = 0 if changed.size == 0 else int(changed[-1]) + 1
  drop = max(tr.loss[0] - tr.loss[-1], 0.0)
  far = np.nonzero(tr.loss - tr.loss[-1] > frac * drop)[0]
  t_loss = 0 if far.size == 0 else int(far[-1]) + 1
  t = max(t_code, t_loss)
  return None if t > len(tr.loss) - 1 - min(window, len(tr.loss) - 1) else t


def run_all(args):
  """Returns ``[(case, start, {method: Trajectory})]`` for the three cases."""
  starts = (list(args.w0), [args.w0_power[0]], list(args.w0_power))
  out = []
  for (loss_name, label), w0 in zip(CASES, starts):
    runs = {m: train.run(m, loss_name, w0, lr=args.lr, steps=args.steps, a=args.a)
            for m in train.METHODS}
    out.append((label, w0, runs))
  return out


def format_table(results, steps) -> str:
  window = min(100, steps)
  head = (f"| loss | method | final loss at ŵ | flips, last {window} steps | "
          f"flips, all {steps} steps | max loss, 2nd half | steps to settle |")
  lines = [head, "|---|---|---|---|---|---|---|"]
  for label, w0, runs in results:
    for m, tr in runs.items():
      settle = settle_step(tr)
      lines.append(
          f"| {label}, w0={w0} | {m.upper()} | {tr.loss[-1]:.3g} | {tr.window_flips:.0f} | "
          f"{train.count_flips(tr.quantized)} | {tr.loss[len(tr.loss) // 2:].max():.3g} | "
          f"{'not settled' if settle is None else settle} |")
  lines.append("(steps to settle: first step after which the signs of ŵ never change and its "
               "loss stays within 1e-4 of the total loss decrease of its final value; 'not "
               f"settled' if that is within the last {window} steps)")
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
  label, _, runs = results[0]
  fp = runs["fp"]
  lim = max(np.abs(np.concatenate([r.latent for r in runs.values()])).max(), 0.1) * 1.1
  grid = np.linspace(-lim, lim, 200)
  x1, x2 = np.meshgrid(grid, grid)
  z = 5 * (x1 - 0.054) ** 2 + (x2 + 0.055) ** 2
  for ax, m, color in ((axes[0], "laq", "tab:red"), (axes[1], "blaq", "orange")):
    tr = runs[m]
    ax.contour(x1, x2, z, levels=20, colors="lightgray", linewidths=0.6)
    ax.plot(tr.latent[:, 0], tr.latent[:, 1], "k-", lw=1, label=f"{m.upper()} latent w")
    ax.plot(tr.quantized[:, 0], tr.quantized[:, 1], "-", color=color, lw=1, marker=".",
            ms=3, label=f"{m.upper()} quantized ŵ")
    # Drawn last and dashed: the full-precision path must stay visible where
    # it runs along another line.
    ax.plot(fp.latent[:, 0], fp.latent[:, 1], "--", color="tab:blue", lw=1.5, zorder=5,
            label="full-precision Adam")
    ax.plot([0.054], [-0.055], "b*", ms=10, label="minimum")
    ax.set_title(f"{m.upper()}, 1 bit: {label}")
    ax.set_xlabel("w1")
    ax.set_ylabel("w2")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="upper left")
  # Zoom on the quantized iterates near the minimum.
  ax = axes[2]
  for m, color in (("laq", "tab:red"), ("blaq", "orange")):
    q = runs[m].quantized
    ax.plot(q[:, 0], q[:, 1], "-", color=color, lw=1, marker=".", ms=3, label=m.upper())
  ax.plot([0.054], [-0.055], "b*", ms=10)
  ax.set_xlim(-0.12, 0.12)
  ax.set_ylim(-0.12, 0.12)
  ax.set_aspect("equal")
  ax.set_title("quantized iterates ŵ (zoom)")
  ax.legend(fontsize=7)
  ax = axes[3]
  label, _, runs = results[1]
  # LAQ wide underneath, FP thin on top: with one weight the 1-bit projection is
  # exact and the two coincide, so each stays visible (LAQ at the band's edges).
  ax.plot(runs["laq"].quantized[:, 0], color="tab:red", lw=3, label="LAQ")
  fp_w = runs["fp"].quantized[:, 0]
  same = np.allclose(fp_w, runs["laq"].quantized[:, 0], rtol=1e-4, atol=1e-7)
  ax.plot(fp_w, "--", color="tab:blue", lw=0.8, zorder=4,
          label="FP (= LAQ here, drawn over it)" if same else "FP")
  ax.plot(runs["blaq"].quantized[:, 0], color="orange", lw=1.5, zorder=5, label="BLAQ")
  ax.set_yscale("symlog", linthresh=1e-6)
  ax.set_xlabel("step")
  ax.set_ylabel("ŵ")
  ax.set_title(label)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  results = run_all(args)
  print(f"Toy 2-D, 1-bit weights, lr={args.lr}, a={args.a}, {args.steps} steps "
        "(ŵ = alpha·sign(w), one scale per tensor)")
  print(format_table(results, args.steps))
  if not args.no_plot:
    os.makedirs(args.outdir, exist_ok=True)
    path = os.path.join(args.outdir, "toy_2d.png")
    plot(results, path)
    print(f"wrote {path}")
  return results


if __name__ == "__main__":
  main()
