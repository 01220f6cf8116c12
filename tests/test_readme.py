"""The README stays true: its test command is what CI runs, and its file tree names every module."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]


def readme_commands():
  text = (ROOT / "README.md").read_text()
  return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_exactly_two_commands_at_the_top_and_ci_runs_the_test_one():
  commands = readme_commands()
  main_cmd, test_cmd = commands[0], commands[1]
  assert "python -m omniopd_jax.main --config=configs/math.py:demo" in main_cmd
  assert test_cmd.startswith("pip install -e '.[test]'") and "pytest" in test_cmd
  ci = (ROOT / ".ci" / "run").read_text()
  assert (
    test_cmd.replace("pip install -e", "pip install -q -e").replace(
      "pip install --no-deps", "pip install -q --no-deps"
    )
    in ci
  )


def test_file_tree_lists_every_module_and_script():
  text = (ROOT / "README.md").read_text()
  tree = text.split("## File tree", 1)[1].split("```", 2)[1]
  listed = {line.split()[0] for line in tree.splitlines() if line.strip()}
  files = [
    *ROOT.glob("omniopd_jax/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("launch/*"),
    *ROOT.glob("configs/*.py"),
  ]  # fmt: skip
  missing = [
    str(f.relative_to(ROOT)) for f in files
    if f.name != "__init__.py" and str(f.relative_to(ROOT)) not in listed
  ]  # fmt: skip
  assert not missing, f"README file tree lacks {missing}"
