"""The README's commands and CI's: CI must run exactly the README's test command."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return re.findall(r"```bash\n(.*?)\n```", f.read(), re.S)


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
  demo, tests = _readme_commands()[:2]
  assert "python -m m5p.main --config=configs/demo.py --workdir=" in demo
  assert "pytest" in tests
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci_lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
  assert tests.strip() in ci_lines


def test_every_config_file_is_documented():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  for name in os.listdir(os.path.join(ROOT, "configs")):
    if name.endswith(".py"):
      assert f"configs/{name}" in readme, name
