"""The table sweep: which runs, in which folders, skipping finished ones, Slurm and command lines."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from trained_checkpoint import save_checkpoint
from scoat_jax.training import sweep

pytestmark = pytest.mark.xdist_group("tiny_training")  # reads the shared trained workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
_DUMMY = {"params": {"w": np.zeros(2, np.float32)}, "batch_stats": {"m": np.zeros(1, np.float32)}}


def test_parse_folds():
  assert sweep.parse_folds("0-4") == [0, 1, 2, 3, 4]
  assert sweep.parse_folds("3,0-1,1") == [3, 0, 1]
  for bad in ("", "a", "3-1", "-1", "1-"):
    with pytest.raises(ValueError, match="--folds"):
      sweep.parse_folds(bad)


def test_plan_composes_each_runs_command(tmp_path):
  runs = sweep.plan(config_file="scoat_jax/configs/demo.py", rows=["unet", "scoat_net+focal"],
                    overrides=["--config.model.widths=(4,8,16,32,64)"], folds=[0, 2],
                    num_folds=4, root=tmp_path, python="py")
  assert [(r.row, r.fold) for r in runs] == [("unet", 0), ("unet", 2), ("scoat_net+focal", 0),
                                             ("scoat_net+focal", 2)]
  assert runs[3].workdir == tmp_path / "scoat_net+focal" / "fold2"
  assert runs[3].argv == ("py", "-m", "scoat_jax.main", "--config=scoat_jax/configs/demo.py:"
                          "scoat_net,focal", "--config.model.widths=(4,8,16,32,64)",
                          "--config.data.fold=2", f"--workdir={runs[3].workdir}")
  # A config argument already on the file is kept, the row's added to it.
  [run] = sweep.plan(config_file="f.py:unet", rows=["dice"], overrides=[], folds=[1], num_folds=5,
                     root=tmp_path)
  assert run.argv[3] == "--config=f.py:unet,dice"
  assert not any(tmp_path.iterdir())  # planning writes nothing


@pytest.mark.parametrize("rows,folds,match", [
    ([], [0], "--rows is empty"),
    (["unet", "unet"], [0], "names a row twice"),
    (["resnet"], [0], "neither a network"),
    (["unet;rm"], [0], "not a network or loss name"),
    (["unet"], [5], "fold 5 does not exist"),
])
def test_bad_plans_are_refused(rows, folds, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    sweep.plan(config_file="f.py", rows=rows, overrides=[], folds=folds, num_folds=5,
               root=tmp_path)


def test_slurm_script_is_valid_bash_with_one_task_per_run(tmp_path):
  runs = sweep.plan(config_file="scoat_jax/configs/default.py", rows=["unet", "fcn"], overrides=[
      "--config.data.name=ct_volumes"], folds=[0, 1, 2], num_folds=5, root=tmp_path / "r t",
      python="echo")
  script = sweep.slurm_script(runs, name="t2", options=["--gres=gpu:1"])
  assert "#SBATCH --array=0-5" in script and "#SBATCH --gres=gpu:1" in script
  path = tmp_path / "t2.sbatch"
  path.write_text(script)
  assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
  # Task 4 runs the fifth command, its workdir (with a space) one argument.
  done = subprocess.run(["bash", str(path)], env={**os.environ, "SLURM_ARRAY_TASK_ID": "4"},
                        capture_output=True, text=True)
  assert done.returncode == 0 and done.stdout.split() == list(runs[4].argv[1:3]) + [
      a for a in " ".join(runs[4].argv[3:]).split()]
  assert sweep.commands(runs).splitlines() == [r.shell() for r in runs]
  # The report keeps the table's row order (comma lists expand in order).
  command = sweep.report_command(["unet", "fcn"], tmp_path / "r t")
  assert command == ("python -m scoat_jax.report --workdirs="
                     f"'{tmp_path}/r t/unet/fold*,{tmp_path}/r t/fcn/fold*' "
                     f"--output='{tmp_path}/r t/report'")


def test_finished_means_the_newest_checkpoint_is_at_the_last_step(trained_workdir, tmp_path):
  assert sweep.is_finished(trained_workdir)  # trained to its last step by train_and_evaluate
  half = save_checkpoint(tmp_path / "half", _DUMMY, {"model_name": "scoat_net"}, step=5,
                         meta={"total_steps": 10})
  assert not sweep.is_finished(half)
  assert not sweep.is_finished(tmp_path / "nothing")
  # A damaged newest step falls back to the one before it, as training does.
  save_checkpoint(tmp_path / "half", _DUMMY, {"model_name": "scoat_net"}, step=10,
                  meta={"total_steps": 10})
  assert sweep.is_finished(half)
  (half / "checkpoints" / "10" / "meta" / "metadata").write_text("{broken")
  assert not sweep.is_finished(half)


def _fake_python(tmp_path, status: int) -> str:
  """An interpreter stand-in: logs its arguments, marks the run finished, exits with `status`."""
  script = tmp_path / f"fake_python_{status}"
  script.write_text(f"""#!{sys.executable}
