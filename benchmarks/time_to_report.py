"""Time to a report: one 512 x 512 x 300 chest CT through `scoat_jax.predict`, per recipe.

    python benchmarks/time_to_report.py [--recipes=semiseg_all,semiseg_all_gpu,cv_fold0,demo]
        [--checkpoint=NAME=PATH ...] [--depth=300 --slice_mm=1.25] [--json]

A hospital runs `python -m scoat_jax.predict --checkpoint=MODEL --input=SCAN
--output=DIR` once per scan: a fresh process that reads the scan, finds the lung
mask, runs the network over the lungs' slices, applies the lung rule and the
post-processing, and writes the mask, the key-image page and the report. This
script times exactly that command, twice per recipe (the first run fills the
persistent compilation cache as a user's first run does; the second is what
every later scan costs), on a phantom scan of `--depth` slices of 512 x 512
written as NIfTI (240 mm of chest in a 375 mm scan at the defaults, so neck and
abdomen lie beyond the lungs as on a clinical scan).

Each recipe (`launch/<name>.cfg`) is timed with a model of its network, input
size and intensity: a trained model where `--checkpoint=NAME=PATH` gives one,
else the recipe's network with its initial weights written as a bundle (the
time does not depend on the weights, apart from the lesion list of what it
marks). The table gives the process's wall time and the steps the report
times (`seconds`: lung mask, network, quantify, write; read is the rest).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The window COVID-SemiSeg's exports were made with (docs/export_window.md).
SEMISEG_WINDOW = {"window_hu": [-1132.0, 274.6]}


def recipe_config(name: str):
  """The config `launch/<name>.cfg` trains: its --config file and --config.* overrides."""
  lines = [ln.strip() for ln in (ROOT / "launch" / f"{name}.cfg").read_text().splitlines()
           if ln.strip().startswith("--config")]
  file = next(ln.split("=", 1)[1] for ln in lines if ln.startswith("--config="))
  spec = importlib.util.spec_from_file_location("recipe_config", ROOT / file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    for ln in lines:
      if not ln.startswith("--config."):
        continue
      key, value = ln[len("--config."):].split("=", 1)
      *parents, leaf = key.split(".")
      node = config
      for p in parents:
        node = node[p]
      old = node[leaf]
      try:
        node[leaf] = (value.lower() in ("1", "true") if isinstance(old, bool)
                      else type(old)(value) if isinstance(old, (int, float)) else value)
      except (TypeError, ValueError):  # e.g. data.fold=all: training-only, not the network
        continue
  return config


def initial_bundle(name: str, folder: pathlib.Path) -> pathlib.Path:
  """The recipe's network with its initial weights, as a bundle."""
  import jax
  import jax.numpy as jnp
  from scoat_jax import models
  from scoat_jax.inference import bundle
  config = recipe_config(name)
  model = models.create_model(config)
  size = int(config.data.image_size)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)), train=False)
  variables = jax.tree_util.tree_map(lambda a: jax.device_get(a), dict(variables))
  intensity = config.data.get("intensity", "hu")
  if name.startswith("semiseg"):
    intensity = "uint8"
  window = SEMISEG_WINDOW if intensity == "uint8" else None
  pre = {"intensity": intensity,
         "hu_window": list(window["window_hu"] if window else config.data.hu_window),
         "uint8_normalization": config.data.get("uint8_normalization", "scale"),
         "image_size": size, "export_window": window}
  member = {"config": config.to_dict(), "variables": variables,
            "provenance": {"dataset": config.data.name, "fold": None, "step": 0,
                           "source": f"launch/{name}.cfg, initial weights"}}
  return bundle.write(folder / name, [member], preprocessing=pre, postprocessing=None,
                      model_name=config.model_name, num_classes=int(config.num_classes))


def write_scan(path: pathlib.Path, depth: int, slice_mm: float) -> None:
  from scoat_jax.data import ct_io, phantom
  fov = phantom.DEFAULT_FOV_MM
  s = phantom.generate_scan(1, 0, 1, shape=(depth, 512, 512),
                            spacing=(fov[0] / 512, fov[1] / 512, slice_mm))
  ct_io.write_ct(s.hu, s.geometry, path)


def predict(checkpoint: pathlib.Path, scan: pathlib.Path, out: pathlib.Path, cache: str) -> dict:
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "scoat_jax.predict", f"--checkpoint={checkpoint}",
                         f"--input={scan}", f"--output={out}", f"--compilation_cache_dir={cache}",
                         "--overwrite"], capture_output=True, text=True, cwd=ROOT)
  wall = time.time() - t0
  if proc.returncode:
    raise SystemExit(f"predict failed ({proc.returncode}): {proc.stderr[-2000:]}")
  [report] = [json.loads(p.read_text()) for p in out.glob("*_report.json")]
  return {"wall_s": round(wall, 1), **report["seconds"],
          "network_slices": report["network_slices"][1] - report["network_slices"][0],
          "lov_ml": None if report["lov_ml"] is None else round(report["lov_ml"], 1)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--recipes", default="semiseg_all,semiseg_all_gpu,cv_fold0,demo")
  p.add_argument("--checkpoint", action="append", default=[], help="NAME=PATH: a trained model")
  p.add_argument("--depth", type=int, default=300)
  p.add_argument("--slice_mm", type=float, default=1.25)
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  trained = dict(c.split("=", 1) for c in args.checkpoint)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    scan = tmp / "chest.nii.gz"
    write_scan(scan, args.depth, args.slice_mm)
    for name in args.recipes.split(","):
      checkpoint = pathlib.Path(trained[name]) if name in trained else initial_bundle(name, tmp)
      config = recipe_config(name)
      cache = str(tmp / f"cache_{name}")
      for run in ("first", "again"):
        r = predict(checkpoint, scan, tmp / f"out_{name}", cache)
        steps = sum(r.get(k, 0) for k in ("lung_mask", "network", "quantify", "write"))
        rows.append({"recipe": name, "model": "trained" if name in trained else "initial",
                     "size": int(config.data.image_size), "run": run, **r,
                     "read_and_start_s": round(r["wall_s"] - steps, 1)})
        print(json.dumps(rows[-1]) if args.json else rows[-1], file=sys.stderr, flush=True)
  head = ["recipe", "model", "size", "run", "network_slices", "wall_s", "read_and_start_s",
          "lung_mask", "network", "quantify", "write", "lov_ml"]
  from scoat_jax.evaluation.model_cost import cpu_model  # the CPU's model name, not just 'x86_64'
  print(f"{datetime.date.today()} {cpu_model()}, "
        f"{os.cpu_count()} cores, {args.depth} x 512 x 512 at {args.slice_mm} mm")
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for r in rows:
    print("| " + " | ".join(str(r.get(h, "")) for h in head) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
