"""What predict hands a hospital: DICOM SEG, key images, the cohort table, an external lung
mask, and no network pass on slices beyond the lungs."""
import csv

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from trained_checkpoint import test_scan
from scoat_jax.data import ct_io, dicom_writer, phantom
from scoat_jax.inference import scan as scan_lib
from scoat_jax.inference import segment

pytestmark = pytest.mark.xdist_group("tiny_training_b")


def _run(workdir, source, out, **kw):
  kw.setdefault("key_images", False)
  # The tiny model marks the body rather than the lungs; these tests follow where labels
  # land in each format, so they keep every label (the lung rule has tests of its own).
  kw.setdefault("lung_rule", False)
  return segment.run([str(workdir)], str(source), str(out), progress=False, **kw)


def test_dicom_seg_frames_land_on_their_source_slices(shifted_workdir, tmp_path):
  import highdicom as hd
  scan = test_scan()
  series = dicom_writer.write_dicom_series(scan.hu, scan.geometry, tmp_path / "series",
                                           patient_id="P7", study_date="20200402",
                                           study_uid="1.2.826.0.1.7.1", series_uid="1.2.826.0.1.7.2",
                                           accession_number="ACC0042")
  [report] = _run(shifted_workdir, series, tmp_path / "out", output_format="both")
  # The cohort table names the study, the series and the model without a local path.
  with open(tmp_path / "out" / "predictions.csv", newline="") as f:
    [row] = list(csv.DictReader(f))
  assert (row["patient_id"], row["study_date"], row["accession_number"],
          row["study_instance_uid"], row["series_instance_uid"]) == (
              "P7", "20200402", "ACC0042", "1.2.826.0.1.7.1", "1.2.826.0.1.7.2")
  assert (row["model"], row["model_version"], row["model_sha256"]) == (
      "workdir", f"step {report['checkpoints'][0]['step']}",
      report["checkpoints"][0]["weights_sha256"])
  mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "series_mask.nii.gz")))
  assert mask.any() and report["outputs"]["dicom_seg"] == "series_seg.dcm"
  seg = hd.seg.segread(tmp_path / "out" / "series_seg.dcm")
  ds = pydicom.dcmread(tmp_path / "out" / "series_seg.dcm")
  assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.PatientID == "P7"
  sources = {}
  for f in sorted((tmp_path / "series").iterdir()):
    d = pydicom.dcmread(f)
    sources[d.SOPInstanceUID] = [float(v) for v in d.ImagePositionPatient]
  # Slice z of the NIfTI mask is the z-th source slice from the bottom (identity geometry).
  z_of = {uid: int(round((pos[2] - scan.geometry.origin[2]) / scan.geometry.spacing[2]))
          for uid, pos in sources.items()}
  pixels = ds.pixel_array.reshape(-1, *mask.shape[1:])
  total = 0
  for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
    uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
    np.testing.assert_allclose(pos, sources[uid], atol=1e-3)
    np.testing.assert_array_equal(pixels[k] > 0, mask[z_of[uid]] > 0)
    total += int(np.count_nonzero(pixels[k]))
  assert total == int(np.count_nonzero(mask))
  assert seg.number_of_segments == 1
  # dicom_seg alone: no NIfTI mask; NIfTI input cannot become a SEG.
  _run(shifted_workdir, series, tmp_path / "seg_only", output_format="dicom_seg")
  assert not (tmp_path / "seg_only" / "series_mask.nii.gz").exists()
  nifti = tmp_path / "scan.nii.gz"
  ct_io.write_ct(scan.hu, scan.geometry, nifti)
  with pytest.raises(ValueError, match="is not a DICOM series"):
    _run(shifted_workdir, nifti, tmp_path / "no", output_format="dicom_seg")
  assert not (tmp_path / "no").exists()


