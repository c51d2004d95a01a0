"""Reading HU for a model trained on 8-bit exports: the fixed window against the estimated one.

  python benchmarks/export_window.py --checkpoint=model/ --real_ct=DIR [--phantom=4]

A model trained on 8-bit slice exports (COVID-SemiSeg) sees CT volumes in HU
through a window (`inference.Predictor`: HU -> the 8-bit export that window
gives). This script segments the same scans twice, with the model's
`config.data.hu_window` (the fixed default -1250..250 HU) and with the window
estimated from its exports (`data.export_window`, stored in its bundle), each
without and with the lung rule (`inference.lung_rule`), and prints per scan the
opacity it reports (mL), the part outside the classical lung mask, and for the
phantom scans (`--phantom` of them: seed 1, time point 1, with their true
lesions) the true LOV and the Dice of the prediction against it.

`--real_ct` is a folder of `<name>/image.nii.gz` scans in HU (with an optional
`nodules.nii.gz`, whose voxels marked as opacity are reported); none of them
should show opacification, so what the model marks there is false positive.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time

import numpy as np


def _scans(real_ct: str | None, n_phantom: int):
  from scoat_jax.data import ct_io, phantom
  for i in range(n_phantom):
    s = phantom.generate_scan(1, i, 1)
    yield f"phantom-1-{i:03d}", s.hu, s.geometry, s.label > 0, None
  if real_ct:
    for folder in sorted(pathlib.Path(real_ct).iterdir()):
      if (folder / "image.nii.gz").is_file():
        v = ct_io.read_ct(folder / "image.nii.gz")
        nodules = None
        if (folder / "nodules.nii.gz").is_file():
          nodules = ct_io.read_mask(folder / "nodules.nii.gz", v, allowed=(0, 1)) > 0
        yield folder.name, v.hu, v.geometry, None, nodules


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="a bundle or workdir of an 8-bit model")
  p.add_argument("--real_ct", default=None, help="folder of <name>/image.nii.gz scans in HU")
  p.add_argument("--phantom", type=int, default=4, help="phantom scans (seed 1, time point 1)")
  p.add_argument("--json", action="store_true", help="one JSON line per run on stdout")
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import scoat_jax
  from scoat_jax import inference
  from scoat_jax.data import lung_mask as lm

  models = inference.load_ensemble([args.checkpoint])
  if models[0].intensity != "uint8" or models[0].export_window is None:
    print(f"error: --checkpoint={args.checkpoint}: not an 8-bit model with an estimated "
          "export window; export its bundle after building its dataset", file=sys.stderr)
    return 2
  fixed = [dataclasses.replace(m, meta={k: v for k, v in m.meta.items() if k != "export_window"})
           for m in models]
  predictors = {"fixed": inference.Predictor(fixed), "estimated": inference.Predictor(models)}
  windows = {k: "%g..%g" % tuple(p.hu_window) for k, p in predictors.items()}
  out = sys.stderr if args.json else sys.stdout
  rows = []
  for name, hu, geometry, truth, nodules in _scans(args.real_ct, args.phantom):
    lung = lm.lung_mask(hu, geometry.spacing)
    for window, predictor in predictors.items():
      for rule in (False, True):
        t0 = time.time()
        result = scoat_jax.segment(hu, predictor, spacing=geometry.spacing,
                                   origin=geometry.origin, lung_rule=rule)
        labels = result.labels > 0
        row = {"scan": name, "window": window, "window_hu": windows[window], "lung_rule": rule,
               "opacity_ml": result.report["lov_ml"],
               "outside_lung_ml": float(np.count_nonzero(labels & ~lung)
                                        * geometry.voxel_volume_ml),
               "lung_ml": float(lung.sum() * geometry.voxel_volume_ml),
               "seconds": round(time.time() - t0, 2)}
        if truth is not None:
          row["true_lov_ml"] = float(truth.sum() * geometry.voxel_volume_ml)
          row["dice"] = float(2 * np.count_nonzero(labels & truth)
                              / max(np.count_nonzero(labels) + np.count_nonzero(truth), 1))
        if nodules is not None:
          row["nodule_marked_share"] = float(labels[nodules].mean())
        rows.append(row)
        if args.json:
          print(json.dumps(row), flush=True)
  from scoat_jax.evaluation.model_cost import cpu_model  # the CPU's model name, not just 'x86_64'
  print(f"{datetime.date.today()}, {cpu_model()}, "
        f"{os.cpu_count()} cores; `python benchmarks/export_window.py --checkpoint=... "
        f"--phantom={args.phantom}{' --real_ct=...' if args.real_ct else ''}`; windows: "
        f"fixed {windows['fixed']} HU, estimated {windows['estimated']} HU\n", file=out)
  print("| scan | window | lung rule | opacity mL | outside lung mL | lung mL | true LOV mL "
        "| Dice | nodule voxels marked |", file=out)
  print("|---|---|---|---:|---:|---:|---:|---:|---:|", file=out)

  def fmt(v, f="{:.1f}"):
    return "-" if v is None else f.format(v)
  for r in rows:
    print(f"| {r['scan']} | {r['window']} | {'on' if r['lung_rule'] else 'off'} | "
          f"{fmt(r['opacity_ml'])} | {fmt(r['outside_lung_ml'])} | {fmt(r['lung_ml'], '{:.0f}')} | "
          f"{fmt(r.get('true_lov_ml'))} | {fmt(r.get('dice'), '{:.3f}')} | "
          f"{fmt(r.get('nodule_marked_share'), '{:.1%}')} |", file=out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
