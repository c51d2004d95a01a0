"""The package's structure: dependencies run one way, files stay small, predict loads no training.

The layers, bottom to top: common; models, data, datasets, checkpoints,
evaluation, configs; training and inference (never importing each other);
the commands (`scoat_jax/main.py`, `predict.py`, `followup.py`, `report.py`,
`pseudo_label.py`, ...).
Imports are read from the source (every `import`, also inside functions).
"""
import ast
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scoat_jax"
LEGACY = pathlib.Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoint"
MAX_LINES = 500

# What each top-level part of the package may import (besides itself and `common`).
ALLOWED = {
    "common": set(),
    "configs": {"training", "models"},  # `default.py:<arg>`: a loss's or a network's options
    "models": set(),
    "data": set(),
    "datasets": {"data"},
    "checkpoints": {"configs"},
    "evaluation": {"models", "data", "checkpoints", "configs"},
    "training": {"models", "data", "datasets", "checkpoints", "evaluation", "configs"},
    "inference": {"models", "data", "datasets", "checkpoints", "evaluation", "configs"},
}
COMMANDS = {"main", "predict", "followup", "report", "sweep", "evaluate", "export", "pseudo_label"}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports() -> dict[str, set[str]]:
  """scoat_jax module -> the scoat_jax modules it imports (absolute names)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        found |= {a.name for a in node.names if a.name.startswith("scoat_jax")}
      elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scoat_jax"):
        for a in node.names:
          sub = f"{node.module}.{a.name}"
          found.add(sub if sub in modules else node.module)
    graph[name] = {m for m in found if m != name}
  return graph


def _part(module: str) -> str:
  return module.split(".")[1] if module.count(".") else "scoat_jax"


def test_dependencies_run_one_way():
  broken = []
  for module, imported in _imports().items():
    part = _part(module)
    if part in COMMANDS or part == "scoat_jax":
      continue
    for other in imported:
      target = _part(other)
      if target not in (part, "common", "scoat_jax") and target not in ALLOWED[part]:
        broken.append(f"{module} imports {other}")
  assert not broken, broken


def test_no_import_cycles():
  graph = _imports()
  # A package's __init__ importing its own submodules is how a package exposes them,
  # not a cycle between layers: leave those edges out.
  edges = {m: {o for o in deps if not o.startswith(m + ".")} for m, deps in graph.items()}
  state, cycles = {}, []

  def visit(m, path):
    state[m] = "open"
    for o in sorted(edges.get(m, ())):
      if state.get(o) == "open":
        cycles.append(path[path.index(o):] + [o] if o in path else [m, o])
      elif o not in state:
        visit(o, path + [o])
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      visit(m, [m])
  assert not cycles, cycles


def test_files_stay_under_500_lines():
  long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
  assert not long, long


def test_docs_name_no_folder_outside_the_repository():
  texts = list(PACKAGE.rglob("*.py")) + [ROOT / "README.md", *ROOT.glob("docs/*.md"),
                                         ROOT / "benchmarks" / "README.md"]
  offenders = [str(p.relative_to(ROOT)) for p in texts
               if p.exists() and "../shared" in p.read_text(encoding="utf-8")]
  assert not offenders, offenders


def test_predict_loads_nothing_of_training(tmp_path):
  """`python -m scoat_jax.predict` segments a scan without optax, grain or TFDS."""
  from scoat_jax.data import ct_io
  scan = np.load(LEGACY.parent / "legacy_prediction.npz")["hu"]
  ct_io.write_ct(scan, ct_io.Geometry((scan.shape[2], scan.shape[1], scan.shape[0]),
                                      (1.4, 1.4, 5.0)), tmp_path / "scan.nii.gz")
  probe = (
      "import json, runpy, sys\n"
      "sys.argv = ['scoat_jax.predict'] + sys.argv[1:]\n"
      "try:\n"
      "  runpy.run_module('scoat_jax.predict', run_name='__main__', alter_sys=True)\n"
      "except SystemExit as e:\n"
      "  code = e.code or 0\n"
      "else:\n"
      "  code = 0\n"
      "print(json.dumps({'code': code, 'loaded': sorted(m for m in ('optax', 'grain', "
      "'tensorflow_datasets', 'scoat_jax.training', 'scoat_jax.datasets') if m in sys.modules)}))\n")
  proc = subprocess.run(
      [sys.executable, "-c", probe, f"--checkpoint={LEGACY}", f"--input={tmp_path / 'scan.nii.gz'}",
       f"--output={tmp_path / 'out'}", "--compilation_cache_dir="],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["code"] == 0, proc.stderr[-2000:]
  assert (tmp_path / "out" / "scan_mask.nii.gz").exists()
  assert result["loaded"] == [], result["loaded"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_modules_are_thin(name):
  """A command defines flags and calls the library; its logic lives in the packages."""
  lines = (PACKAGE / f"{name}.py").read_text(encoding="utf-8").splitlines()
  assert len(lines) < 100, len(lines)
