"""Values that cannot be CT in HU are refused (scoat_jax.data.hu_values), NIfTI transforms
that disagree are refused (scoat_jax.data.nifti_header), and real CT still reads."""
from __future__ import annotations

import os
import pathlib
import struct

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from scoat_jax.data import ct_io, dicom_writer, hu_values

SPACING = (0.7, 0.7, 5.0)
SHAPE = (6, 24, 30)
# Where the real CT lives (its README: three LIDC-IDRI slabs, one also as DICOM, and an abdomen).
REAL_CT_DIR = pathlib.Path(os.environ.get(
    "SCOAT_JAX_REAL_CT_DIR",
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ct"))


def _hu(shape=SHAPE, seed=0) -> np.ndarray:
  """A noisy small chest: air outside (-1000), body (40), lungs (-850), a bone (700)."""
  rng = np.random.default_rng(seed)
  hu = np.full(shape, 40.0)
  hu[:, :, :5] = -1000
  hu[:, 5:19, 8:14] = hu[:, 5:19, 16:22] = -850
  hu[:, 20:23, 12:18] = 700
  return np.rint(hu + rng.normal(0, 15, shape)).astype(np.int16)


def _refused(hu, *texts):
  with pytest.raises(ct_io.CTError) as e:
    hu_values.check_hu(hu, "scan.nii.gz")
  for text in texts:
    assert text in str(e.value), str(e.value)
  assert str(e.value).startswith("scan.nii.gz: ") and "\n" not in str(e.value)


def test_ct_in_hu_passes_with_or_without_padding():
  hu = _hu()
  hu_values.check_hu(hu, "x")
  padded = hu.copy()
  padded[:, :4, :4] = -3024       # the corners outside the reconstructed circle
  hu_values.check_hu(padded, "x")
  hu_values.check_hu(padded.astype(np.float32), "x")


def test_offset_or_scaled_values_are_refused():
  hu = _hu().astype(np.int32)
  _refused(hu - 1024, "below -1200 HU", "doubled RescaleIntercept")         # intercept twice
  _refused(hu * 1000, "beyond any CT in HU")                                # HU x 1000
  _refused(np.rint(0.1 * (hu + 1024) - 1024), "below 0 HU (water)")         # slope 0.1
  _refused(2 * (hu + 1024) - 1024, "median")                                # slope 2
  _refused(np.full(SHAPE, -400), "no air")
  _refused(hu + 1024, "no air")                                             # intercept 0
  _refused(np.clip(hu, 0, 255), "0..255")


def _series(directory: pathlib.Path) -> list[pathlib.Path]:
  geometry = ct_io.Geometry.for_array(SHAPE, SPACING)
  out = dicom_writer.write_dicom_series(_hu(), geometry, directory, patient_id="P",
                                        study_date="20200101")
  return sorted(out.iterdir())


@pytest.mark.parametrize("change, expected", [
    ({"RescaleIntercept": "-2048"}, "below -1200 HU"),           # minimum -2048, air at -2024
    ({"RescaleSlope": "0.1"}, r"below 0 HU \(water\)"),
    ({"BitsStored": 10, "HighBit": 9}, "below -1200 HU|below 0 HU"),    # stored values wrap
])
def test_dicom_values_that_are_not_hu_are_refused(tmp_path, change, expected):
  files = _series(tmp_path / "s")
  for f in files:
    ds = pydicom.dcmread(f)
    for keyword, value in change.items():
      setattr(ds, keyword, value)
    ds.save_as(f)
  with pytest.raises(ct_io.CTError, match=expected) as e:
    ct_io.read_ct(tmp_path / "s")
  assert str(e.value).startswith(f"{tmp_path / 's'}: ")
  assert ct_io.read_ct(tmp_path / "s", check_values=False).hu.shape == SHAPE


def test_a_nifti_scaled_by_1000_is_refused(tmp_path):
  path = ct_io.write_ct(_hu().astype(np.float32) * 1000 + 0.5,
                        ct_io.Geometry.for_array(SHAPE, SPACING), tmp_path / "milli.nii.gz")
  with pytest.raises(ct_io.CTError, match="beyond any CT") as e:
    ct_io.read_ct(path)
  assert str(path) in str(e.value)


# ------------------------------------------------------------- NIfTI transforms

def _nifti(path: pathlib.Path) -> pathlib.Path:
  image = sitk.GetImageFromArray(_hu())
  image.SetSpacing(SPACING)
  image.SetOrigin((10.0, 20.0, 30.0))
  sitk.WriteImage(image, str(path))
  return path


def _patch(path: pathlib.Path, at: int, fmt: str, *values) -> None:
  data = bytearray(path.read_bytes())
  data[at:at + struct.calcsize(fmt)] = struct.pack("<" + fmt, *values)
  path.write_bytes(bytes(data))


def test_qform_and_sform_that_disagree_are_refused(tmp_path):
  path = _nifti(tmp_path / "a.nii")
  assert ct_io.read_ct(path).warnings == ()
  srow_z = list(struct.unpack("<4f", path.read_bytes()[312:328]))
  _patch(path, 312, "4f", srow_z[0], srow_z[1], srow_z[2] * 1.07, srow_z[3])   # z 7% longer
  with pytest.raises(ct_io.CTError, match="qform and sform disagree") as e:
    ct_io.read_ct(path)
  assert str(path) in str(e.value) and "set_qform" in str(e.value)
  assert "0.7 x 0.7 x 5 against 0.7 x 0.7 x 5.35 mm" in str(e.value)


def test_a_transform_flagged_unknown_is_a_warning_not_a_disagreement(tmp_path):
  path = _nifti(tmp_path / "a.nii")
  srow_x = list(struct.unpack("<4f", path.read_bytes()[280:296]))
  _patch(path, 280, "4f", *srow_x[:3], srow_x[3] + 25.0)   # the sform 25 mm off...
  _patch(path, 254, "h", 0)                                # ...but flagged unknown
  ct = ct_io.read_ct(path)
  assert ct.stored_geometry.origin == pytest.approx((10.0, 20.0, 30.0))   # read by the qform
  assert len(ct.warnings) == 1 and "sform is flagged unknown (code 0)" in ct.warnings[0]
  assert "25.0 mm elsewhere" in ct.warnings[0]
  _patch(path, 252, "h", 0)                                # neither transform set
  assert "orientation is unknown" in ct_io.read_ct(path).warnings[0]


def test_float32_quaternions_of_flipped_grids_agree_with_their_sform(tmp_path):
  # A 180-degree rotation: the quaternion's first component is sqrt(1 - ~1) in float32.
  image = sitk.GetImageFromArray(_hu())
  image.SetSpacing(SPACING)
  image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
  sitk.WriteImage(image, str(tmp_path / "flip.nii.gz"))
  assert ct_io.read_ct(tmp_path / "flip.nii.gz").warnings == ()


# ----------------------------------------------------------------------- real CT

@pytest.mark.skipif(not REAL_CT_DIR.is_dir(), reason="no real CT beside the checkout")
@pytest.mark.parametrize("scan", ["lidc-idri-0001/image.nii.gz", "lidc-idri-0002/image.nii.gz",
                                  "lidc-idri-0003/image.nii.gz", "abdomen-3mm/image.nii.gz",
                                  "lidc-idri-0002/dicom"])
def test_real_ct_reads_without_error_or_warning(scan):
  ct = ct_io.read_ct(REAL_CT_DIR / scan)
  assert ct.warnings == () and ct.hu.ndim == 3


@pytest.mark.skipif(not (REAL_CT_DIR / "lidc-idri-0002" / "dicom").is_dir(),
                    reason="no real CT beside the checkout")
def test_real_dicom_reads_as_its_nifti_copy():
  dicom = ct_io.read_ct(REAL_CT_DIR / "lidc-idri-0002" / "dicom")
  nifti = ct_io.read_ct(REAL_CT_DIR / "lidc-idri-0002" / "image.nii.gz")
  np.testing.assert_array_equal(dicom.hu, nifti.hu)
  assert dicom.geometry.same_as(nifti.geometry, 1e-5)
