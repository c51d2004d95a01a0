"""What the train-step and predict benchmarks share: flags, devices, timing, reporting.

Each benchmark times one jitted function on random inputs of a fixed shape:
compile time (lowering + XLA compilation, or a persistent-cache load when
the cache already holds it), then `--repeats` calls after `--warmup` calls,
each waited for with `block_until_ready`. FLOPs come from XLA's cost analysis
of the compiled executable (the model's own arithmetic, summed over devices).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable


def add_common_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="scoat_net",
                 help="network(s), comma-separated, or 'all' (scoat_jax.models.available_models())")
  p.add_argument("--size", default="128", help="image side(s), comma-separated: 128,256,512")
  p.add_argument("--batch", default="2", help="global batch size(s), comma-separated")
  p.add_argument("--dtype", default="float32", help="float32, bfloat16 or both: float32,bfloat16")
  p.add_argument("--devices", type=int, default=1,
                 help="data-parallel devices (on CPU, fakes this many host devices)")
  p.add_argument("--widths", default="", help="channel widths of the 5 levels (default: each "
                 "network's own, e.g. 32..512 for the U-Nets, 64..2048 for the ResNet-50 ones)")
  p.add_argument("--cpu_weight_grad", default="auto",
                 help="CPU weight-gradient path(s): auto, native, taps, xla, comma-separated")
  p.add_argument("--deep_supervision", default="auto", choices=("auto", "mean", "last", "none"),
                 help="auto: mean over the heads of networks that have several")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--compilation_cache_dir", default="~/.cache/scoat_jax/jax_cache",
                 help='persistent compilation cache ("" turns it off)')
  p.add_argument("--json", action="store_true", help="print one JSON line per run to stdout as it finishes (the table goes to stderr)")


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  """Parses flags and, before JAX starts, asks for fake CPU devices if needed."""
  args = p.parse_args(argv)
  if args.devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only affects the host (CPU) platform; harmless on GPU machines.
    from scoat_jax.common import parallel  # imports JAX, which reads XLA_FLAGS only at first use
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                               parallel.fake_cpu_devices_xla_flags(args.devices)).strip()
  args.sizes = [int(s) for s in args.size.split(",")]
  args.batches = [int(b) for b in args.batch.split(",")]
  args.dtypes = args.dtype.split(",")
  args.weight_grads = args.cpu_weight_grad.split(",")
  bad = [w for w in args.weight_grads if w not in ("auto", "native", "taps", "xla")]
  if bad:
    p.error(f"--cpu_weight_grad={args.cpu_weight_grad}: {bad[0]!r} is not auto, native, taps or xla")
  args.width_tuple = tuple(int(w) for w in args.widths.split(",")) if args.widths else None
  from scoat_jax import models  # after XLA_FLAGS: importing it starts no backend
  args.models = (models.available_models() if args.model == "all"
                 else [m.strip() for m in args.model.split(",") if m.strip()])
  bad = [m for m in args.models if m not in models.available_models()]
  if bad:
    p.error(f"--model: {bad[0]!r} is not a network; choose from "
            f"{', '.join(models.available_models())} or all")
  return args


def setup(args):
  """Imports JAX, turns on the compilation cache, returns the benchmark mesh."""
  from scoat_jax.common import host_memory
  host_memory.keep_freed_memory()  # as the training and prediction tools do
  import jax
  from scoat_jax.common import compilation_cache
  from scoat_jax.common import parallel
  compilation_cache.enable(args.compilation_cache_dir)
  devices = jax.devices()
  if len(devices) < args.devices:
    sys.exit(f"error: --devices={args.devices} but JAX sees {len(devices)} "
             f"{devices[0].platform} device(s); lower --devices.")
  return parallel.make_mesh(devices[:args.devices])


def peak_rss_gib() -> float:
  """The process's peak resident memory so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_device_gib(mesh) -> float | None:
  """Peak device memory of the first device (None where the backend keeps no stats)."""
  stats = mesh.devices.flat[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**30


def xla_flops(stage) -> float | None:
  """XLA's FLOP estimate for a lowered or compiled computation, or None.

  On the CPU backend a lowered computation has one; on the GPU (JAX 0.11,
  H200) only a compiled one does.
  """
  try:
    cost = stage.cost_analysis()
  except Exception:  # Some backends give no cost analysis; FLOPs are then unknown.
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) or None if cost else None