def test_key_images_and_cohort_table(shifted_workdir, tmp_path):
  (tmp_path / "in").mkdir()
  for t in (0, 1):
    s = test_scan(timepoint=t)
    ct_io.write_ct(s.hu, s.geometry, tmp_path / "in" / f"t{t}.nii.gz")
  reports = _run(shifted_workdir, tmp_path / "in", tmp_path / "out", key_images=True)
  out = tmp_path / "out"
  from PIL import Image
  for r in reports:
    with Image.open(out / f"{r['name']}_report.png") as im:
      assert im.size[0] > 1000
    assert (out / f"{r['name']}_report.pdf").read_bytes().startswith(b"%PDF")
  with open(out / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == ["t0", "t1"]
  for row, r in zip(rows, reports):
    assert float(row["lov_ml"]) == pytest.approx(r["lov_ml"], abs=1e-3)
    assert float(row["poi_percent"]) == pytest.approx(r["poi_percent"], abs=1e-3)
    assert int(row["num_lesions"]) == r["num_lesions"]
    assert row["model"] == shifted_workdir.name and row["ggo_ml"] == ""
    assert len(row["model_sha256"]) == 64 and row["series_instance_uid"] == ""
  # A second run into the same folder needs --overwrite: the table counts as a result.
  for p in out.glob("t*_*"):
    p.unlink()
  assert [p.name for p in out.iterdir()] == ["predictions.csv"]
  with pytest.raises(ValueError, match="holds earlier results"):
    _run(shifted_workdir, tmp_path / "in", out)


def test_external_lung_mask_is_used_and_checked(shifted_workdir, tmp_path):
  s = test_scan()
  ct_io.write_ct(s.hu, s.geometry, tmp_path / "scan.nii.gz")
  (tmp_path / "lungs").mkdir()
  (tmp_path / "bad").mkdir()
  ct_io.write_mask(s.lung.astype(np.uint8), s.geometry, tmp_path / "lungs" / "scan_lung.nii.gz")
  [r] = _run(shifted_workdir, tmp_path / "scan.nii.gz", tmp_path / "out",
             lung_mask=str(tmp_path / "lungs"))
  assert r["lung_mask"] == "external"
  assert r["lung_volume_ml"] == pytest.approx(s.lung_volume_ml)
  shifted = ct_io.Geometry(s.geometry.size, s.geometry.spacing,
                           (s.geometry.origin[0] + 5, *s.geometry.origin[1:]), s.geometry.direction)
  ct_io.write_mask(s.lung.astype(np.uint8), shifted, tmp_path / "bad" / "scan.nii.gz")
  with pytest.raises(ValueError, match="--lung_mask=.*differs from its image"):
    _run(shifted_workdir, tmp_path / "scan.nii.gz", tmp_path / "o2",
         lung_mask=str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="no lung mask for scan"):
    _run(shifted_workdir, tmp_path / "scan.nii.gz", tmp_path / "o3",
         lung_mask=str(tmp_path / "out"))
  assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_no_network_pass_beyond_the_lungs_and_no_lesion_lost(shifted_workdir, tmp_path):
  # 10 mm slices over 480 mm: neck and abdomen above and below the 240 mm chest.
  s = phantom.generate_scan(3, 1, 1, shape=(48, 96, 128), spacing=(2.8, 3.7, 10.0))
  ct_io.write_ct(s.hu, s.geometry, tmp_path / "long.nii.gz")
  [skip] = _run(shifted_workdir, tmp_path / "long.nii.gz", tmp_path / "skip")
  [full] = _run(shifted_workdir, tmp_path / "long.nii.gz", tmp_path / "full",
                skip_outside_lung=False)
  z0, z1 = skip["network_slices"]
  assert full["network_slices"] == [0, 48] and 0 < z0 < z1 < 48
  lung_z = np.flatnonzero(s.lung.any(axis=(1, 2)))
  lesion_z = np.flatnonzero(s.label.any(axis=(1, 2)))
  dense_z = np.flatnonzero((s.label == 2).any(axis=(1, 2)))
  assert z0 <= lung_z[0] and lung_z[-1] < z1
  assert lesion_z.size and z0 <= lesion_z[0] and lesion_z[-1] < z1
  assert dense_z.size == 0 or (z0 <= dense_z[0] and dense_z[-1] < z1)
  a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "skip" / "long_mask.nii.gz")))
  b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "full" / "long_mask.nii.gz")))
  np.testing.assert_array_equal(a[z0:z1], b[z0:z1])    # the same network pass inside
  assert not a[:z0].any() and not a[z1:].any()
  assert scan_lib.network_range(None, (1, 1, 1), 9) == (0, 9)
  assert scan_lib.network_range(np.zeros((9, 2, 2), bool), (1, 1, 1), 9) == (0, 9)
  lung = np.zeros((20, 2, 2), bool)
  lung[8:10] = True
  assert scan_lib.network_range(lung, (1, 1, 2.0), 20, margin_mm=5) == (5, 13)
