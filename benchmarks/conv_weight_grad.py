"""Times one convolution's weight gradient three ways on the CPU.

  python benchmarks/conv_weight_grad.py                 # SCOAT-Net's 256-px shapes
  python benchmarks/conv_weight_grad.py --size=512 --json
  python benchmarks/conv_weight_grad.py --size=128 --width_scale=0.25   # the demo's net

For each (kernel, C_in, C_out) at the row's resolution, batch 2: XLA's own
gradient of `lax.conv_general_dilated` ("stock"), the per-tap XLA dots
(`conv.weight_grad_by_taps`) and the native kernel (`cpu_kernels`), with the
relative difference of the last two from stock. Shapes the native kernel
cannot compute (`cpu_kernels.supports`) show "-"; "used" says whether training
takes the kernel for that size (`cpu_kernels.faster_than_xla`) or the taps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402  (the benchmarks folder is not a package)

# (kernel, C_in, C_out, image side / size): the first conv, and per SCOAT-Net
# row at paper widths the body conv, the first conv of the narrowest and the
# widest decoder node, and a shortcut.
SHAPES = [
    (3, 1, 32, 1), (3, 32, 32, 1), (3, 96, 32, 1), (3, 192, 32, 1), (1, 96, 32, 1),
    (3, 64, 64, 2), (3, 192, 64, 2), (3, 320, 64, 2), (1, 192, 64, 2),
    (3, 128, 128, 4), (3, 384, 128, 4), (3, 512, 128, 4),
    (3, 256, 256, 8), (3, 768, 256, 8), (3, 512, 512, 16),
]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", type=int, default=256, help="full-resolution image side")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--width_scale", type=float, default=1.0,
                 help="multiplies the channel counts (0.25: the demo's widths 8..128)")
  p.add_argument("--json", action="store_true", help="print one JSON line per shape, last")
  args = p.parse_args(argv)

  from scoat_jax.common import host_memory
  host_memory.keep_freed_memory()  # as the training and prediction tools do
  import jax
  import jax.numpy as jnp
  from scoat_jax.models import conv, cpu_kernels

  rows = []
  for k, cin, cout, div in SHAPES:
    side = args.size // div
    cin = cin if cin == 1 else max(1, round(cin * args.width_scale))
    cout = max(1, round(cout * args.width_scale))
    shape = (k, k, cin, cout)
    x = jax.random.normal(jax.random.key(0), (args.batch, side, side, cin))
    g = jax.random.normal(jax.random.key(1), (args.batch, side, side, cout))

    def stock(x_, g_, shape=shape):
      _, vjp = jax.vjp(lambda w: conv.conv2d_native(x_, w), jnp.zeros(shape))
      return vjp(g_)[0]

    methods = {"stock": jax.jit(stock),
               "taps": jax.jit(lambda a, b, shape=shape: conv.weight_grad_by_taps(a, b, shape))}
    if cpu_kernels.supports(shape, x.dtype) and cpu_kernels.available():
      methods["native"] = jax.jit(
          lambda a, b, shape=shape: cpu_kernels.conv_weight_grad(a, b, shape))
    ref = methods["stock"](x, g)
    row = {"kernel": k, "cin": cin, "cout": cout, "side": side, "batch": args.batch,
           "gflop": 2 * args.batch * side * side * k * k * cin * cout / 1e9,
           "used": "native" if conv.uses_native_kernel(x.shape, shape, x.dtype) else "taps"}
    for name, fn in methods.items():
      timing = common.compile_and_time(fn, (x, g), warmup=1, repeats=args.repeats,
                                       flops=row["gflop"] * 1e9)
      row[f"{name}_s"] = statistics.median(timing["step_s"])
      row[f"{name}_rel_err"] = float(jnp.linalg.norm(fn(x, g) - ref) / jnp.linalg.norm(ref))
    rows.append(row)

  print(f"Weight gradient, batch {args.batch}, {jax.device_count()} device(s), "
        f"backend {jax.default_backend()}")
  print("| k | C_in | C_out | side | GFLOP | stock (ms) | taps (ms) | native (ms) | "
        "native GFLOP/s | taps / native | native rel. err | used |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "native_s" in r:
      native = (f"{r['native_s'] * 1e3:.1f} | {r['gflop'] / r['native_s']:.0f} | "
                f"{r['taps_s'] / r['native_s']:.1f}x | {r['native_rel_err']:.1e}")
    else:
      native = "- | - | - | -"
    print(f"| {r['kernel']} | {r['cin']} | {r['cout']} | {r['side']} | {r['gflop']:.2f} "
          f"| {r['stock_s'] * 1e3:.1f} | {r['taps_s'] * 1e3:.1f} | {native} | {r['used']} |")
  if args.json:
    for r in rows:
      print(json.dumps(r))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
