r"""Do unlabelled scans help a model trained on two labelled ones? The phantom walkthrough.

The README's three commands for learning from unlabelled scans, run on the
synthetic phantom where every scan's truth is known:

1. labelled: `ct_phantom` with 4 patients (one scan each, 16 x 64 x 64), two
   folds by patient: fold 0 trains on 2 scans and is validated on the other 2;
2. unlabelled: `--unlabelled` further phantom scans (other patients, another
   seed) written as volumes and built as `unlabelled_volumes`;
3. the teacher: SCOAT-Net (narrow widths, 64 px) trained on the 2 labelled scans;
   `python -m scoat_jax.pseudo_label` labels the unlabelled scans;
4. the student: the same recipe from scratch, the same steps, half of every batch
   from the unlabelled scans with the teacher's soft labels.

Both are scored at their last step by validation DSC on the 2 held-out scans,
per seed; the table is the teacher (labelled only) against the student.

    python benchmarks/semi_phantom.py --root=runs/semi_phantom --seeds=0,1,2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
DATASET = "ct_phantom/p4_t1_s0_16x64x64"
RECIPE = ["--config=scoat_jax/configs/default.py", f"--config.data.name={DATASET}",
          "--config.data.num_folds=2", "--config.data.fold=0", "--config.data.image_size=64",
          "--config.data.worker_count=0", "--config.model.widths=8,16,32,64,128",
          "--config.deep_supervision=none", "--config.batch_size=4",
          "--config.steps_per_epoch=20", "--config.num_epochs=15",
          "--config.decay_every_epochs=6", "--config.restart_epoch=0",
          "--config.eval_every_epochs=15", "--config.log_every_steps=100"]


def _run(cmd: list[str]) -> float:
  print("# " + " ".join(cmd), file=sys.stderr, flush=True)
  t0 = time.time()
  subprocess.run([sys.executable, *cmd], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
  return time.time() - t0


def _final_dsc(workdir: pathlib.Path) -> float:
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return float([r for r in records if "val_dsc" in r][-1]["val_dsc"])


def prepare(root: pathlib.Path, unlabelled: int) -> tuple[str, str]:
  """Builds the labelled and unlabelled datasets (once); returns (data_dir, unlabelled_dir)."""
  from scoat_jax.data import phantom
  data_dir = root / "tfds"
  if not (root / "datasets_done").exists():
    _run(["-m", "scoat_jax.datasets.build", "ct_phantom", "--patients=4", "--timepoints=1",
          "--seed=0", "--shape=16x64x64", f"--data_dir={data_dir}"])
    scans = root / "unlabelled_scans"
    scans.mkdir(parents=True, exist_ok=True)
    for p in range(unlabelled):
      scan = phantom.generate_scan(7, p, 0, shape=(16, 64, 64))
      written = phantom.write_scan(scan, scans, overwrite=True)
      written["label"].unlink()   # scans and lung masks only: their truth stays unseen
    _run(["-m", "scoat_jax.datasets.build", "unlabelled_volumes", f"--manual_dir={scans}",
          f"--data_dir={data_dir}"])
    (root / "datasets_done").write_text("")
  return str(data_dir), str(data_dir)


def one_seed(root: pathlib.Path, seed: int, data_dir: str) -> dict:
  teacher, student = root / f"seed{seed}" / "teacher", root / f"seed{seed}" / "student"
  soft = root / f"seed{seed}" / "soft"
  common = [*RECIPE, f"--config.seed={seed}", f"--config.data.data_dir={data_dir}"]
  seconds = {}
  if not (teacher / "done").exists():
    seconds["teacher"] = _run(["-m", "scoat_jax.main", *common, f"--workdir={teacher}"])
    (teacher / "done").write_text("")
  if not soft.exists():
    seconds["label"] = _run(["-m", "scoat_jax.pseudo_label", f"--teacher={teacher}",
                             "--data=unlabelled_volumes", f"--data_dir={data_dir}",
                             f"--output={soft}"])
  if not (student / "done").exists():
    seconds["student"] = _run(["-m", "scoat_jax.main", *common, f"--workdir={student}",
                               "--config.unlabelled.name=unlabelled_volumes",
                               f"--config.unlabelled.data_dir={data_dir}",
                               f"--config.unlabelled.soft_labels={soft}",
                               "--config.unlabelled.ratio=0.5"])
    (student / "done").write_text("")
  manifest = json.loads((soft / "soft_labels.json").read_text())
  return {"seed": seed, "teacher_dsc": _final_dsc(teacher), "student_dsc": _final_dsc(student),
          "unlabelled_opacity": statistics.mean(s["opacity"] for s in manifest["slices"].values()),
          "seconds": seconds}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", required=True, help="datasets and runs go here (kept: reruns go on)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
  p.add_argument("--unlabelled", type=int, default=8, help="unlabelled phantom scans")
  args = p.parse_args(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
  except ValueError:
    print(f"error: --seeds={args.seeds}: give integers, e.g. --seeds=0,1,2", file=sys.stderr)
    return 2
  if args.unlabelled < 1:
    print(f"error: --unlabelled={args.unlabelled}: give at least 1 scan", file=sys.stderr)
    return 2
  root = pathlib.Path(args.root).expanduser().resolve()
  try:
    data_dir, _ = prepare(root, args.unlabelled)
    rows = [one_seed(root, s, data_dir) for s in seeds]
  except subprocess.CalledProcessError as e:
    print(f"error: python {' '.join(map(str, e.cmd[1:3]))} exited {e.returncode} (its messages "
          "are above); finished stages are kept: run again to go on", file=sys.stderr)
    return 1
  from scoat_jax.evaluation.model_cost import cpu_model  # the CPU's model name, not just 'x86_64'
  print(f"{datetime.date.today()}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs; python benchmarks/semi_phantom.py "
        + " ".join(sys.argv[1:] if argv is None else argv) + "\n")
  print("| seed | labelled only (2 scans): val DSC | + unlabelled scans: val DSC | Δ | "
        "teacher's opacity share of unlabelled pixels |")
  print("|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['seed']} | {r['teacher_dsc']:.3f} | {r['student_dsc']:.3f} | "
          f"{r['student_dsc'] - r['teacher_dsc']:+.3f} | {r['unlabelled_opacity']:.3f} |")
  deltas = [r["student_dsc"] - r["teacher_dsc"] for r in rows]
  print(f"\nmean Δ over {len(rows)} seed(s): {statistics.mean(deltas):+.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
