"""The paper's recipe: SCOAT-Net, BCE-Dice, Adam 0.01 with step decay and a warm
restart, 512x512 slices, 5-fold cross-validation by patient.

Every hyperparameter lives here; flagfiles in `launch/` override fields with
`--config.<field>=<value>` (a misspelt field is an error). Values marked (ours)
are not given by the paper (see ../shared/design/SCOAT_NET.md).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model.
  c.model = "scoat_net"
  c.num_classes = 1                   # 1: any opacity (sigmoid); 3: bg/GGO/consolidation.
  c.widths = (32, 64, 128, 256, 512)
  c.dtype = "float32"                 # or "bfloat16" (parameters stay float32).
  c.fast_cpu_grad = True              # CPU only: fast conv weight gradients (native kernel or per-tap matmuls).
  c.deep_supervision = "mean"         # 'mean' over four heads | 'last' head | 'none' (one head).
  c.predict_average_heads = False     # (ours) inference uses the last head unless set.

  # Loss.
  c.loss = "bce_dice"                 # mae | bce | dice | iou | focal | bce_dice (1 class); ce_dice (3).
  c.loss_alpha = 0.5                  # BCE weight in BCE-Dice.

  # Optimisation: Adam; lr 0.01 x0.1 every 10 epochs; warm restart at 0.001.
  c.batch_size = 8                    # global, over all devices and hosts (ours).
  c.learning_rate = 0.01
  c.restart_learning_rate = 0.001
  c.decay_every_epochs = 10
  c.decay_factor = 0.1
  c.restart_epoch = 30                # (ours) the paper restarts "when converged".
  c.num_epochs = 50
  c.steps_per_epoch = -1              # -1: training slices // batch_size.

  # Data (read by scoat_jax.input_pipeline).
  c.data = ml_collections.ConfigDict()
  c.data.name = "ct_volumes"          # ct_volumes | covid_semiseg | ct_phantom
  c.data.data_dir = ""                # "" -> TFDS default (~/tensorflow_datasets).
  c.data.image_size = 512
  c.data.fold = 0
  c.data.num_folds = 5
  c.data.fold_seed = 0
  c.data.hu_window = (-1250.0, 250.0)  # (ours) HU window scaled to [0, 1].
  c.data.num_classes = c.get_ref("num_classes")
  c.data.augment = True
  c.data.flip = True
  c.data.rotate_degrees = 10.0        # (ours) augmentation strengths.
  c.data.scale_range = (0.9, 1.1)
  c.data.intensity_jitter = 0.1
  c.data.worker_count = 2
  c.data.slices = "all"

  # Evaluation, logging, checkpoints.
  c.eval_batch_size = 8
  c.eval_every_epochs = 1
  c.log_every_steps = 10
  c.num_overlays = 4                  # validation overlays written to TensorBoard.
  c.init_from = ""                    # a checkpoint dir/step or a PyTorch .npz/.pth.
  c.max_steps = -1                    # >0 stops early (tests, smoke runs).

  # Runtime.
  c.distributed = False               # force jax.distributed.initialize().
  c.compilation_cache_dir = "~/.cache/scoat_jax/jax_cache"  # "" turns the cache off.
  return c
