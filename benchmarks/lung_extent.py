"""How much network time skipping the slices beyond the lungs saves, on a long phantom scan.

    python benchmarks/lung_extent.py --checkpoint=runs/demo [--size=512 --depth=192]

The phantom's 240 mm chest is placed in a scan of `--depth` slices of
`--slice_mm` (default 192 x 2.5 mm = 480 mm), so neck and abdomen lie above and
below it. The scan goes through `inference.scan.run_volume` twice, as `predict`
runs it: with the network on the lungs' extent +- 30 mm only (the default) and
on every slice. The table gives the slices segmented, the seconds of each step,
LOV, and whether every slice with opacity (and with consolidation) of the
phantom's truth lies inside the range segmented; the masks must agree inside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import numpy as np


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="workdir, step folder or bundle")
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--depth", type=int, default=192)
  p.add_argument("--slice_mm", type=float, default=2.5)
  p.add_argument("--json", action="store_true", help="one JSON line per row on stdout")
  args = p.parse_args(argv)
  from scoat_jax.common import compilation_cache
  compilation_cache.enable("~/.cache/scoat_jax/jax_cache")
  import scoat_jax
  from scoat_jax.data import orientation, phantom
  from scoat_jax.data.readers import Loaded
  from scoat_jax.inference import scan as scan_lib

  fov = phantom.DEFAULT_FOV_MM
  s = phantom.generate_scan(1, 0, 1, shape=(args.depth, args.size, args.size),
                            spacing=(fov[0] / args.size, fov[1] / args.size, args.slice_mm))
  data = Loaded(s.hu, s.geometry, {}, orientation.reorientation(s.geometry))
  predictor = scoat_jax.load(args.checkpoint)
  predictor.predict_volume(s.hu[:1])  # compile outside the timing
  rows, masks = [], {}
  for skip in (True, False):
    t0 = time.time()
    result = scan_lib.run_volume(predictor, data, skip_outside_lung=skip)
    z0, z1 = result.stats["network_slices"]
    masks[skip] = result.labels
    inside = lambda z: bool(z.size == 0 or (z0 <= z[0] and z[-1] < z1))  # noqa: E731
    rows.append({"network_slices": f"{z0}..{z1 - 1}", "slices": z1 - z0, "skip": skip,
                 **{f"{k}_s": v for k, v in result.stats["seconds"].items()},
                 "total_s": round(time.time() - t0, 3), "lov_ml": round(result.stats["lov_ml"], 2),
                 "true_lov_ml": round(s.lesion_volume_ml, 2),
                 "opacity_inside": inside(np.flatnonzero(s.label.any((1, 2)))),
                 "consolidation_inside": inside(np.flatnonzero((s.label == 2).any((1, 2)))),
                 "date": datetime.datetime.now().strftime("%Y-%m-%dT%H:%M")})
  z0, z1 = rows[0]["network_slices"].split("..")
  same = bool(np.array_equal(masks[True][int(z0):int(z1) + 1], masks[False][int(z0):int(z1) + 1]))
  for r in rows:
    r["same_mask_inside"] = same
    if args.json:
      print(json.dumps(r))
  keys = ["skip", "slices", "network_slices", "lung_mask_s", "network_s", "quantify_s",
          "lov_ml", "true_lov_ml", "opacity_inside", "consolidation_inside", "same_mask_inside"]
  print(f"scan {args.depth} x {args.size} x {args.size}, {args.slice_mm} mm slices; "
        f"model {args.checkpoint}", file=sys.stderr)
  print("| " + " | ".join(keys) + " |", file=sys.stderr)
  print("|" + "---|" * len(keys), file=sys.stderr)
  for r in rows:
    print("| " + " | ".join(str(r[k]) for k in keys) + " |", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
