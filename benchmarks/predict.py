"""Times a network's inference forward pass (slices -> labels) on random slices.

  python benchmarks/predict.py --size=512 --batch=8,32 --dtype=float32,bfloat16
  python benchmarks/predict.py --size=128 --widths=16,32,64,128,256 --json
  python benchmarks/predict.py --model=all --size=256 --batch=2   # every network

The timed function is the one validation and `scoat_jax.predict` run per batch
(`scoat_jax.evaluation.make_predict_fn`: eval-mode forward, last head,
threshold), jitted with the batch sharded over `--devices`. For a whole scan
from file to report JSON, time `python -m scoat_jax.predict` instead (see
benchmarks/device_check.sh).
"""
from __future__ import annotations

import argparse
import functools
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import common  # noqa: E402  (the benchmarks folder is not a package)


def bench_one(args, *, mesh, model: str, size: int, batch: int, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp
  from scoat_jax.evaluation import validation
  from scoat_jax.common import parallel
  from scoat_jax import models
  from scoat_jax.configs import default

  config = default.get_config(model)
  config.model.widths, config.dtype = args.width_tuple, dtype
  config.deep_supervision = args.deep_supervision
  parallel.check_batch_size(batch, mesh, flag="--batch")
  network = models.create_model(config)
  # Initialisation compiled without optimisation, as in training.
  variables = jax.jit(lambda r: network.init(r, jnp.zeros((1, size, size, 1)), train=False),
                      compiler_options={"xla_backend_optimization_level": 0})(jax.random.key(0))
  variables = jax.device_put(variables, parallel.replicated(mesh))
  predict = validation.make_predict_fn(network.apply, num_classes=config.num_classes,
                                       average_heads=False, mesh=mesh)
  images = np.random.default_rng(0).random((batch, size, size, 1), dtype=np.float32)
  images = jax.device_put(images, parallel.data_sharding(mesh))
  timing = common.compile_and_time(predict, (variables, images), warmup=args.warmup,
                                   repeats=args.repeats)
  return common.summarize({"benchmark": "predict", "model": model, "size": size,
                           "batch": batch, "dtype": dtype, "cpu_weight_grad": None,
                           "widths": list(network.widths)}, timing, batch=batch, mesh=mesh)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_flags(p)
  p.set_defaults(batch="8", deep_supervision="none")
  args = common.parse(p, argv)
  mesh = common.setup(args)
  common.run_grid(functools.partial(bench_one, args), mesh,
                  {"model": args.models, "size": args.sizes, "batch": args.batches,
                   "dtype": args.dtypes},
                  as_json=args.json,
                  title=f"predict (forward only), widths {args.widths or 'of each network'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
