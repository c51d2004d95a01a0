"""Model bundles: export, round trip bit for bit, ensembles, versions, PyTorch weights, refusals."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import SimpleITK as sitk

from trained_checkpoint import save_checkpoint, test_scan
from scoat_jax import inference
from scoat_jax.data import ct_io
from scoat_jax.inference import bundle, export, postprocessing, segment
from scoat_jax.models import torch_weights

pytestmark = pytest.mark.xdist_group("tiny_training_b")
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("bundle_scan") / "scan.nii.gz"
  scan = test_scan()
  ct_io.write_ct(scan.hu, scan.geometry, path)
  return path


@pytest.fixture(scope="module")
def second_fold(shifted_workdir, tmp_path_factory):
  """The shifted model saved again as fold 1 (another member of one ensemble)."""
  model = inference.load_model(shifted_workdir)
  config = model.config.to_dict()
  config["data"]["fold"] = 1
  variables = jax.tree_util.tree_map(lambda a: np.asarray(a) * np.float32(1.01), model.variables)
  return save_checkpoint(tmp_path_factory.mktemp("fold1") / "workdir", variables, config)


def _outputs(folder, name="scan"):
  folder = pathlib.Path(folder)
  mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{name}_mask.nii.gz")))
  prob = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{name}_probability.nii.gz")))
  report = json.loads((folder / f"{name}_report.json").read_text())
  return mask, prob, report


def _predict(checkpoints, scan_path, out, **kw):
  return segment.run([str(c) for c in checkpoints], str(scan_path), str(out),
                     save_probabilities=True, key_images=False, progress=False, **kw)


def test_bundle_predicts_bit_for_bit_what_its_workdir_predicts(shifted_workdir, scan_path,
                                                               tmp_path):
  index = export.run([str(shifted_workdir)], str(tmp_path / "model"), postprocessing_mode="none")
  assert index["format_version"] == bundle.FORMAT_VERSION
  assert index["postprocessing"] is None
  [member] = index["members"]
  assert member["path"] == "fold0" and member["fold"] == 0 and member["step"] >= 1
  assert member["dataset"] == "ct_phantom/small"
  assert {"scoat_jax_version", "created", "preprocessing"} <= set(index)
  assert index["preprocessing"]["image_size"] == 32
  # Only what inference needs: parameters and batch statistics, no optimizer state.
  with np.load(tmp_path / "model" / "fold0" / "variables.npz") as z:
    roots = {k.split("/")[0] for k in z.files}
  assert roots == {"params", "batch_stats"}
  # The tiny model marks body as well as lung: without the lung rule its masks are not empty.
  _predict([shifted_workdir], scan_path, tmp_path / "w", lung_rule=False)
  _predict([tmp_path / "model"], scan_path, tmp_path / "b", lung_rule=False)
  (mw, pw, rw), (mb, pb, rb) = _outputs(tmp_path / "w"), _outputs(tmp_path / "b")
  assert mw.any()
  np.testing.assert_array_equal(mb, mw)
  np.testing.assert_array_equal(pb, pw)
  assert rb["lov_ml"] == rw["lov_ml"] and rb["lesions"] == rw["lesions"]
  assert rb["checkpoints"][0]["bundle"] == str((tmp_path / "model").absolute())
  # The model's identity names no local path, and one set of weights has one hash.
  sha = rw["checkpoints"][0]["weights_sha256"]
  assert rw["model_id"] == {"name": shifted_workdir.name, "version": f"step {member['step']}",
                            "sha256": sha, "members": 1}
  assert rb["model_id"] == {"name": "model", "sha256": sha, "members": 1,
                            "version": f"{index['created']} (scoat_jax {index['scoat_jax_version']})"}
  shutil.copytree(tmp_path / "model", tmp_path / "elsewhere" / "model")
  _predict([tmp_path / "elsewhere" / "model"], scan_path, tmp_path / "c", lung_rule=False)
  assert _outputs(tmp_path / "c")[2]["model_id"] == rb["model_id"]


def test_ensemble_bundle_equals_predict_with_the_same_checkpoints(shifted_workdir, second_fold,
                                                                  scan_path, tmp_path):
  export.run([str(shifted_workdir), str(second_fold)], str(tmp_path / "model"),
             postprocessing_mode="none")
  assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["bundle.json", "fold0",
                                                                     "fold1"]
  assert len(inference.load_ensemble([tmp_path / "model"])) == 2
  _predict([shifted_workdir, second_fold], scan_path, tmp_path / "w", tta=True)
  _predict([tmp_path / "model"], scan_path, tmp_path / "b", tta=True)
  (mw, pw, rw), (mb, pb, rb) = _outputs(tmp_path / "w"), _outputs(tmp_path / "b")
  np.testing.assert_array_equal(mb, mw)
  np.testing.assert_array_equal(pb, pw)
  # An ensemble's hash is that of its members' hashes in order, wherever they are stored.
  hashes = [c["weights_sha256"] for c in rw["checkpoints"]]
  assert len(set(hashes)) == 2 and rb["model_id"]["members"] == 2
  assert rb["model_id"]["sha256"] == rw["model_id"]["sha256"] == hashlib.sha256(
      "\n".join(hashes).encode()).hexdigest()
  assert rw["model_id"]["name"] == "workdir"   # both runs' folders are named so: said once


def test_newer_or_damaged_bundles_are_refused(shifted_workdir, tmp_path):
  path = tmp_path / "model"
  export.run([str(shifted_workdir)], str(path), postprocessing_mode="none")
  index = json.loads((path / "bundle.json").read_text())
  (path / "bundle.json").write_text(json.dumps({**index, "format_version": 99}))
  with pytest.raises(ValueError, match=r"format version 99.*reads up to version 1: upgrade"):
    inference.load_ensemble([path])
  (path / "bundle.json").write_text(json.dumps({**index, "members": [{"path": "../x"}]}))
  with pytest.raises(ValueError, match="not a plain name"):
    inference.load_ensemble([path])
  (path / "bundle.json").write_text(json.dumps(index))
  (path / "fold0" / "variables.npz").write_bytes(b"truncated")
  with pytest.raises(ValueError, match="cannot read the member"):
    inference.load_ensemble([path])


def test_export_refusals_write_nothing(shifted_workdir, tmp_path):
  out = tmp_path / "model"
  export.run([str(shifted_workdir)], str(out), postprocessing_mode="none")
  before = sorted(p.name for p in out.rglob("*"))
  with pytest.raises(ValueError, match="exists; choose a new folder or pass --overwrite"):
    export.run([str(shifted_workdir)], str(out), postprocessing_mode="none")
  with pytest.raises(ValueError, match="names a bundle"):
    export.run([str(out)], str(tmp_path / "again"), postprocessing_mode="none")
  with pytest.raises(ValueError, match="choose cv or none"):
    export.run([str(shifted_workdir)], str(tmp_path / "x"), postprocessing_mode="always")
  plain = tmp_path / "plain"
  plain.mkdir()
  with pytest.raises(ValueError, match=r"only a bundle is replaced"):
    export.run([str(shifted_workdir)], str(plain), postprocessing_mode="none", overwrite=True)
  assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()
  assert sorted(p.name for p in out.rglob("*")) == before
  # --overwrite replaces a bundle (and only then).
  export.run([str(shifted_workdir)], str(out), postprocessing_mode="none", overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "plain"]


def test_export_command_errors_are_one_line(shifted_workdir, tmp_path):
  out = tmp_path / "model"
  base = [sys.executable, "-m", "scoat_jax.export", f"--checkpoint={shifted_workdir}"]
  run = dict(cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
             encoding="utf-8", timeout=300)
  bad = subprocess.run(base + [f"--output={out}", "--postprocessing=sometimes"], **run)
  assert bad.returncode != 0 and not out.exists()
  bad = subprocess.run([sys.executable, "-m", "scoat_jax.export", f"--checkpoint={tmp_path}/none",
                        f"--output={out}"], **run)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
  assert not out.exists()
  ok = subprocess.run(base + [f"--output={out}", "--postprocessing=none"], **run)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert bundle.is_bundle(out)


def test_postprocessing_is_chosen_on_the_validation_fold_and_applied(trained_workdir,
                                                                     shifted_workdir, scan_path,
                                                                     tmp_path):
  # The shifted model labels about a third of every slice: its validation cases decide.
  index = export.run([str(shifted_workdir)], str(tmp_path / "cv"), postprocessing_mode="cv",
                     data_dir=inference.load_model(trained_workdir).config.data.data_dir)
  rule = index["postprocessing"]
  chosen = rule["chosen_on"]
  assert chosen["cases"] >= 1 and chosen["unit"] == "mm3"
  assert {"dsc", "rlp", "rlr"} <= set(chosen["before"]) == set(chosen["after"])
  best = max(c["mean_dsc"] for c in chosen["candidates"])
  if postprocessing.is_active(rule):
    assert chosen["after"]["dsc"] >= chosen["before"]["dsc"] + postprocessing.MIN_GAIN - 1e-9
    assert best >= chosen["candidates"][0]["mean_dsc"] + postprocessing.MIN_GAIN
  else:
    assert best < chosen["candidates"][0]["mean_dsc"] + postprocessing.MIN_GAIN
  # A bundle whose rule removes everything under 1 m^3: predict applies it, unless told not to.
  model = inference.load_model(shifted_workdir)
  rule = {"min_size": 1e9, "unit": "mm3", "inside_lung": False}
  bundle.write(tmp_path / "strict", [{"config": model.config.to_dict(),
                                      "variables": model.variables,
                                      "provenance": export.provenance(model)}],
               preprocessing={"intensity": "hu", "hu_window": list(model.hu_window),
                              "image_size": 32},
               postprocessing=rule, model_name="scoat_net", num_classes=1)
  _predict([tmp_path / "strict"], scan_path, tmp_path / "p", lung_rule=False)
  _predict([tmp_path / "strict"], scan_path, tmp_path / "raw", postprocess=False,
           lung_rule=False)
  (mp, _, rp), (mr, _, rr) = _outputs(tmp_path / "p"), _outputs(tmp_path / "raw")
  assert mr.any() and not mp.any()
  assert rp["postprocessing"]["removed_voxels"] == int(np.count_nonzero(mr))
  assert rr["postprocessing"]["rule"] == "none" and rp["lov_ml"] == 0.0
  # Folders of slices cannot take a rule counted in mm^3.
  with pytest.raises(ValueError, match="--no_postprocessing"):
    segment._check_rule(rule, [segment.Item("a", tmp_path / "a.png", "image")])


def test_pytorch_weights_predict_with_a_config(shifted_workdir, scan_path, tmp_path):
  model = inference.load_model(shifted_workdir)
  state = torch_weights.to_state_dict(model.variables)
  np.savez(tmp_path / "scoat.npz", **{k: np.asarray(v) for k, v in state.items()})
  with pytest.raises(ValueError, match="carry no preprocessing; pass --config"):
    inference.load_ensemble([tmp_path / "scoat.npz"])
  other = ml_collections.ConfigDict(model.config.to_dict())
  other.model_name = "unet"
  with pytest.raises(ValueError, match="into SCOAT-Net only"):
    inference.load_ensemble([tmp_path / "scoat.npz"], config=other)
  _predict([shifted_workdir], scan_path, tmp_path / "w")
  _predict([tmp_path / "scoat.npz"], scan_path, tmp_path / "t", config=model.config)
  (mw, pw, _), (mt, pt, rt) = _outputs(tmp_path / "w"), _outputs(tmp_path / "t")
  np.testing.assert_array_equal(mt, mw)
  np.testing.assert_allclose(pt, pw, atol=1e-6)
  assert rt["checkpoints"][0]["checkpoint"].endswith("scoat.npz")


def test_the_final_model_copies_the_rule_chosen_on_the_folds(shifted_workdir, tmp_path):
  model = inference.load_model(shifted_workdir)
  config = model.config.to_dict()
  config["data"]["fold"] = -1
  final = save_checkpoint(tmp_path / "all", model.variables, config)
  with pytest.raises(ValueError, match="trained on all cases .* --postprocessing_from"):
    export.run([str(final)], str(tmp_path / "m"))
  rule = {"min_size": 50.0, "unit": "mm3", "inside_lung": True}
  bundle.write(tmp_path / "cv", [{"config": model.config.to_dict(), "variables": model.variables,
                                  "provenance": export.provenance(model)}],
               preprocessing={"intensity": "hu", "hu_window": list(model.hu_window),
                              "image_size": 32},
               postprocessing=rule, model_name="scoat_net", num_classes=1)
  index = export.run([str(final)], str(tmp_path / "m"), postprocessing_from=str(tmp_path / "cv"))
  assert index["postprocessing"] == {**rule, "copied_from": str((tmp_path / "cv").absolute())}
  assert [m["path"] for m in index["members"]] == ["all"] and index["members"][0]["fold"] == -1
  assert not (tmp_path / "m_tmp").exists()
