"""Times a network's training step (forward, backward, Adam) on random slices.

  python benchmarks/train_step.py --size=128,256,512 --batch=2 --cpu_weight_grad=auto,xla
  python benchmarks/train_step.py --size=512 --batch=8,16,32 --dtype=float32,bfloat16 --json
  python benchmarks/train_step.py --devices=4 --size=64 --widths=8,16,32,64,128
  python benchmarks/train_step.py --cpu_weight_grad=taps ...   # per-tap XLA gradient only
  python benchmarks/train_step.py --model=all --size=256 --batch=2   # every network

The step is `scoat_jax.training.optimization.train_step` under the same jit, shardings and
donation as training (state replicated, batch sharded over `--devices`), with
the paper's loss (BCE-Dice; deep supervision averaged over four heads for
the networks that have them). Inputs are random images with random square
lesions; their values do not change the arithmetic. The default widths are
each network's own (SCOAT-Net: the paper's, 10.2 M parameters).
"""
from __future__ import annotations

import argparse
import functools
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402  (the benchmarks folder is not a package)


def random_batch(batch: int, size: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  image = rng.random((batch, size, size, 1), dtype=np.float32)
  mask = np.zeros((batch, size, size), np.int32)
  for b in range(batch):
    y, x = rng.integers(0, size - size // 4, 2)
    mask[b, y:y + size // 4, x:x + size // 4] = 1
  return {"image": image, "mask": mask}


def bench_one(args, *, mesh, model: str, size: int, batch: int, dtype: str, weight_grad: str
              ) -> dict:
  import jax
  from scoat_jax.common import parallel
  from scoat_jax import models
  from scoat_jax.configs import default
  from scoat_jax.models import cpu_kernels
  from scoat_jax.training import optimization
  from scoat_jax.training.schedule import paper_schedule

  config = default.get_config(model)
  config.model.widths, config.dtype = args.width_tuple, dtype
  config.cpu_weight_grad, config.deep_supervision = weight_grad, args.deep_supervision
  config.data.image_size = size
  parallel.check_batch_size(batch, mesh, flag="--batch")
  network = models.create_model(config)
  tx = optimization.create_optimizer(paper_schedule(steps_per_epoch=100))
  state = optimization.create_train_state(config, network, tx, jax.random.key(0), mesh)
  step = optimization.make_train_step(config, mesh)
  data = jax.device_put(random_batch(batch, size), parallel.data_sharding(mesh))
  step_args = (state, data, jax.random.key(1))
  # XLA counts a loop body once and a custom call not at all, so the fast
  # weight gradients would hide most of their FLOPs: count the model's
  # arithmetic on the native convolution instead (same maths, same FLOPs).
  config.cpu_weight_grad = "xla"
  native_state = state.replace(apply_fn=models.create_model(config).apply)
  native = optimization.make_train_step(config, mesh).lower(native_state, *step_args[1:])
  flops = common.xla_flops(native)  # None on GPU: then the compiled step's (the same convs)
  timing = common.compile_and_time(step, step_args, warmup=args.warmup, repeats=args.repeats,
                                   carry=lambda out, a: (out[0],) + a[1:], flops=flops)
  return common.summarize({"benchmark": "train_step", "model": model, "size": size,
                           "batch": batch, "dtype": dtype, "cpu_weight_grad": weight_grad,
                           # Whether the native CPU kernel was built and usable here;
                           # which convolutions take it depends on their sizes
                           # (`cpu_kernels.faster_than_xla`).
                           "native_cpu_kernel_available": (weight_grad in ("auto", "native")
                                                           and cpu_kernels.usable()),
                           "widths": list(network.widths)}, timing, batch=batch, mesh=mesh)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_flags(p)
  args = common.parse(p, argv)
  mesh = common.setup(args)
  common.run_grid(functools.partial(bench_one, args), mesh,
                  {"model": args.models, "size": args.sizes, "batch": args.batches,
                   "dtype": args.dtypes,
                   "weight_grad": args.weight_grads},
                  as_json=args.json, title=f"train step, widths {args.widths or 'of each network'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
