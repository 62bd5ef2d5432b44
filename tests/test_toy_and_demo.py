"""The 2-D toy and `make demo`, end to end at a reduced size."""

import os

import numpy as np

from examples import demo
from examples import methods
from examples.toy_2d import main as toy_main
from examples.toy_2d import train as toy_train
from helpers import end_to_end

pytestmark = end_to_end


def test_settle_and_flip_counting_on_a_hand_made_trajectory():
  q = np.array([[1.0, -1.0], [-1.0, -1.0], [1.0, -1.0], [0.5, -0.5], [0.5, -0.5], [0.5, -0.5]])
  assert toy_train.count_flips(q) == 2
  loss = np.array([4.0, 3.0, 2.0, 1.0, 1.0, 1.0])
  tr = toy_train.Trajectory("laq", q, q, loss, window_flips=0, window=2)
  assert toy_main.settle_step(tr, window=2) == 3  # signs stop changing at step 2, loss at 3
  assert toy_main.settle_step(tr, window=3) is None


def check_toy(results, steps, out):
  assert len(results) == 3
  for _, _, runs in results:
    assert set(runs) == {"fp", "laq", "blaq"}
    for m, tr in runs.items():
      assert tr.latent.shape == tr.quantized.shape == (steps + 1, len(tr.latent[0]))
      assert np.all(np.isfinite(tr.loss))
      # The tracker's last window (steps 1-100) vs an independent count.
      assert tr.window_flips == toy_train.count_flips(tr.quantized[-101:])
      assert f"| {m.upper()} |" in out
    # Quantized iterates are alpha * sign(w), one alpha per tensor.
    q = runs["laq"].quantized
    np.testing.assert_allclose(np.abs(q), np.broadcast_to(np.abs(q[:, :1]), q.shape), rtol=1e-6)
    np.testing.assert_array_equal(np.sign(q), np.where(runs["laq"].latent >= 0, 1, -1))


def test_demo_end_to_end_at_reduced_size(tmp_path, capsys):
  results = demo.main(["--epochs", "2", "--seeds", "1", "--train-limit", "256",
                       "--toy-steps", "100", "--outdir", str(tmp_path)])
  out = capsys.readouterr().out
  assert os.path.getsize(tmp_path / "digits.png") > 0
  assert os.path.getsize(tmp_path / "toy_2d.png") > 0
  check_toy(results["toy"], 100, out)
  digits = results["digits"]
  assert set(digits) == {methods.get(m).label for m in demo.METHODS}
  for method, res in digits.items():
    assert f"| {method} |" in out
    (run,) = res["runs"]
    assert len(run["curves"]["acc"]) == 2 and 0 <= run["acc"] <= 1
    assert run["flips_total"] >= sum(run["curves"]["flips"]) - 1e-6
  # Two epochs on 256 images already beat chance (10 classes) by far.
  assert digits["FP"]["runs"][0]["acc"] > 0.5


def test_demo_paired_differences():
  runs = lambda accs: {"runs": [{"acc": a} for a in accs]}
  results = {"LAQ": runs([0.90, 0.91, 0.92]), "BLAQ": runs([0.90, 0.92, 0.92]),
             "FP": runs([0.95, 0.96, 0.97])}
  lines = demo.paired_lines(results, test_size=400)
  assert lines[0].startswith("Paired differences against LAQ (points; one test image is 0.25)")
  # BLAQ - LAQ = (0, 1, 0): mean 0.33, half-width 4.303 * 0.577 / sqrt(3) = 1.43.
  assert lines[1] == "  BLAQ - LAQ: +0.33 [-1.10, +1.77] (not resolved)"
  assert lines[2] == "  FP - LAQ: +5.00 [+5.00, +5.00] (higher)"
  assert demo.paired_lines({"LAQ": runs([0.9])}, test_size=400) == []
