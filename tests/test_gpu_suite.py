"""The GPU suite's dry run on the CPU: every part runs or says why it is skipped."""

import json

from benchmarks import gpu_suite
from helpers import slow


@slow
def test_gpu_suite_dry_run(tmp_path):
  report = gpu_suite.main(["--dry-run", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "suite.json").read_text())
  md = (tmp_path / "suite.md").read_text()
  assert saved["dry_run"] and "DRY RUN" in md
  parts = saved["parts"]
  assert list(parts) == list(gpu_suite.PARTS)
  for name, part in parts.items():
    assert part["status"] in ("ok", "skipped"), (name, part)
    if part["status"] == "skipped":
      assert part["reason"] and part["reason"] in md
  st = parts["step_time"]["results"]["mlp_tiny_b16_float32"]
  assert {"fp", "laq@1", "blaq@1"} <= set(st)
  assert all(r["median_ms"] > 0 and r["mean_ms"] > 0 for r in st.values())
  assert "blaq-m@1" in st
  ratios = {r["of"]: r for r in saved["ratios"]}
  assert len(ratios) == 5 and ratios["laq@1/fp"]["value"] > 0
  assert ratios["blaq@1/laq@1"]["value"] > 0
  try:
    import torch  # noqa: F401
  except ImportError:
    assert parts["torch_bwn_ste"]["status"] == "skipped"
    assert ratios["laq@1/torch_bwn_ste"]["value"] is None
  paper = parts["paper_runs"]
  assert set(paper["results"]) >= {"paper_mnist_mlp/fp", "paper_mnist_mlp/laq"}
  assert "| laq | 1 |" in md and "## Ratios against the targets" in md
  assert (tmp_path / "step_time" / "mlp_tiny_float32_b16.json").exists()
  assert report["env"]["jax"]
