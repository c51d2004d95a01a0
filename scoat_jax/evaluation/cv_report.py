r"""Cross-validation report in the paper's layout (Table II, box plots of Fig. 3): the library.

    python -m scoat_jax.report --workdirs runs/fold* --output=reports/cv
    python -m scoat_jax.report --workdirs=runs/scoat_f0,runs/scoat_f1 \
        --workdirs=runs/unet_f0,runs/unet_f1 --labels=SCOAT-Net,SCOAT-Net,U-Net,U-Net --output=DIR

For every training workdir the best checkpoint (by validation DSC, see
`scoat_jax.checkpoints`), or with `at='last'` the latest evaluated one (no
choice made on the validation fold, hence no optimism), is found and its
meta JSON read: at each evaluation
training stores there the per-case metrics of the fold's validation cases
('per_case': case_id, dsc, sen, ppv, va, rlp, rlr). Runs are grouped into
rows by `config.model_name` and `config.loss` from `<workdir>/config.json`, or by
--labels (one per workdir, in order). The cases of a row's folds are pooled
(each case is validated in exactly one fold) and summarised as mean ± std
(population std, as in the training logs) and median over cases; beside
them each metric's mean over a fold's cases, as mean ± std over the folds
(Inf-Net's protocol where a case is a slice).

A final model's workdir (`--config.data.fold=-1`: trained on every case,
validated on none) has no validation metrics and is refused with one line
naming it, whether named directly or matched by a glob: the report is of
cross-validation folds, and skipping a run silently could hide a mistake.

Beyond the paper's columns, each row gets the two-sided paired Wilcoxon
signed-rank p-value of its per-case DSC against a reference row (SCOAT-Net
with BCE-Dice unless --reference names another; cases paired by id), and the
cost of its network: trainable parameters, GFLOPs and forward milliseconds
per 512x512 slice on the machine that writes the report
(`scoat_jax.evaluation.model_cost`).

Writes into --output: `cv_report.md` (the tables, plus one line per run),
`cv_report.csv` (one row per model/loss: mean, std, median of each metric,
p-value, costs),
`cv_per_case.csv` (every case of every run) and `boxplot_<metric>.png` (one
box per row, the cases as dots).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scoat_jax import checkpoints, configs  # noqa: E402
from scoat_jax.common import fileio  # noqa: E402
from scoat_jax.evaluation import metrics as metrics_lib  # noqa: E402

COST_SLICE = 512  # the paper's slice size, for GFLOPs and forward time
METRICS = ("dsc", "sen", "ppv", "va", "rlp", "rlr")
TITLES = {"dsc": "DSC", "sen": "SEN", "ppv": "PPV", "va": "VA", "rlp": "RLP", "rlr": "RLR",
          "dsc_ggo": "DSC GGO", "dsc_consolidation": "DSC consolidation"}
# Three-class runs also store the DSC of each class (None where a case shows neither).
CLASS_METRICS = ("dsc_ggo", "dsc_consolidation")
OUTPUTS = ("cv_report.md", "cv_report.csv", "cv_per_case.csv") + tuple(
    f"boxplot_{m}.png" for m in METRICS)


class ReportError(ValueError):
  """A workdir or request the report cannot use; the message says how to fix it."""


@dataclasses.dataclass
class Run:
  """One fold's run: where it is, its best step and the per-case metrics there."""
  workdir: pathlib.Path
  label: str
  fold: int | None
  step: int
  per_case: list[dict]
  config: dict = dataclasses.field(default_factory=dict)


def expand_workdirs(patterns: Sequence[str]) -> list[pathlib.Path]:
  """Workdir arguments -> folders (comma lists and unexpanded globs are expanded)."""
  out: list[pathlib.Path] = []
  for pattern in patterns:
    for part in (p.strip() for p in str(pattern).split(",")):
      if not part:
        continue
      matches = sorted(glob.glob(str(pathlib.Path(part).expanduser()))) if glob.has_magic(part) else [part]
      if not matches:
        raise ReportError(f"--workdirs={part}: matches no folder; check the pattern.")
      out += [pathlib.Path(m).expanduser() for m in matches]
  if not out:
    raise ReportError("no workdir given; pass --workdirs runs/fold* (training workdirs).")
  seen = set()
  for w in out:
    if w.resolve() in seen:
      raise ReportError(f"--workdirs names {w} twice; give each run once.")
    seen.add(w.resolve())
  return out


