"""The README's usage example runs as written and trains."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def usage_block():
  text = README.read_text()
  section = text.split("## Usage", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_opens_with_the_two_commands():
  text = README.read_text()
  first = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
  assert first.splitlines()[0].startswith("make demo")
  assert first.splitlines()[1].startswith("make test")


def test_usage_example_runs(capsys):
  code = usage_block()
  assert len([l for l in code.splitlines() if l.strip()]) <= 15
  namespace = {}
  exec(compile(code, str(README), "exec"), namespace)
  printed = float(capsys.readouterr().out.strip())
  jnp, bq = namespace["jnp"], namespace["bq"]
  x, y, params, spec = (namespace[k] for k in ("x", "y", "params", "spec"))
  initial = float(namespace["loss"](bq.quantize_params(
      {"w1": jnp.full((4, 8), 0.1), "w2": jnp.full((8, 1), 0.1), "b": jnp.zeros(1)}, spec), x, y))
  assert printed < 0.5 * initial


def test_public_factories_carry_their_math_and_references():
  """``help(bq.<factory>)`` shows the update and where it comes from, as optax's alias.py."""
  import blaq_jax as bq
  import blaq_jax.contrib as contrib
  names = ["laq", "blaq", "ste", "ste_quantize", "ste_quantize_params",
           "add_oscillation_dampening", "freeze_oscillations", "alpha_blend_params",
           "alpha_blending_schedule", "track_oscillations", "oscillation_stats", "pack",
           "unpack", "quant_spec", "quantize_params", "data_parallel", "pack_params",
           "dequantize", "to_qwix"]
  fns = [getattr(bq, n) for n in names] + [contrib.blaq_reuse, contrib.blaq_model]
  for fn in fns:
    doc = fn.__doc__
    assert "References:" in doc and ("::" in doc or "=" in doc), fn.__name__


def test_host_scheduled_blaq_example_runs(capsys):
  """The README's paper schedule (two compiled steps chosen on the host)
  continues the usage example and keeps training."""
  section = README.read_text().split("## Usage", 1)[1]
  usage, schedule = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
  assert "static_argnames" in schedule and "grad_fn=None" not in schedule
  namespace = {"steps_per_epoch": 2}
  exec(compile(usage, str(README), "exec"), namespace)
  before = float(capsys.readouterr().out.strip())
  exec(compile(schedule, str(README), "exec"), namespace)
  bq, params, state = namespace["bq"], namespace["params"], namespace["state"]
  after = float(namespace["loss"](bq.quantize_params(params, namespace["spec"], state=state),
                                  namespace["x"], namespace["y"]))
  assert after <= before * 1.05
  assert int(state.count) == 200
