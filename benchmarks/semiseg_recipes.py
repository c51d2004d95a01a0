r"""The COVID-SemiSeg recipe search: training variants x inference variants, by cross-validation.

    python benchmarks/semiseg_recipes.py --root=runs/search --variants=base,flips --folds=0-4
    python benchmarks/semiseg_recipes.py --root=runs/search --variants=all --folds=0-4 --score_only

Every training variant (VARIANTS) is `launch/semiseg_search.cfg` plus its own
`--config.` overrides, trained fold by fold with `python -m scoat_jax.main`
into `<root>/<variant>/fold<k>`; a finished fold is kept (not trained again)
and its wall time is stored beside it (`train_seconds.txt`), with the versions of
the libraries it trained with (`versions.txt`: rows are compared under one set of
versions). Each fold's last checkpoint then predicts its own validation
slices on their own grid, exactly as `predict` does, under each inference
variant (INFERENCE): plain,
left-right flip TTA, the heads averaged (deep-supervision models),
post-processing chosen on the pooled folds' plain predictions as `export`
chooses it (so its gain is measured on the slices it was chosen on), and
opacity where P(opacity) > 0.5, 0.4 or 0.3 (`config.predict_threshold`; `plain`
is 0.5, or the argmax of 3-class models).

The table: mean Dice over a fold's validation slices (Inf-Net's protocol,
any opacity), its mean +/- std over folds; the paper's six metrics averaged
over every slice of the folds; for 3-class models the DSC of ground glass and
of consolidation over the slices that show them; training minutes per fold
(a self-training variant's include its labelling); with `--paired=VARIANT`, the
mean per-slice DSC difference against that variant and a two-sided Wilcoxon
signed-rank p over the same slices. Markdown on stdout (`--json`: one JSON line
per row, per-slice DSCs included).

Semi-supervised variants (`config.unlabelled`, half of every batch from
`unlabelled_slices`, built where `--unlabelled_dir` or `--data_dir` says):
`onehead_infnet` and `onehead_3class_infnet` read Semi-Inf-Net's maps
(`--soft_labels=.../InfNet-pseudo`); `onehead_self` first has the fold's own
`onehead` model label the unlabelled slices with `python -m
scoat_jax.pseudo_label`, so its teacher saw the fold's training slices only.
`onehead_infnet_pretrain` trains on Semi-Inf-Net's maps alone (`ratio=1`) and
`onehead_infnet_finetune` fine-tunes its last step on the labelled slices
(`config.init_from`): Semi-Inf-Net's own protocol, its time both stages';
`onehead_infnet_finetune_200` fine-tunes it for `onehead_200`'s 200 labelled steps;
`onehead_round2_pretrain` -> `onehead_round2_finetune_200` is a second round, the same
two stages on the labels the fold's `onehead_infnet_finetune_200` model gives the matched
slices.
`onehead_infnet_matched` and `onehead_self_matched` first map every unlabelled
scan's grey levels onto the fold's labelled training slices
(`config.unlabelled.match_intensity`; the own teacher labels the matched slices,
`pseudo_label --match_intensity`). `onehead_self_pretrain` -> `onehead_self_finetune`
is Semi-Inf-Net's protocol with the fold's own matched teacher; `onehead_200` is
`onehead` at the protocol's total steps (200). `onehead_3class_200` and
`onehead_3class_infnet_pretrain` -> `onehead_3class_infnet_finetune` are the same two
with ground glass and consolidation apart; `onehead_3class_expand_finetune` and
`onehead_3class_newhead_finetune` fine-tune the 1-class `onehead_infnet_pretrain`
under a 3-class head (`config.init_head=expand` or `new`).

    python benchmarks/semiseg_recipes.py --root=runs/search --folds=0-4 \
        --variants=onehead,onehead_infnet,onehead_self --paired=onehead \
        --soft_labels=DIR/InfNet-pseudo
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGFILE = REPO / "launch" / "semiseg_search.cfg"
NO_AUG = ["--config.data.rotate_degrees=0", "--config.data.scale_range=(1.0,1.0)",
          "--config.data.intensity_jitter=0"]
EQUALIZE = ["--config.data.uint8_normalization=equalize"]
ONE_HEAD = ["--config.deep_supervision=none"]
VARIANTS = {
    "base": [],                                              # the defaults at the search budget
    "flips": NO_AUG,                                         # flips only
    "onehead": ONE_HEAD,                                     # trained on the last head only
    "onehead_flips": ONE_HEAD + NO_AUG,                      # both
    "equalize": EQUALIZE,                                    # histogram-equalised 8-bit slices
    "gamma": ["--config.data.gamma_range=(0.5,2.0)"],        # random export-window gamma
    "jitter0.3": ["--config.data.intensity_jitter=0.3"],     # stronger intensity jitter
    "bce1": ["--config.loss_kwargs.alpha=1.0"],              # BCE weighted 1 (paper 0.5)
    "size256": ["--config.data.image_size=256"],             # 4x the pixels
    "epochs20": ["--config.num_epochs=20", "--config.decay_every_epochs=8",
                 "--config.eval_every_epochs=20"],           # twice the steps
    "3class": ["--config.num_classes=3", "--config.loss=ce_dice",
               "--config.loss_kwargs.alpha=1.0"],            # GGO / consolidation apart
}
VARIANTS["onehead_3class"] = ONE_HEAD + VARIANTS["3class"]  # the chosen recipe, 3 classes
VARIANTS["onehead_long"] = ONE_HEAD + [                     # 3x the steps, 0.01 for 120 of them
    "--config.num_epochs=30", "--config.decay_every_epochs=12", "--config.restart_epoch=0",
    "--config.eval_every_epochs=30"]
VARIANTS["onehead_200"] = ONE_HEAD + VARIANTS["epochs20"]   # 2x the steps: Semi-Inf-Net's protocol's
# launch/semiseg_cv.cfg, the chosen recipe at full length: 192 px, the paper's 50 epochs
# (500 steps of a fold's 40 slices; 0.01 x0.1 every 10 epochs, restart at 0.001 at 30).
VARIANTS["onehead_full"] = ONE_HEAD + [
    "--config.data.image_size=192", "--config.num_epochs=50", "--config.decay_every_epochs=10",
    "--config.restart_epoch=30", "--config.eval_every_epochs=50", "--config.predict_threshold=0.4"]
# Semi-supervised: half of every batch unlabelled slices with soft labels (config.unlabelled).
SEMI = ONE_HEAD + ["--config.unlabelled.name=unlabelled_slices", "--config.unlabelled.ratio=0.5"]
VARIANTS["onehead_infnet"] = SEMI       # + Semi-Inf-Net's maps (--soft_labels)
VARIANTS["onehead_self"] = SEMI         # + the fold's own onehead model's maps (pseudo_label)
VARIANTS["onehead_infnet_long"] = SEMI + VARIANTS["onehead_long"][1:]  # both
VARIANTS["onehead_3class_infnet"] = SEMI + VARIANTS["3class"]   # 3 classes, soft opacity maps
# One slot of four unlabelled, its loss weighted 0.5: the labelled slices keep 3/4 of the steps.
VARIANTS["onehead_infnet_light_long"] = ONE_HEAD + [
    "--config.unlabelled.name=unlabelled_slices", "--config.unlabelled.ratio=0.25",
    "--config.unlabelled.weight=0.5"] + VARIANTS["onehead_long"][1:]
# Semi-Inf-Net's protocol: train on the pseudo-labelled slices alone, then fine-tune the
# result on the labelled ones (config.init_from; the same steps again).
VARIANTS["onehead_infnet_pretrain"] = ONE_HEAD + [
    "--config.unlabelled.name=unlabelled_slices", "--config.unlabelled.ratio=1"]
VARIANTS["onehead_infnet_finetune"] = ONE_HEAD
# The same pre-training, then the labelled slices for as many steps as onehead_200: the
# pre-training is added to the labelled schedule rather than taken out of it.
VARIANTS["onehead_infnet_finetune_200"] = VARIANTS["onehead_200"]
# Every unlabelled scan's grey levels matched to the fold's labelled training slices
# (config.unlabelled.match_intensity; its teacher labels the matched slices too).
MATCH = ["--config.unlabelled.match_intensity=True"]
VARIANTS["onehead_infnet_matched"] = SEMI + MATCH
VARIANTS["onehead_self_matched"] = SEMI + MATCH
# The same protocol with the fold's own onehead model as the teacher (leak-free in CV),
# labelling the matched slices.
VARIANTS["onehead_self_pretrain"] = VARIANTS["onehead_infnet_pretrain"] + MATCH
VARIANTS["onehead_self_finetune"] = ONE_HEAD
# A second round: the fold's round-1 student (onehead_infnet_finetune_200) labels the
# matched unlabelled slices, and the protocol runs again on its labels (unmatched, the
# student calls 39% of the pixels opacity, the wide-window scans' soft tissue included).
VARIANTS["onehead_round2_pretrain"] = VARIANTS["onehead_infnet_pretrain"] + MATCH
VARIANTS["onehead_round2_finetune_200"] = VARIANTS["onehead_200"]
# 3 classes: labelled only at the protocol's 200 steps, and the protocol (its pre-training
# trains P(opacity) = 1 - P(background) on the 1-class maps; fine-tuning splits the classes).
VARIANTS["onehead_3class_200"] = VARIANTS["onehead_3class"] + VARIANTS["epochs20"]
VARIANTS["onehead_3class_infnet_pretrain"] = VARIANTS["onehead_infnet_pretrain"] + VARIANTS["3class"]
VARIANTS["onehead_3class_infnet_finetune"] = VARIANTS["onehead_3class"]
# The 1-class protocol's pre-trained model under a 3-class head, fine-tuned on the labelled
# slices: the head starts from the 1-class one (expand: P(opacity) unchanged, the split even)
# or fresh (new); config.init_head.
VARIANTS["onehead_3class_expand_finetune"] = VARIANTS["onehead_3class"] + ["--config.init_head=expand"]
VARIANTS["onehead_3class_newhead_finetune"] = VARIANTS["onehead_3class"] + ["--config.init_head=new"]
INIT_FROM = {"onehead_infnet_finetune": "onehead_infnet_pretrain",   # variant: trained first
             "onehead_infnet_finetune_200": "onehead_infnet_pretrain",
             "onehead_round2_finetune_200": "onehead_round2_pretrain",
             "onehead_self_finetune": "onehead_self_pretrain",
             "onehead_3class_infnet_finetune": "onehead_3class_infnet_pretrain",
             "onehead_3class_expand_finetune": "onehead_infnet_pretrain",
             "onehead_3class_newhead_finetune": "onehead_infnet_pretrain"}
SOFT_FROM = {"onehead_infnet": "--soft_labels", "onehead_infnet_pretrain": "--soft_labels", "onehead_self": "onehead",
             "onehead_infnet_long": "--soft_labels", "onehead_3class_infnet": "--soft_labels",
             "onehead_infnet_light_long": "--soft_labels", "onehead_infnet_matched": "--soft_labels",
             "onehead_self_matched": "onehead", "onehead_self_pretrain": "onehead",
             "onehead_3class_infnet_pretrain": "--soft_labels",
             "onehead_round2_pretrain": "onehead_infnet_finetune_200"}
INFERENCE = ("plain", "tta", "heads", "pp", "p0.5", "p0.4", "p0.3")
METRICS = ("dsc", "sen", "ppv", "va", "rlp", "rlr")


def parse_folds(text: str) -> list[int]:
  out = []
  for part in text.split(","):
    lo, _, hi = part.partition("-")
    out.extend(range(int(lo), int(hi or lo) + 1))
  return out


def needs_maps(variant: str) -> bool:
  """Whether training `variant` reads Semi-Inf-Net's maps, itself or through a stage or
  teacher it is trained from."""
  source = SOFT_FROM.get(variant)
  if source == "--soft_labels":
    return True
  return any(needs_maps(v) for v in (source, INIT_FROM.get(variant)) if v)


def soft_labels(root: pathlib.Path, variant: str, fold: int, args) -> tuple[list[str], float]:
  """The soft-label override of a semi-supervised variant, and the seconds spent labelling.

  `onehead_infnet` reads Semi-Inf-Net's maps (`--soft_labels`); `onehead_self`
  has the fold's own `onehead` model label the unlabelled slices first (its
  teacher never saw the fold's validation slices), with `python -m
  scoat_jax.pseudo_label`, into `<root>/onehead_self/fold<k>_soft`.
  """
  source = SOFT_FROM.get(variant)
  if source is None:
    return [], 0.0
  if source == "--soft_labels":
    assert args.soft_labels, "main() checks --soft_labels"
    return [f"--config.unlabelled.soft_labels={args.soft_labels}"], 0.0
  output = root / variant / f"fold{fold}_soft"
  seconds = 0.0
  if not output.is_dir():
    train(root, source, fold, args)
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "scoat_jax.pseudo_label", f"--teacher={root / source / f'fold{fold}'}",
           "--data=unlabelled_slices", f"--data_dir={args.unlabelled_dir or args.data_dir or ''}",
           f"--output={output}"] + (["--match_intensity"] if MATCH[0] in VARIANTS[variant] else [])
    print(f"# labelling for {variant} fold {fold}: {' '.join(cmd[1:])}", file=sys.stderr,
          flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
  return [f"--config.unlabelled.soft_labels={output}"], seconds


def versions() -> str:
  """'jax 0.10.2, jaxlib 0.10.2, flax ..., numpy ..., Pillow ..., CPU ...': what a trained
  number rests on."""
  from importlib import metadata
  from scoat_jax.evaluation.model_cost import cpu_model
  out = []
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "Pillow"):
    try:
      out.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      out.append(f"{name} -")
  return ", ".join(out + [f"CPU {cpu_model()}"])


def train(root: pathlib.Path, variant: str, fold: int, args) -> float:
  """Trains one fold unless done; returns its wall seconds (labelling and a first stage
  included)."""
  workdir = root / variant / f"fold{fold}"
  stamp = workdir / "train_seconds.txt"
  if stamp.exists():
    return float(stamp.read_text())
  soft, label_seconds = soft_labels(root, variant, fold, args)
  init = []
  if variant in INIT_FROM:   # its first stage's last step, not a step chosen on validation
    first = INIT_FROM[variant]
    label_seconds += train(root, first, fold, args)
    steps = root / first / f"fold{fold}" / "checkpoints"
    last = max((d for d in steps.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
    init = [f"--config.init_from={last}"]
  data = [f"--config.data.data_dir={args.data_dir}"] if args.data_dir else []
  if args.unlabelled_dir and soft:
    data.append(f"--config.unlabelled.data_dir={args.unlabelled_dir}")
  cmd = [sys.executable, "-m", "scoat_jax.main", "--config=scoat_jax/configs/default.py",
         f"--flagfile={FLAGFILE}", f"--config.data.fold={fold}", f"--workdir={workdir}",
         *VARIANTS[variant], *data, *soft, *init, *args.extra]
  print(f"# training {variant} fold {fold}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
  t0 = time.time()
  subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
  seconds = time.time() - t0 + label_seconds
  (workdir / "versions.txt").write_text(versions() + "\n")
  stamp.write_text(f"{seconds:.1f}\n")
  return seconds


def validation_slices(model, data_dir):
  """(stem, image, truth) of the fold's validation slices, from the model's own dataset."""
  from scoat_jax.inference import export
  ds, entries = export.validation_scans(model, data_dir=data_dir)
  for entry in entries:
    for r in range(entry.count):
      rec = ds.source[entry.start + r]
      yield entry.scan_id, np.asarray(rec["image"]), np.asarray(rec["mask"])


def score_variant(root: pathlib.Path, variant: str, folds: list[int], data_dir: str | None,
                  inference: tuple[str, ...]) -> list[dict]:
  from scoat_jax import models as models_lib
  from scoat_jax.evaluation import metrics, validation
  from scoat_jax.inference import postprocessing
  from scoat_jax.inference.loading import load_model
  from scoat_jax.inference.predictor import Predictor
  per_fold = {name: {} for name in inference}   # name -> fold -> [(stem, pred, truth)]
  seconds, num_classes = [], 1
  for fold in folds:
    workdir = root / variant / f"fold{fold}"
    seconds.append(float((workdir / "train_seconds.txt").read_text()))
    model = load_model(workdir)
    num_classes = model.num_classes
    slices = list(validation_slices(model, data_dir))
    images = [s[1] for s in slices]
    heads = models_lib.deep_supervision_mode(model.config) != "none"
    for name in inference:
      if name == "pp" or name == "heads" and not heads:
        continue
      m = model
      if name == "heads" or name.startswith("p0."):
        config = model.config.copy_and_resolve_references()
        if name == "heads":
          config.predict_average_heads = True
        else:
          config.predict_threshold = float(name[1:])
        m = dataclasses.replace(model, config=config)
      predictor = Predictor([m], tta=name == "tta")
      preds = [labels for labels, _ in predictor.predict_slices(images, source="uint8")]
      per_fold[name][fold] = [(s[0], p, s[2]) for s, p in zip(slices, preds)]
  rows = []
  if "pp" in inference and "plain" in per_fold:
    cases = [{"pred": p, "truth": t, "spacing_xyz": None, "lung": None}
             for fold in folds for _, p, t in per_fold["plain"][fold]]
    rule = postprocessing.choose(cases)
    per_fold["pp"] = {fold: [(s, postprocessing.apply(p, rule)[0], t)
                             for s, p, t in per_fold["plain"][fold]] for fold in folds}
    pp_rule = postprocessing.describe(rule)
  for name in inference:
    if not per_fold.get(name):
      continue
    scored = {fold: [metrics.case_metrics(p > 0, t > 0) for _, p, t in per_fold[name][fold]]
              for fold in folds}
    fold_dsc = [float(np.mean([c["dsc"] for c in scored[f]])) for f in folds]
    every = [c for f in folds for c in scored[f]]
    row = {"variant": variant, "inference": name, "folds": len(folds),
           "dsc_folds_mean": float(np.mean(fold_dsc)), "dsc_folds_std": float(np.std(fold_dsc)),
           "dsc_per_fold": fold_dsc, "slices": len(every),
           "slice_ids": [sid for f in folds for sid, _, _ in per_fold[name][f]],
           "dsc_per_slice": [c["dsc"] for c in every],
           "train_minutes_per_fold": float(np.mean(seconds)) / 60}
    row.update({k: float(np.mean([c[k] for c in every])) for k in METRICS})
    if num_classes == 3:
      for k, cls in ((1, "ggo"), (2, "consolidation")):
        # Over the slices whose truth shows the class.
        values = [validation.class_dsc(p, t, k) for f in folds for _, p, t in per_fold[name][f]
                  if (t == k).any()]
        row[f"dsc_{cls}"], row[f"slices_{cls}"] = float(np.mean(values)), len(values)
    if name == "pp":
      row["rule"] = pp_rule
    rows.append(row)
  return rows


def paired_test(rows: list[dict], baseline: str) -> None:
  """Adds `paired_p` (two-sided Wilcoxon signed-rank, per-slice DSC) and `paired_delta`.

  Each row is compared with the baseline variant's row of the same inference
  variant (its plain row where it has none), slice by slice.
  """
  from scipy import stats
  bases = {r["inference"]: r for r in rows if r["variant"] == baseline}
  for row in rows:
    base = bases.get(row["inference"], bases.get("plain"))
    if base is None or row is base or row["slice_ids"] != base["slice_ids"]:
      continue
    diff = np.asarray(row["dsc_per_slice"]) - np.asarray(base["dsc_per_slice"])
    row["paired_delta"] = float(diff.mean())
    row["paired_p"] = float(stats.wilcoxon(diff).pvalue) if np.any(diff) else 1.0


def markdown(rows: list[dict]) -> str:
  head = ("| variant | inference | folds | mean Dice over folds | SEN | PPV | VA | RLP | RLR "
          "| DSC GGO | DSC consolidation | train min/fold | paired ΔDSC (p) |")
  out = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ggo = f"{r['dsc_ggo']:.3f}" if "dsc_ggo" in r else "-"
    con = f"{r['dsc_consolidation']:.3f}" if "dsc_consolidation" in r else "-"
    name = r["inference"] + (f" ({r['rule']})" if r.get("rule") else "")
    paired = (f"{r['paired_delta']:+.3f} ({r['paired_p']:.3g})" if "paired_p" in r else "-")
    out.append(f"| {r['variant']} | {name} | {r['folds']} | {r['dsc_folds_mean']:.3f} ± "
               f"{r['dsc_folds_std']:.3f} | {r['sen']:.3f} | {r['ppv']:.3f} | {r['va']:.3f} | "
               f"{r['rlp']:.3f} | {r['rlr']:.3f} | {ggo} | {con} | "
               f"{r['train_minutes_per_fold']:.1f} | {paired} |")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", required=True, help="runs go to <root>/<variant>/fold<k>")
  p.add_argument("--variants", default="base", help=f"comma-separated, or all: {', '.join(VARIANTS)}")
  p.add_argument("--folds", default="0-4", help="e.g. 0-4 or 0,2")
  p.add_argument("--inference", default=",".join(INFERENCE), help=f"subset of {INFERENCE}")
  p.add_argument("--data_dir", default=None, help="where covid_semiseg is built (TFDS default)")
  p.add_argument("--score_only", action="store_true", help="score finished folds, train none")
  p.add_argument("--json", action="store_true", help="one JSON line per row instead of markdown")
  p.add_argument("--unlabelled_dir", default=None,
                 help="where unlabelled_slices is built (default: --data_dir)")
  p.add_argument("--soft_labels", default=None,
                 help="Semi-Inf-Net's InfNet-pseudo/ folder, for onehead_infnet")
  p.add_argument("--paired", default=None,
                 help="a variant: every row also gets a Wilcoxon signed-rank test of its "
                      "per-slice DSC against that variant's plain row (same slices)")
  p.add_argument("--extra", action="append", default=[],
                 help="an extra --config. override for every run (repeatable)")
  args = p.parse_args(argv)
  names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
  inference = tuple(args.inference.split(","))
  for n in names:
    if n not in VARIANTS:
      print(f"error: --variants: {n!r} is not one of {', '.join(VARIANTS)}", file=sys.stderr)
      return 2
  for n in names:
    if needs_maps(n) and not args.soft_labels and not args.score_only:
      print(f"error: --variants={n} needs --soft_labels=DIR (Semi-Inf-Net's InfNet-pseudo/)",
            file=sys.stderr)
      return 2
  for n in inference:
    if n not in INFERENCE:
      print(f"error: --inference: {n!r} is not one of {', '.join(INFERENCE)}", file=sys.stderr)
      return 2
  root = pathlib.Path(args.root).expanduser().resolve()
  folds = parse_folds(args.folds)
  if not args.score_only:
    for n in names:
      for k in folds:
        try:
          train(root, n, k, args)
        except subprocess.CalledProcessError as e:   # its own stderr has said why
          print(f"error: python {' '.join(map(str, e.cmd[1:3]))} exited {e.returncode} for "
                f"{n} fold {k} (its messages are above); finished folds are kept: run again "
                "to go on", file=sys.stderr)
          return 1
  names = [n for n in names
           if all((root / n / f"fold{k}" / "train_seconds.txt").exists() for k in folds)]
  if args.paired and args.paired not in names:
    names.append(args.paired)
  rows = [r for n in names for r in score_variant(root, n, folds, args.data_dir, inference)]
  if args.paired:
    paired_test(rows, args.paired)
  if args.json:
    for r in rows:
      print(json.dumps(r))
  else:
    print(f"{datetime.date.today()}, {os.cpu_count()} CPUs, {versions()}; python benchmarks/semiseg_recipes.py "
          + " ".join(sys.argv[1:] if argv is None else argv) + "\n")
    print(markdown(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
