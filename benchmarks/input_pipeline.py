"""Throughput of the training input pipeline (slices/s) on this machine's CPU.

  python benchmarks/input_pipeline.py                      # table
  python benchmarks/input_pipeline.py --json               # one JSON object
  python benchmarks/input_pipeline.py --workers=0,1,2,4 --data_dir=DIR --dataset=ct_phantom

By default it builds a small 512x512 phantom cohort (2 patients x 2 scans x 32
slices, ~30 s) into a temporary folder, then for augmentation on and off and
each worker count times `--steps` training batches after one warm-up batch
(which also pays for starting the grain worker processes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import tensorflow_datasets as tfds

from scoat_jax.training import input_pipeline
from scoat_jax.configs import default
from scoat_jax.datasets import build
from scoat_jax.evaluation.model_cost import cpu_model


def measure(data_cfg, *, batch_size: int, steps: int) -> dict:
  """Times `steps` batches after one warm-up batch; returns slices/s and timings."""
  t0 = time.perf_counter()
  it = input_pipeline.train_batches(data_cfg, global_batch_size=batch_size, seed=0,
                                    process_index=0, process_count=1)
  next(it)
  t1 = time.perf_counter()
  for _ in range(steps):
    next(it)
  t2 = time.perf_counter()
  if hasattr(it, "close"):
    it.close()
  return {"slices_per_s": steps * batch_size / (t2 - t1), "first_batch_s": t1 - t0}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", default="ct_phantom/p2_t2_s0_32x512x512")
  p.add_argument("--data_dir", default="", help="default: build into a temporary folder")
  p.add_argument("--image_size", type=int, default=512)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  tfds.disable_progress_bar()

  with tempfile.TemporaryDirectory(prefix="scoat_bench_") as tmp:
    data_dir = args.data_dir or tmp
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):   # TFDS prints progress to stdout
      name = build.build(args.dataset, data_dir)
    build_s = time.perf_counter() - t0
    rows = []
    for augment in (True, False):
      for workers in (int(w) for w in args.workers.split(",")):
        cfg = default.get_config().data
        cfg.name, cfg.data_dir, cfg.image_size = name, data_dir, args.image_size
        cfg.augment, cfg.worker_count, cfg.num_folds = augment, workers, 2
        r = measure(cfg, batch_size=args.batch_size, steps=args.steps)
        rows.append({"augment": augment, "workers": workers, **r})
        if not args.json:
          print(f"augment={str(augment):5s} workers={workers}: {r['slices_per_s']:7.1f} slices/s "
                f"(first batch {r['first_batch_s']:.1f} s)", file=sys.stderr, flush=True)
  result = {"dataset": name, "image_size": args.image_size, "batch_size": args.batch_size,
            "steps": args.steps, "cpus": os.cpu_count(), "machine": cpu_model(),
            "build_s": build_s, "rows": rows}
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    print(f"\n{name} at {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs (dataset built in {build_s:.1f} s)")
    print("| augment | workers | slices/s | first batch (s) |")
    print("|---|---|---|---|")
    for r in rows:
      print(f"| {'on' if r['augment'] else 'off'} | {r['workers']} | {r['slices_per_s']:.1f} | "
            f"{r['first_batch_s']:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