def compile_and_time(jitted: Callable, args_: tuple, *, warmup: int, repeats: int,
                     carry: Callable[[Any, tuple], tuple] | None = None,
                     flops: float | None = None) -> dict:
  """Compiles `jitted` for `args_`, then times calls.

  Args:
    jitted: a `jax.jit`-wrapped function.
    args_: its arguments.
    warmup: untimed calls after compilation.
    repeats: timed calls.
    carry: `(outputs, args) -> args` for the next call (a train step feeds
      its new state back, since the old one was donated).
    flops: FLOPs per call if known; otherwise XLA's estimate for `jitted`.

  Returns:
    compile_s, step_s (list), flops_per_step (None if XLA gives no estimate).
  """
  import jax
  t0 = time.perf_counter()
  lowered = jitted.lower(*args_)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  if flops is None:
    flops = xla_flops(lowered) or xla_flops(compiled)
  times = []
  for i in range(warmup + repeats):
    t = time.perf_counter()
    out = compiled(*args_)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - t)
    if carry is not None:
      args_ = carry(out, args_)
  return {"compile_s": compile_s, "step_s": times, "flops_per_step": flops}


def summarize(row: dict, timing: dict, *, batch: int, mesh) -> dict:
  times = timing["step_s"]
  med = statistics.median(times)
  flops = timing["flops_per_step"]
  return {**row, "compile_s": round(timing["compile_s"], 2),
          "step_s_median": med, "step_s_min": min(times), "step_s_max": max(times),
          "slices_per_s": batch / med, "flops_per_step": flops,
          "flop_per_s": flops / med if flops else None,
          "peak_rss_gib": round(peak_rss_gib(), 3), "peak_device_gib": peak_device_gib(mesh),
          "device": mesh.devices.flat[0].device_kind, "devices": int(mesh.devices.size),
          "cpus": os.cpu_count(), "host": platform.node()}


def _fmt(v, spec: str) -> str:
  return "-" if v is None else format(v, spec)


def report(rows: list[dict], *, as_json: bool, title: str) -> None:
  """Prints a Markdown table (to stderr when --json: stdout then holds only JSON lines)."""
  out = sys.stderr if as_json else sys.stdout
  print(f"\n{title}", file=out)
  print("| model | size | batch | dtype | CPU weight grad | compile (s) | step median (s) | min "
        "| max | slices/s | GFLOP/step | achieved GFLOP/s | peak RSS (GiB) | peak device (GiB) |",
        file=out)
  print("|" + "---|" * 14, file=out)
  for r in rows:
    gflop = r["flops_per_step"] / 1e9 if r["flops_per_step"] else None
    rate = r["flop_per_s"] / 1e9 if r["flop_per_s"] else None
    print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['dtype']} "
          f"| {r.get('cpu_weight_grad') or '-'} "
          f"| {r['compile_s']:.1f} | {r['step_s_median']:.3f} | {r['step_s_min']:.3f} "
          f"| {r['step_s_max']:.3f} | {r['slices_per_s']:.2f} | {_fmt(gflop, '.0f')} "
          f"| {_fmt(rate, '.1f')} | {r['peak_rss_gib']:.2f} | {_fmt(r['peak_device_gib'], '.2f')} |",
          file=out)
  out.flush()


def run_grid(bench_one: Callable[..., dict], mesh, grid: dict[str, list], *, as_json: bool,
             title: str) -> list[dict]:
  """Runs `bench_one(mesh=..., **point)` over the product of `grid`, then reports.

  Args:
    bench_one: measures one point; returns a `summarize` row.
    mesh: the benchmark mesh.
    grid: keyword name -> values, e.g. {"size": [128, 256], "batch": [2]}.
    as_json: also print one JSON line per row.
    title: the table's title (the device is appended).
  """
  rows = []
  for values in itertools.product(*grid.values()):
    point = dict(zip(grid, values))
    r = bench_one(mesh=mesh, **point)
    rows.append(r)
    if as_json:  # As each point finishes, so a run cut off by a time limit keeps its rows.
      print(json.dumps(r), flush=True)
    print(" ".join(f"{k}={v}" for k, v in point.items()) +
          f": {r['step_s_median']:.3f} s/call, {r['slices_per_s']:.2f} slices/s "
          f"(compile {r['compile_s']:.1f} s)", file=sys.stderr, flush=True)
  report(rows, as_json=as_json, title=f"{title}, {mesh.devices.size} x {rows[0]['device']}")
  return rows