import json, pathlib, sys
workdir = pathlib.Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")))
with open({str(tmp_path / 'log')!r}, "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if {status} == 0:
  meta = workdir / "checkpoints" / "7" / "meta"
  meta.mkdir(parents=True)
  (meta / "metadata").write_text(json.dumps({{"step": 7, "total_steps": 7}}))
sys.exit({status})
""")
  script.chmod(0o755)
  return str(script)


def test_execute_skips_finished_runs_and_stops_at_a_failure(tmp_path):
  def runs(status):
    return sweep.plan(config_file="f.py", rows=["unet", "fcn"], overrides=[], folds=[0, 1],
                      num_folds=5, root=tmp_path / "root", python=_fake_python(tmp_path, status))
  lines = []
  assert sweep.execute(runs(0), log=lines.append) == {"ran": 4, "skipped": 0}
  assert sweep.execute(runs(0), log=lines.append) == {"ran": 0, "skipped": 4}
  assert sum("finished, skipped" in line for line in lines) == 4
  log = [json.loads(l) for l in (tmp_path / "log").read_text().splitlines()]
  assert [a[-1] for a in log] == [f"--workdir={tmp_path / 'root' / r / f'fold{k}'}"
                                  for r in ("unet", "fcn") for k in (0, 1)]
  # A failed run stops the sweep with its status; an interrupted one raises KeyboardInterrupt.
  more = sweep.plan(config_file="f.py", rows=["dice"], overrides=[], folds=[0, 1], num_folds=5,
                    root=tmp_path / "root", python=_fake_python(tmp_path, 3))
  with pytest.raises(subprocess.CalledProcessError) as e:
    sweep.execute(more, log=lines.append)
  assert e.value.returncode == 3 and len((tmp_path / "log").read_text().splitlines()) == 5
  stopped = sweep.plan(config_file="f.py", rows=["dice"], overrides=[], folds=[0], num_folds=5,
                       root=tmp_path / "root", python=_fake_python(tmp_path, 130))
  with pytest.raises(KeyboardInterrupt, match="run the sweep again"):
    sweep.execute(stopped, log=lines.append)


def _cli(*flags):
  return subprocess.run([sys.executable, "-m", "scoat_jax.sweep", *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_prints_a_tables_commands_and_refuses_bad_flags(tmp_path):
  root = tmp_path / "t2"
  done = _cli("--flagfile=launch/table2.cfg", "--folds=0-1", f"--root={root}", "--emit=commands")
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  assert len(lines) == 7 * 2 and not root.exists()
  assert "--config=scoat_jax/configs/default.py:fcn" in lines[0]
  assert "--config.data.name=ct_volumes" in lines[0] and lines[-1].endswith("scoat_net/fold1")
  for flags, match in [
      (("--flagfile=launch/table2.cfg", "--folds=0-9", f"--root={root}"), "fold 5 does not exist"),
      (("--flagfile=launch/table2.cfg",), "--root is required"),
      (("--flagfile=launch/table1.cfg", "--rows=unet,resnet", f"--root={root}"), "resnet"),
      (("--flagfile=launch/table1.cfg", "--config.data.fodl=1", f"--root={root}"),
       "did you mean --config.data.fold"),
  ]:
    bad = _cli(*flags)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.startswith("error: ") and match in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not root.exists()
