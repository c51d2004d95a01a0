"""Time and memory of quantifying one scan on the CPU: the lung mask and the lesion list.

  python benchmarks/quantify.py                                   # 512x512x300, table
  python benchmarks/quantify.py --size=256 --depth=100 --repeats=1  # a quick run
  python benchmarks/quantify.py --hu_dtype=int16,float32 --json

`predict` quantifies every scan after the network pass (`inference.quantify`):
the classical lung mask (`data.lung_mask.lung_mask`) and the lesion components
with their centres (`inference.quantify.lesions`). This script builds one
phantom scan (`data.phantom`, patient 0 at time point 1, which has GGO and
consolidation) of `--depth` x `--size` x `--size` voxels with a field of view
of 358.4 x 358.4 x `--depth` mm (0.7 x 0.7 x 1 mm at 512 x 512), saves it in a
temporary folder and measures each step in a fresh child process:

* `lung_mask`: `lung_mask(hu, spacing)`, scored against the phantom's true lung
  (volume error in percent, Dice);
* `lesions`: `lesions(label, ...)` on the phantom's true three-class label,
  compared with a reference list built from `evaluation.metrics.region_centres`
  (counts, volumes, centres, boxes: "same" or "DIFFERENT");
* `quantify_volume`: the whole report from the label and the HU volume.

Time is the median (min, max) of `--repeats` calls. Memory is the peak of
NumPy's allocations during one further call under `tracemalloc` (NumPy reports
its buffers to it; the step's output included, the input arrays not), and the
growth of the child's peak resident memory (VmHWM, as `ru_maxrss`) over the timed calls
beyond what it held after loading the inputs, with glibc's malloc set as
`predict` sets it (`common.host_memory`); both in bytes per voxel. The HU input
(int16 as read from most CT files, or float32 with `--hu_dtype`) is not counted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

STEPS = ("lung_mask", "lesions", "quantify_volume")
FOV_XY_MM = 358.4


def _geometry(shape):
  from scoat_jax.data import ct_io
  nz, ny, nx = shape
  spacing = (FOV_XY_MM / nx, FOV_XY_MM / ny, 1.0)
  return ct_io.Geometry.for_array(shape, spacing, origin=(0.0, 0.0, 0.0))


def _build(folder: pathlib.Path, size: int, depth: int) -> dict:
  """Writes the phantom's hu (int16 and float32), label and lung as .npy files; returns facts."""
  from scoat_jax.data import phantom
  t0 = time.perf_counter()
  scan = phantom.generate_scan(0, 0, 1, shape=(depth, size, size),
                               spacing=_geometry((depth, size, size)).spacing)
  np.save(folder / "hu_int16.npy", scan.hu)
  np.save(folder / "hu_float32.npy", scan.hu.astype(np.float32))
  np.save(folder / "label.npy", scan.label)
  np.save(folder / "lung.npy", scan.lung)
  return {"build_s": time.perf_counter() - t0, "lung_voxels": int(np.count_nonzero(scan.lung)),
          "lesion_voxels": int(np.count_nonzero(scan.label))}


def _reference_lesions(label: np.ndarray, spacing_zyx) -> list[tuple]:
  """(voxels, centre, bbox start, bbox stop) per lesion, largest first, from region_centres."""
  from scipy import ndimage
  from scoat_jax.evaluation import metrics
  comp, centres = metrics.region_centres(label > 0, spacing=spacing_zyx)
  counts = np.bincount(comp.ravel(), minlength=len(centres) + 1)
  boxes = ndimage.find_objects(comp)
  order = sorted(range(1, len(centres) + 1), key=lambda k: (-counts[k], k))
  return [(int(counts[k]), [int(v) for v in centres[k - 1]],
           [s.start for s in boxes[k - 1]], [s.stop for s in boxes[k - 1]]) for k in order]


def _as_tuples(found: list[dict]) -> list[tuple]:
  return [(l["voxels"], l["centre_index"], l["bbox_start"], l["bbox_stop"]) for l in found]