def _check_case(workdir: pathlib.Path, step_dir: pathlib.Path, i: int, case) -> dict:
  if not isinstance(case, dict) or "case_id" not in case:
    raise ReportError(f"{step_dir}: per_case[{i}] has no case_id; re-evaluate the run with "
                      "this version's training.")
  row = {"case_id": str(case["case_id"])}
  for m in METRICS:
    v = case.get(m)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
      raise ReportError(f"{step_dir}: per_case[{i}] ({case['case_id']}) has {m}={v!r}, not a "
                        "number in [0, 1]; the checkpoint's metadata is damaged.")
    row[m] = float(v)
  for m in CLASS_METRICS:
    v = case.get(m)
    if m in case and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                        or not 0.0 <= float(v) <= 1.0):
      raise ReportError(f"{step_dir}: per_case[{i}] ({case['case_id']}) has {m}={v!r}, not a "
                        "number in [0, 1] or null; the checkpoint's metadata is damaged.")
    if m in case:
      row[m] = None if v is None else float(v)
  return row


AT = ("best", "last")


def _check_at(at: str) -> None:
  if at not in AT:
    raise ReportError(f"--at={at}: choose best (highest validation DSC) or last (the latest "
                      "evaluated checkpoint).")


def _last_evaluated(workdir: pathlib.Path) -> pathlib.Path:
  steps = sorted((d for d in (workdir / "checkpoints").glob("*") if d.name.isdigit()),
                 key=lambda d: int(d.name), reverse=True)
  for d in steps:
    try:
      if checkpoints.read_meta(d).get("per_case"):
        return d
    except (OSError, ValueError):
      continue
  raise ReportError(f"{workdir}: no checkpoint holds validation metrics; evaluate the run "
                    "(config.eval_every_epochs) or report it with --at=best.")


