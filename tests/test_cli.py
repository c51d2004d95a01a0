"""Every command speaks the same way: one `error:` line and exit status 2 for a bad flag or
config (nothing written), quiet library logs, console scripts for each command."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd,
                        timeout=300)


def _one_error_line(proc) -> str:
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize("override,expected", [
    ("--config.widhts=3", "did you mean --config.model.widths?"),
    ("--config.model.widhts=3", "did you mean --config.model.widths?"),
    ("--config.data.image_sise=64", "did you mean --config.data.image_size?"),
    ("--config.batch_size=abc", "--config.batch_size"),
    ("--config.model=unet", "pick the network with --config.model_name=unet"),
    ("--config.model_name=resnet", "unknown model 'resnet'"),
    ("--config.deep_supervision=mean --config.model_name=unet", "unet has one head"),
])
def test_a_misspelt_or_bad_config_field_is_one_line(tmp_path, override, expected):
  workdir = tmp_path / "run"
  line = _one_error_line(_run("scoat_jax.main", "--flagfile=launch/demo.cfg", *override.split(),
                              f"--workdir={workdir}"))
  assert expected in line, line
  assert not workdir.exists()


@pytest.mark.parametrize("args,expected", [
    (("scoat_jax.main", "--bogus"), "bogus"),
    (("scoat_jax.main", "--config=nowhere.py", "--workdir=x"), "nowhere.py"),
    (("scoat_jax.predict",), "--checkpoint is required"),
    (("scoat_jax.predict", "--checkpoint=x", "--input=y", "--output=z", "extra"), "unexpected arguments"),
    (("scoat_jax.followup",), "--output is required"),
    (("scoat_jax.datasets.build",), "give one dataset name"),
    (("scoat_jax.datasets.build", "nope"), "unknown dataset 'nope'"),
    (("scoat_jax.data.phantom",), "--out is required"),
    (("scoat_jax.report", "--workdirs=nowhere", "--output=out"), "nowhere"),
])
def test_every_command_fails_the_same_way(tmp_path, args, expected):
  line = _one_error_line(_run(*args, cwd=tmp_path if args[0] != "scoat_jax.main" else ROOT))
  assert expected in line, line
  assert not (tmp_path / "z").exists() and not (tmp_path / "out").exists()


def test_console_scripts_name_the_commands():
  text = (ROOT / "pyproject.toml").read_text()
  for script, target in [("scoat-train", "scoat_jax.main:console_main"),
                         ("scoat-predict", "scoat_jax.predict:console_main"),
                         ("scoat-followup", "scoat_jax.followup:console_main"),
                         ("scoat-report", "scoat_jax.report:console_main"),
                         ("scoat-sweep", "scoat_jax.sweep:console_main"),
                         ("scoat-build-dataset", "scoat_jax.datasets.build:console_main"),
                         ("scoat-phantom", "scoat_jax.data.phantom.__main__:console_main")]:
    assert f'{script} = "{target}"' in text
    module, _, function = target.partition(":")
    __import__(module)
    assert callable(getattr(sys.modules[module], function))


def test_library_info_lines_are_hidden_unless_asked(tmp_path):
  """Building the phantom dataset logs TFDS INFO lines; they show only with --verbosity=1."""
  quiet = _run("scoat_jax.datasets.build", "ct_phantom/small", f"--data_dir={tmp_path / 'a'}")
  assert quiet.returncode == 0, quiet.stderr[-2000:]
  assert "dataset_info" not in quiet.stderr and "Downloading and preparing" not in quiet.stderr
  assert "read it as data.name='ct_phantom/small'" in quiet.stdout


@pytest.mark.parametrize("flagfile", ["semiseg_all.cfg", "semiseg_all_gpu.cfg", "semiseg_cpu.cfg",
                                      "semiseg_search.cfg", "semiseg_fold0.cfg"])
def test_semiseg_flagfiles_parse_and_ask_for_the_dataset(tmp_path, flagfile):
  """Every field they set exists; without the built dataset main says how to build it."""
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
  lines = (ROOT / "launch" / flagfile).read_text().splitlines()
  config = [] if any(l.startswith("--config=") for l in lines) else [
      "--config=scoat_jax/configs/default.py"]
  proc = _run("scoat_jax.main", *config, f"--flagfile=launch/{flagfile}",
              f"--config.data.data_dir={data_dir}", f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr[-2000:]
  assert "python -m scoat_jax.datasets.build covid_semiseg --manual_dir=" in errors[0]
  assert not workdir.exists() and not data_dir.exists()


def test_semiseg_cv_flagfile_plans_five_folds(tmp_path):
  proc = _run("scoat_jax.sweep", "--flagfile=launch/semiseg_cv.cfg", "--folds=0-4",
              f"--root={tmp_path / 'cv'}", "--emit=commands")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 5 and all("--config.deep_supervision=none" in l for l in lines)
  assert [f"--config.data.fold={k}" in lines[k] for k in range(5)] == [True] * 5