def _peak_rss_bytes() -> int:
  """This process's peak resident memory: VmHWM, else ru_maxrss.

  After fork and exec, Linux's ru_maxrss starts at the parent's resident size
  (here the phantom's 2 GB), so it would hide a child's growth; VmHWM belongs to
  the new address space.
  """
  try:
    status = pathlib.Path("/proc/self/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
  except (OSError, StopIteration, ValueError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(step: str, folder: pathlib.Path, hu_dtype: str, repeats: int) -> dict:
  """Runs one step `repeats` times, then once under tracemalloc; returns its figures."""
  from scoat_jax.common import host_memory
  host_memory.keep_freed_memory()  # as predict does
  from scoat_jax.data.lung_mask import lung_mask
  from scoat_jax.inference import quantify
  label = np.load(folder / "label.npy")
  geometry = _geometry(label.shape)
  # Loaded in its dtype (no converted copy freed on the heap, which would hide the growth).
  hu = np.load(folder / f"hu_{hu_dtype}.npy") if step != "lesions" else None
  if step == "lung_mask":
    del label
    call = lambda: lung_mask(hu, geometry.spacing)
  elif step == "lesions":
    spacing_zyx = tuple(reversed(geometry.spacing))
    call = lambda: quantify.lesions(label, voxel_volume_ml=geometry.voxel_volume_ml,
                                    spacing_zyx=spacing_zyx, geometry=geometry, num_classes=3)
  else:
    call = lambda: quantify.quantify_volume(label, geometry, hu=hu, num_classes=3)
  rss0 = _peak_rss_bytes()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - t0)
    del out
  rss1 = _peak_rss_bytes()
  tracemalloc.start()
  tracemalloc.reset_peak()
  out = call()
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  voxels = int(np.prod(geometry.shape))
  row = {"step": step, "shape": list(geometry.shape), "hu_dtype": hu_dtype if hu is not None
         else "-", "s_median": statistics.median(times), "s_min": min(times),
         "s_max": max(times), "repeats": repeats, "traced_peak_b_per_voxel": peak / voxels,
         "rss_growth_b_per_voxel": (rss1 - rss0) / voxels}
  if step == "lung_mask":
    row["lung_voxels"] = int(np.count_nonzero(out))
    truth = np.load(folder / "lung.npy")
    row["dice"] = 2 * int(np.count_nonzero(out & truth)) / (int(np.count_nonzero(out)) +
                                                            int(np.count_nonzero(truth)))
  elif step == "lesions":
    row["lesions"] = _as_tuples(out)
  else:
    row["lung_voxels"] = out["lung_voxels"]
    row["lesions"] = _as_tuples(out["lesions"])
  return row


def _run_child(step: str, folder: pathlib.Path, hu_dtype: str, repeats: int) -> dict:
  proc = subprocess.run([sys.executable, __file__, f"--_child={step}", f"--_data={folder}",
                         f"--hu_dtype={hu_dtype}", f"--repeats={repeats}"],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    sys.exit(f"error: the {step} step failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v, spec: str) -> str:
  return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", type=int, default=512, help="in-plane side in voxels")
  p.add_argument("--depth", type=int, default=300, help="slices (1 mm each)")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per step")
  p.add_argument("--hu_dtype", default="int16", help="int16, float32 or both: int16,float32")
  p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
  p.add_argument("--label", default="", help="a name for the rows (e.g. before, after)")
  p.add_argument("--json", action="store_true",
                 help="print one JSON line per row to stdout (the table goes to stderr)")
  p.add_argument("--_child", default="", help=argparse.SUPPRESS)
  p.add_argument("--_data", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._child:
    print(json.dumps(_child(args._child, pathlib.Path(args._data), args.hu_dtype, args.repeats)))
    return 0
  steps = [s for s in args.steps.split(",") if s]
  dtypes = [d for d in args.hu_dtype.split(",") if d]
  if any(s not in STEPS for s in steps):
    p.error(f"--steps={args.steps}: choose from {', '.join(STEPS)}")
  if any(d not in ("int16", "float32") for d in dtypes):
    p.error(f"--hu_dtype={args.hu_dtype}: choose int16, float32 or both")
  if args.size < 64 or args.depth < 16 or args.repeats < 1:
    p.error("--size must be >= 64, --depth >= 16 and --repeats >= 1")
  out = sys.stderr if args.json else sys.stdout
  rows = []
  with tempfile.TemporaryDirectory(prefix="scoat_quantify_") as tmp:
    folder = pathlib.Path(tmp)
    facts = _build(folder, args.size, args.depth)
    print(f"phantom {args.depth}x{args.size}x{args.size} built in {facts['build_s']:.1f} s: "
          f"{facts['lung_voxels']} lung voxels, {facts['lesion_voxels']} lesion voxels",
          file=sys.stderr, flush=True)
    reference = None
    if any(s != "lung_mask" for s in steps):
      geometry = _geometry((args.depth, args.size, args.size))
      reference = _reference_lesions(np.load(folder / "label.npy"),
                                     tuple(reversed(geometry.spacing)))
    for step in steps:
      for dtype in (dtypes if step != "lesions" else dtypes[:1]):
        r = _run_child(step, folder, dtype, args.repeats)
        r["label"] = args.label
        if "lung_voxels" in r:
          r["lung_volume_error_pct"] = 100 * (r["lung_voxels"] / facts["lung_voxels"] - 1)
        if "lesions" in r:
          r["num_lesions"] = len(r["lesions"])
          r["lesions_match"] = [list(map(_listify, t)) for t in r["lesions"]] == \
              [list(map(_listify, t)) for t in reference]
          del r["lesions"]
        r.update(cpus=os.cpu_count(), host=platform.node(),
                 date=datetime.datetime.now().isoformat(timespec="minutes"))
        rows.append(r)
        if args.json:
          print(json.dumps(r), flush=True)
        print(f"{step} ({r['hu_dtype']}): {r['s_median']:.2f} s, "
              f"{r['traced_peak_b_per_voxel']:.1f} B/voxel traced", file=sys.stderr, flush=True)
  print(f"\nQuantifying a {args.depth}x{args.size}x{args.size} phantom scan, "
        f"median of {args.repeats}, {os.cpu_count()} CPUs", file=out)
  print("| label | step | HU dtype | time median (s) | min | max | traced peak (B/voxel) "
        "| RSS growth (B/voxel) | lung volume error | lung Dice | lesions | same lesions |",
        file=out)
  print("|" + "---|" * 12, file=out)
  for r in rows:
    err = r.get("lung_volume_error_pct")
    err = "-" if err is None else f"{err:+.2f}%"
    print(f"| {r['label'] or '-'} | {r['step']} | {r['hu_dtype']} | {r['s_median']:.2f} "
          f"| {r['s_min']:.2f} | {r['s_max']:.2f} | {r['traced_peak_b_per_voxel']:.1f} "
          f"| {r['rss_growth_b_per_voxel']:.1f} | {err} "
          f"| {_fmt(r.get('dice'), '.4f')} | {r.get('num_lesions', '-')} "
          f"| {({True: 'same', False: 'DIFFERENT'}).get(r.get('lesions_match'), '-')} |",
          file=out)
  out.flush()
  return 0


def _listify(v):
  return list(v) if isinstance(v, (list, tuple)) else v


if __name__ == "__main__":
  sys.exit(main())