def load_run(workdir: str | pathlib.Path, label: str | None = None, at: str = "best") -> Run:
  """Reads one workdir's config and the per-case metrics of its best (or last evaluated) checkpoint.

  Raises:
    ReportError / CheckpointError: no config.json, a fold -1 run (no
      validation), no checkpoint, or a best step without per-case metrics.
  """
  workdir = pathlib.Path(workdir)
  try:
    config = configs.upgrade(json.loads((workdir / "config.json").read_text(encoding="utf-8")))
  except (OSError, ValueError) as e:
    raise ReportError(f"{workdir}: no readable config.json ({type(e).__name__}); pass training "
                      "workdirs (python -m scoat_jax.main --workdir=...).") from None
  fold = (config.get("data") or {}).get("fold")
  if fold in (-1, "all"):  # data.folds.ALL_FOLDS (training stores 'all' as -1)
    raise ReportError(f"{workdir}: trained with data.fold=-1 on every case, so it has no "
                      "validation metrics; leave it out of --workdirs and report the runs of "
                      "folds 0..k-1.")
  _check_at(at)
  if at == "last":
    step_dir = _last_evaluated(workdir)
  else:
    with checkpoints.quiet_orbax():
      step_dir = checkpoints.resolve_step_dir(workdir)
  meta = checkpoints.read_meta(step_dir)
  per_case = meta.get("per_case")
  if not per_case:
    raise ReportError(f"{step_dir}: its metadata holds no per-case metrics; evaluate the run "
                      "with this version's training (it saves 'per_case' at each evaluation).")
  rows = [_check_case(workdir, step_dir, i, c) for i, c in enumerate(per_case)]
  if label is None:
    label = f"{config.get('model_name', '?')} / {config.get('loss', '?')}"
  step = int(step_dir.name) if step_dir.name.isdigit() else int(meta.get("step", -1))
  return Run(workdir, label, fold, step, rows, config)


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
  """Runs by label, in order of first appearance; a label's folds and cases must not repeat."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(run.label, []).append(run)
  for label, members in groups.items():
    folds, cases = {}, {}
    for r in members:
      if r.fold is not None and r.fold in folds:
        raise ReportError(f"{r.workdir} and {folds[r.fold]} are both fold {r.fold} of '{label}'; "
                          "give each fold once, or separate the runs with --labels.")
      folds[r.fold] = r.workdir
      for c in r.per_case:
        if c["case_id"] in cases:
          raise ReportError(f"case {c['case_id']} is validated in both {cases[c['case_id']]} and "
                            f"{r.workdir} ('{label}'); each case must be in one fold only.")
        cases[c["case_id"]] = r.workdir
  return groups


def reference_label(groups: dict[str, list[Run]], reference: str | None = None) -> str | None:
  """The row the p-values compare with: `reference`, else SCOAT-Net trained with BCE-Dice.

  Raises:
    ReportError: `reference` names no row.
  """
  if reference:
    if reference not in groups:
      raise ReportError(f"--reference={reference}: no such row; rows: {', '.join(groups)}.")
    return reference
  for label, members in groups.items():
    config = members[0].config
    if config.get("model_name") == "scoat_net" and config.get("loss") == "bce_dice":
      return label
  return None


def paired_wilcoxon(row: Sequence[Run], reference: Sequence[Run], metric: str = "dsc"
                    ) -> tuple[float, int]:
  """Two-sided Wilcoxon signed-rank p-value of a row's per-case metric against the reference's.

  Cases are paired by case id (both rows must score the same cases; the
  folds are the same when both were trained on the same split). Zero
  differences are dropped (Wilcoxon's method); with no non-zero difference
  left the rows do not differ and p is 1.

  Returns:
    (p, number of paired cases).

  Raises:
    ReportError: the rows share no case.
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel
  a = {c["case_id"]: c[metric] for r in row for c in r.per_case}
  b = {c["case_id"]: c[metric] for r in reference for c in r.per_case}
  shared = sorted(set(a) & set(b))
  if not shared:
    raise ReportError(f"{row[0].label!r} and {reference[0].label!r} share no validation case; "
                      "compare rows trained on the same folds, or pass --reference.")
  diff = np.array([a[k] - b[k] for k in shared], np.float64)
  if not np.any(diff != 0):
    return 1.0, len(shared)
  return float(stats.wilcoxon(diff, zero_method="wilcox").pvalue), len(shared)


def summarise(groups: dict[str, list[Run]], *, reference: str | None = None,
              costs: dict[str, dict] | None = None) -> list[dict]:
  """One row per group: runs, cases, mean/std/median of each metric over pooled cases,
  the p-value of its per-case DSC against the reference row, and the network's costs."""
  rows = []
  for label, members in groups.items():
    cases = [{m: c[m] for m in METRICS} for r in members for c in r.per_case]
    stats = metrics_lib.aggregate(cases)
    row = {"model": label, "runs": len(members), "cases": len(cases)}
    for m in METRICS:
      row.update({f"{m}_mean": stats[m]["mean"], f"{m}_std": stats[m]["std"],
                  f"{m}_median": stats[m]["median"]})
    # Inf-Net's protocol beside the pooled cases: each fold's mean, then mean +- std.
    for m in METRICS:
      folds = [float(np.mean([c[m] for c in r.per_case])) for r in members if r.per_case]
      row.update({f"{m}_folds_mean": float(np.mean(folds)), f"{m}_folds_std": float(np.std(folds))})
    for m in CLASS_METRICS:
      values = [c[m] for r in members for c in r.per_case if c.get(m) is not None]
      row.update({f"{m}_mean": float(np.mean(values)) if values else None,
                  f"{m}_std": float(np.std(values)) if values else None,
                  f"{m}_cases": len(values)})
    p = n = None
    if reference is not None and label != reference:
      p, n = paired_wilcoxon(members, groups[reference])
    row.update({"dsc_p_vs_reference": p, "paired_cases": n})
    cost = (costs or {}).get(label, {})
    row.update({k: cost.get(k) for k in ("params", "gflops", "forward_ms")})
    rows.append(row)
  return rows


def _csv(rows: list[dict]) -> str:
  buf = io.StringIO()
  # Rows may differ in keys (3-class runs beside 1-class ones): the union, in first-seen order.
  names = list(dict.fromkeys(k for row in rows for k in row))
  writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def _fmt(value, spec: str, missing: str = "–") -> str:
  return missing if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def markdown(summary: list[dict], groups: dict[str, list[Run]], *,
             reference: str | None = None, machine: str = "", at: str = "best") -> str:
  """The paper-style table (mean ± std, median in brackets), the costs, and the runs used."""
  ref = f"its per-case DSC against **{reference}**'s" if reference else "no reference row"
  where = ("at its best checkpoint (highest validation DSC)" if at == "best" else
           "at its last evaluated checkpoint")
  lines = ["# Cross-validation results", "",
           "Each cell: mean ± std (median) over the validation cases of all folds; each fold "
           f"scored {where}. p: two-sided paired Wilcoxon "
           f"signed-rank test of {ref} (cases paired by id).", "",
           "| Model / loss | Folds | Cases | " + " | ".join(TITLES[m] for m in METRICS)
           + " | p (DSC) |",
           "|---|---:|---:|" + "---:|" * len(METRICS) + "---:|"]
  for row in summary:
    cells = [f"{row[f'{m}_mean']:.4f} ± {row[f'{m}_std']:.4f} ({row[f'{m}_median']:.4f})"
             for m in METRICS]
    p = "ref." if row["model"] == reference else _fmt(row["dsc_p_vs_reference"], ".3g")
    lines.append(f"| {row['model']} | {row['runs']} | {row['cases']} | " + " | ".join(cells)
                 + f" | {p} |")
  classes = [m for m in CLASS_METRICS if any(row.get(f"{m}_cases") for row in summary)]
  lines += ["", "## Over folds" + (" and per class" if classes else ""), "",
            "Each metric's mean over a fold's cases, then mean ± std over the folds (Inf-Net's "
            "protocol when a case is a slice)" + ("; per class: DSC mean ± std over the cases "
                                                  "that show the class in the truth or the "
                                                  "prediction." if classes else "."), "",
            ("| Model / loss | " + "".join(f"{TITLES[m]} | " for m in METRICS + tuple(classes))
             ).rstrip(),
            "|---|" + "---:|" * (len(METRICS) + len(classes))]
  for row in summary:
    folds = "".join(f"{row[f'{m}_folds_mean']:.4f} ± {row[f'{m}_folds_std']:.4f} | "
                    for m in METRICS)
    cells = "".join(f"{row[f'{m}_mean']:.4f} ± {row[f'{m}_std']:.4f} (n = {row[f'{m}_cases']}) | "
                    if row[f"{m}_cases"] else "– | " for m in classes)
    lines.append((f"| {row['model']} | " + folds + cells).rstrip())
  if any(row.get("params") is not None for row in summary):
    lines += ["", "## Cost", "",
              "Of each row's network as its runs' config builds it, inference with one head, "
              f"one 1-channel {COST_SLICE}x{COST_SLICE} slice. GFLOPs: XLA's "
              "count for the compiled forward pass (multiply-add = 2). Forward: median of 3 "
              f"after a warm-up, batch 1, on {machine or 'this machine'}.", "",
              "| Model / loss | Trainable parameters | GFLOPs / slice | Forward ms / slice |",
              "|---|---:|---:|---:|"]
    for row in summary:
      lines.append(f"| {row['model']} | {_fmt(row['params'], ',')} | "
                   f"{_fmt(row['gflops'], '.2f')} | {_fmt(row['forward_ms'], '.1f')} |")
  lines += ["", "## Runs", "", "| Model / loss | Workdir | Fold | Step scored | Cases | DSC |",
            "|---|---|---:|---:|---:|---:|"]
  for label, members in groups.items():
    for r in members:
      dsc = float(np.mean([c["dsc"] for c in r.per_case]))
      lines.append(f"| {label} | {r.workdir} | {'' if r.fold is None else r.fold} | {r.step} | "
                   f"{len(r.per_case)} | {dsc:.4f} |")
  return "\n".join(lines) + "\n"


def measure_costs(groups: dict[str, list[Run]], *, timing: bool = True) -> dict[str, dict]:
  """Parameters, GFLOPs and forward ms of each row's network (its first run's config)."""
  from scoat_jax.evaluation import model_cost  # pylint: disable=import-outside-toplevel
  return {label: model_cost.measure(members[0].config, size=COST_SLICE, timing=timing)
          for label, members in groups.items()}


def boxplot(groups: dict[str, list[Run]], metric: str, path: pathlib.Path) -> pathlib.Path:
  """Box plot of one metric: one box per group, every case as a jittered dot."""
  labels = list(groups)
  values = [[c[metric] for r in groups[k] for c in r.per_case] for k in labels]
  # At least 3.6 inches wide, so the two-line title fits above a single box.
  fig, ax = plt.subplots(figsize=(max(3.6, 1.6 + 1.4 * len(labels)), 4))
  # Every case is drawn as a dot, so the fliers would draw the outliers twice.
  ax.boxplot(values, showmeans=True, showfliers=False, widths=0.5,
             meanprops={"marker": "^", "markerfacecolor": "tab:green", "markeredgecolor": "none"})
  rng = np.random.default_rng(0)  # fixed jitter: the same plot every time
  for k, v in enumerate(values, start=1):
    ax.scatter(k + rng.uniform(-0.12, 0.12, len(v)), v, s=10, alpha=0.6, color="tab:blue", zorder=3)
  ax.set_xticks(range(1, len(labels) + 1), [f"{k}\n(n = {len(v)})" for k, v in zip(labels, values)],
                rotation=15 if len(labels) > 2 else 0, fontsize=8)
  ax.set_ylim(-0.03, 1.03)
  ax.set_ylabel(TITLES[metric])
  ax.set_title(f"{TITLES[metric]} per case\n(box: quartiles, line: median, triangle: mean)",
               fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  try:
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
  finally:
    plt.close(fig)
  return path


def run(workdirs: Sequence[str], output: str, *, labels: Sequence[str] = (),
        overwrite: bool = False, reference: str | None = None, costs: bool = True,
        timing: bool = True, at: str = "best") -> list[dict]:
  """Reads every run, then writes the report files; the programmatic form of the CLI.

  Args:
    workdirs: training workdirs (globs and comma lists allowed).
    output: folder for the report (created after every run is read).
    labels: one row label per workdir (default: 'model / loss' from config.json).
    overwrite: replace an earlier report in `output`.
    reference: the row the p-values compare with (default: SCOAT-Net with BCE-Dice).
    costs: measure each row's parameters and GFLOPs (builds the networks).
    timing: also time each network's forward pass (needs `costs`).
    at: 'best' (highest validation DSC) or 'last' (latest evaluated) checkpoint per run.

  Returns:
    The summary rows (as in cv_report.csv).
  """
  paths = expand_workdirs(workdirs)
  labels = [l.strip() for spec in labels for l in str(spec).split(",") if l.strip()]
  if labels and len(labels) != len(paths):
    raise ReportError(f"--labels gives {len(labels)} label(s) for {len(paths)} workdir(s); give "
                      "one per workdir, in the same order.")
  output = pathlib.Path(output).expanduser()
  if output.exists() and not output.is_dir():
    raise ReportError(f"--output={output}: is a file; give a folder.")
  existing = [n for n in OUTPUTS if (output / n).exists()]
  if existing and not overwrite:
    raise ReportError(f"--output={output}: holds an earlier report ({existing[0]}); choose a new "
                      "folder or pass --overwrite.")
  _check_at(at)
  runs = [load_run(w, labels[i] if labels else None, at=at) for i, w in enumerate(paths)]
  groups = group_runs(runs)
  reference = reference_label(groups, reference)
  cost = measure_costs(groups, timing=timing) if costs else None
  summary = summarise(groups, reference=reference, costs=cost)
  machine = ""
  if cost and timing:
    from scoat_jax.evaluation import model_cost  # pylint: disable=import-outside-toplevel
    machine = model_cost.machine()
  per_case = [{"model": r.label, "workdir": str(r.workdir), "fold": r.fold, "step": r.step, **c}
              for r in runs for c in r.per_case]
  output.mkdir(parents=True, exist_ok=True)
  for name, text in (("cv_report.md", markdown(summary, groups, reference=reference,
                                                machine=machine, at=at)), ("cv_report.csv", _csv(summary)),
                     ("cv_per_case.csv", _csv(per_case))):
    fileio.write_text(text, output / name)
  for m in METRICS:
    boxplot(groups, m, output / f"boxplot_{m}.png")
  return summary
