"""The outside reference: a PyTorch eager BWN-STE ResNet18 training step.

Weights of every conv and linear layer are binarised in the forward pass as
``sign(w) · mean|w|`` (per layer) with a straight-through gradient
(``w + (q - w).detach()``), Adam updates the latent weights, which are then
clipped to [-1, 1], as ``bq.ste`` does. torchvision's ``resnet18`` when it is
importable, else an equivalent hand-written ResNet18 (same layers and
parameter count). bfloat16 autocast on CUDA.

    python -m benchmarks.torch_bwn_ste --batch 256 --image-size 224 --out bwn.json

Prints a skip message (and writes ``{"skipped": reason}``) when torch is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _resnet18(num_classes: int):
  try:
    import torchvision
    return torchvision.models.resnet18(num_classes=num_classes), "torchvision"
  except ImportError:
    pass
  from torch import nn

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.down = None
      if stride != 1 or cin != cout:
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
      return (y + (x if self.down is None else self.down(x))).relu()

  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1)]
  cin = 64
  for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
    cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
  return nn.Sequential(*layers), "hand-written"


def run(batch: int = 256, image_size: int = 224, num_classes: int = 1000, steps: int = 20,
        warmup: int = 5, device: str | None = None, lr: float = 1e-3) -> dict:
  """Times the BWN-STE step; returns a dict (``{"skipped": why}`` without torch)."""
  try:
    import torch
  except ImportError:
    print("torch_bwn_ste: skipped, torch is not installed")
    return {"skipped": "torch is not installed"}
  from torch.func import functional_call

  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  model, source = _resnet18(num_classes)
  model = model.to(device).train()
  quantized = {n for n, p in model.named_parameters() if p.ndim >= 2}
  opt = torch.optim.Adam(model.parameters(), lr=lr)
  x = torch.randn(batch, 3, image_size, image_size, device=device)
  y = torch.randint(0, num_classes, (batch,), device=device)
  autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
              else torch.autocast("cpu", enabled=False))

  def step():
    params = {}
    for name, p in model.named_parameters():
      if name in quantized:
        q = torch.sign(p) * p.abs().mean()
        q = torch.where(p == 0, p.abs().mean(), q)     # sign(0) = +1
        params[name] = p + (q - p).detach()
      else:
        params[name] = p
    with autocast:
      loss = torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      for name, p in model.named_parameters():
        if name in quantized:
          p.clamp_(-1, 1)

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  for _ in range(warmup):
    step()
  sync()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    sync()
    times.append(1e3 * (time.perf_counter() - t0))
  return {"model": f"resnet18 ({source})", "device": device,
          "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
          "torch": torch.__version__, "batch": batch, "image_size": image_size,
          "dtype": "bfloat16 autocast" if device == "cuda" else "float32",
          "median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
          "n": len(times)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  result = run(args.batch, args.image_size, steps=args.steps, warmup=args.warmup)
  print(json.dumps(result))
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
