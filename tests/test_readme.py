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
