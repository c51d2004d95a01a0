"""The paper's recipe: SCOAT-Net, BCE-Dice, Adam 0.01 with step decay and a warm
restart, 512x512 slices, 5-fold cross-validation by patient.

Every hyperparameter lives here; flagfiles in `launch/` override fields with
`--config.<field>=<value>` (a misspelt field is an error naming the closest
one). Values marked (ours) are not given by the paper (docs/design.md).

`--config=scoat_jax/configs/default.py:ARG` starts from another network of
Tables II-III or another loss of Table I, or both (`:unet`, `:focal`,
`:unet,focal`), with that network's options in `model` and that loss's in
`loss_kwargs` (e.g. `:pspnet` adds `model.bins`, `:focal` gives gamma 2 and
alpha 0.25); `--config.model.<option>=` and `--config.loss_kwargs.<option>=`
then override them. `--config.model_name=NAME` alone changes the network
but keeps only the options every network has (`num_classes`, `widths`).
"""
import ml_collections

from scoat_jax.configs import CONFIG_VERSION


def parse_arg(arg: str | None) -> tuple[str | None, str | None]:
  """':unet,focal' -> ('unet', 'focal'): which tokens name a network and which a loss."""
  from scoat_jax import models  # pylint: disable=import-outside-toplevel
  from scoat_jax.training import losses  # pylint: disable=import-outside-toplevel
  model = loss = None
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if token in models.available_models() and model is None:
      model = token
    elif token in losses.LOSSES and loss is None:
      loss = token
    else:
      raise ValueError(f"config argument {token!r} is neither a network "
                       f"({', '.join(models.available_models())}) nor a loss "
                       f"({', '.join(losses.LOSSES)}), or repeats one")
  return model, loss


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  model, loss = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.config_version = CONFIG_VERSION
  c.seed = 0
  c.num_classes = 1                   # 1: any opacity (sigmoid); 3: bg/GGO/consolidation.

  # Model: models.get_model(model_name, **model), plus the shared options below.
  c.model_name = model or "scoat_net"
  c.model = ml_collections.ConfigDict()
  c.model.num_classes = c.get_ref("num_classes")
  # None: the network's own (paper) widths; a tuple of 5 overrides them.
  c.model.widths = ml_collections.FieldReference(None, field_type=tuple)
  if model is not None:
    from scoat_jax import models  # pylint: disable=import-outside-toplevel
    c.model.update(models.model_options(model))
  c.deep_supervision = "auto"         # auto: 'mean' where the net has heads, else 'none';
                                      # 'mean' over the heads | 'last' head | 'none' (one head).
  c.dtype = "float32"                 # or "bfloat16" (parameters stay float32).
  c.cpu_weight_grad = "auto"          # CPU only: auto | native (kernel) | taps (XLA dots) | xla.
  c.predict_average_heads = False     # (ours) inference uses the last head unless set.
  # (ours) None: P(opacity) > 0.5 (argmax for 3 classes); a number t in (0, 1):
  # opacity where P(opacity) > t, in validation and inference alike.
  c.predict_threshold = ml_collections.FieldReference(None, field_type=float)

  # Loss: training.losses.get_loss(loss, **loss_kwargs).
  c.loss = loss or "bce_dice"         # mae | bce | dice | iou | focal | bce_dice (1 class); ce_dice (3).
  if loss is None:
    c.loss_kwargs = ml_collections.ConfigDict({"alpha": 0.5})  # the paper's BCE weight.
  else:
    from scoat_jax.training import losses  # pylint: disable=import-outside-toplevel
    c.loss_kwargs = ml_collections.ConfigDict(losses.default_kwargs(loss))

  # Optimisation: Adam; lr 0.01 x0.1 every 10 epochs; warm restart at 0.001.
  c.batch_size = 8                    # global, over all devices and hosts (ours).
  c.learning_rate = 0.01
  c.restart_learning_rate = 0.001
  c.decay_every_epochs = 10
  c.decay_factor = 0.1
  c.restart_epoch = 30                # (ours) the paper restarts "when converged".
  c.num_epochs = 50
  c.steps_per_epoch = -1              # -1: training slices // batch_size.

  # Data (read by scoat_jax.training.input_pipeline).
  c.data = ml_collections.ConfigDict()
  c.data.name = "ct_volumes"          # ct_volumes | covid_semiseg | ct_phantom
  c.data.data_dir = ""                # "" -> TFDS default (~/tensorflow_datasets).
  c.data.image_size = 512
  # Which of num_folds parts validates; -1 (or `--config.data.fold=all`) trains the final
  # model on every case, without validation (data.folds). Any literal parses, so `all`
  # can be given; training stores it as -1.
  c.data.fold = ml_collections.FieldReference(0, field_type=object)
  c.data.num_folds = 5
  c.data.fold_seed = 0
  c.data.hu_window = (-1250.0, 250.0)  # (ours) HU window scaled to [0, 1].
  c.data.uint8_normalization = "scale"  # (ours) 8-bit slices: scale (/255) | equalize.
  c.data.num_classes = c.get_ref("num_classes")
  c.data.augment = True
  c.data.flip = True
  c.data.rotate_degrees = 10.0        # (ours) augmentation strengths.
  c.data.scale_range = (0.9, 1.1)
  c.data.intensity_jitter = 0.1
  c.data.gamma_range = (1.0, 1.0)     # (ours) image ** gamma, log-uniform; (1, 1): off.
  c.data.worker_count = 2
  c.data.slices = "all"

  # (ours) Semi-supervised training: unlabelled slices with soft labels in every batch
  # (scoat_jax/training/unlabelled.py); name '' trains on labelled slices only.
  c.unlabelled = ml_collections.ConfigDict()
  c.unlabelled.name = ""              # unlabelled_slices | unlabelled_volumes
  c.unlabelled.data_dir = ""          # "" -> data.data_dir
  c.unlabelled.soft_labels = ""       # folder of <name>.png maps (InfNet-pseudo/, pseudo_label)
  c.unlabelled.ratio = 0.5            # share of each batch
  c.unlabelled.weight = 1.0           # of their loss against the labelled one
  c.unlabelled.min_confidence = 0.0   # pixels with |2p - 1| below it carry no loss
  c.unlabelled.hard = False           # targets p > 0.5 instead of p
  c.unlabelled.slices = "all"         # all | lung
  c.unlabelled.match_intensity = False  # 8-bit: each scan's grey levels onto the labelled ones

  # Evaluation, logging, checkpoints.
  c.eval_batch_size = 8
  c.eval_every_epochs = 1
  c.log_every_steps = 10
  c.num_overlays = 4                  # validation overlays written to TensorBoard.
  c.init_from = ""                    # a checkpoint dir/step or a PyTorch .npz/.pth.
  c.init_head = "same"                # init_from of another class count: same | new | expand
  c.max_steps = -1                    # >0 stops early (tests, smoke runs).

  # Runtime.
  c.distributed = False               # force jax.distributed.initialize().
  c.compilation_cache_dir = "~/.cache/scoat_jax/jax_cache"  # "" turns the cache off.
  return c
