"""Generating one synthetic chest CT scan with exact masks (see the package docstring)."""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterator, Sequence

import numpy as np

from scoat_jax.data import ct_io

# The default cohort: 8 patients x 3 time points of 48 x 256 x 256 voxels
# (1.4 x 1.4 mm in-plane, 5 mm slices: a 358 x 358 x 240 mm field of view).
DEFAULT_SHAPE = (48, 256, 256)  # (z, y, x)
DEFAULT_FOV_MM = (358.4, 358.4, 240.0)  # (x, y, z)
DEFAULT_SPACING = tuple(
    f / n for f, n in zip(DEFAULT_FOV_MM, DEFAULT_SHAPE[::-1]))  # (1.4, 1.4, 5.0)
DEFAULT_NUM_PATIENTS = 8
DEFAULT_NUM_TIMEPOINTS = 3
DEFAULT_NOISE_SD = 20.0
BASE_DATE = datetime.date(2020, 2, 3)
FORMATS = {"nifti": ".nii.gz", "mha": ".mha", "nrrd": ".nrrd", "dicom": ""}

HU_AIR, HU_FAT, HU_SOFT, HU_BLOOD = -1000.0, -100.0, 45.0, 40.0
HU_RIB, HU_STERNUM, HU_VERTEBRA, HU_CORTEX = 700.0, 400.0, 400.0, 700.0
HU_LUNG, HU_VESSEL = -860.0, 40.0
GGO_RANGE, CONSOLIDATION_RANGE = (-740.0, -330.0), (-90.0, 45.0)


class PhantomError(ValueError):
  """A bad phantom request (arguments, output directory)."""


@dataclasses.dataclass
class PhantomScan:
  """One synthetic scan with its exact masks and volumes (see module docstring)."""
  hu: np.ndarray  # (z, y, x) int16
  label: np.ndarray  # (z, y, x) uint8: 0 background, 1 GGO, 2 consolidation
  lung: np.ndarray  # (z, y, x) bool, lesions included
  geometry: ct_io.Geometry
  patient_id: str
  timepoint: int
  study_date: str  # 'YYYYMMDD'
  lesion_volume_ml: float
  lung_volume_ml: float


class _SmoothField:
  """A unit-variance smooth random field: iid normals on a coarse grid, cubic B-spline upsampled.

  Upsampling is separable (three contractions), so sampling a box costs about
  one multiply-add per voxel and coarse node along z; rows of each
  weight matrix are L2-normalised so the field has variance 1 everywhere.
  The same coarse grid gives the same values wherever a box is sampled, which
  keeps lesion shapes identical across time points.
  """

  def __init__(self, rng: np.random.Generator, axes_mm: Sequence[np.ndarray], scale_mm: float):
    self.axes_mm, self.scale = axes_mm, float(scale_mm)
    self.lo = [float(a[0]) - 2 * self.scale for a in axes_mm]
    n = [int(np.ceil((float(a[-1]) - float(a[0])) / self.scale)) + 5 for a in axes_mm]
    self.coarse = rng.standard_normal(n).astype(np.float32)

  def _weights(self, axis: int, idx: slice) -> np.ndarray:
    t = (self.axes_mm[axis][idx] - self.lo[axis]) / self.scale
    d = np.abs(t[:, None] - np.arange(self.coarse.shape[axis])[None, :])
    w = np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, np.where(d < 2, (2 - d)**3 / 6, 0.0))
    return (w / np.sqrt((w**2).sum(1, keepdims=True))).astype(np.float32)

  def sample(self, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Field values on the (z, y, x) index box."""
    wz, wy, wx = (self._weights(a, box[a]) for a in range(3))
    # einsum without optimize runs its own single-threaded loops: multithreaded
    # BLAS is faster on an idle machine but many times slower on a busy one.
    f = np.einsum("abc,xc->abx", self.coarse, wx)  # (cz, cy, x)
    f = np.einsum("abx,yb->ayx", f, wy)  # (cz, y, x)
    return np.einsum("ayx,za->zyx", f, wz)  # (z, y, x)


def _rng(seed: int, patient: int, stream: int, timepoint: int = 0) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(patient), int(stream), int(timepoint)])


def _box(extent: tuple[float, float], coords: np.ndarray) -> slice:
  """Index slice of the coordinates within [lo, hi] (empty if none)."""
  lo, hi = extent
  idx = np.nonzero((coords >= lo) & (coords <= hi))[0]
  return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _anatomy(seed: int, patient: int) -> dict:
  """Per-patient anatomical parameters (mm, relative to the volume centre)."""
  r = _rng(seed, patient, 0)
  sx, sy = r.uniform(0.9, 1.05), r.uniform(0.9, 1.05)
  a = dict(body_ax=165 * sx,
           body_ay_ant=115 * sy,
           body_ay_post=105 * sy,
           fat=r.uniform(6, 18),
           lung_cx=74 * sx,
           lung_cy=5.0,
           lung_ax=62 * sx,
           lung_ay=88 * sy,
           z_base=-110 + r.uniform(-10, 10),
           dome=(r.uniform(60, 75), r.uniform(50, 62)),
           heart=(18 + r.uniform(-5, 5), -28 * sy, 60 * sx, 45 * sy, 52),
           spine_y=78 * sy,
           trachea_y=20 * sy,
           rib_phase=r.uniform(0, 2 * np.pi))
  a["z_apex"] = 95 + r.uniform(-10, 10)
  a["z_carina"] = a["z_apex"] - 70
  return a


def _lesion_plan(seed: int, patient: int) -> dict:
  """Per-patient lesion parameters shared by every time point."""
  r = _rng(seed, patient, 1)
  n = int(r.integers(3, 9))
  return dict(
      peak=r.uniform(0.35, 1.0),
      t_peak=r.uniform(0.6, 1.8),
      width=r.uniform(0.9, 1.6),
      shift=r.uniform(-0.4, 0.4, n),
      scale=r.uniform(0.6, 1.2, n),
      radii=np.stack(
          [r.uniform(18, 40, n), r.uniform(18, 40, n),
           r.uniform(15, 35, n)], 1),
      cons=r.uniform(0, 1, n),
      ggo_offset=r.uniform(-60, 60, n),
      side=r.choice([-1, 1], n),
      height=0.05 + 0.85 * r.beta(1.5, 2.5, n),
      angle=np.deg2rad(r.uniform(-70, 135, n)),
      rho=np.where(r.uniform(size=n) < 0.8, r.uniform(0.72, 0.92, n), r.uniform(0.2, 0.6, n)),
      retry=r.uniform(size=(n, 64, 3)))


def _severity(plan: dict, timepoint: int) -> np.ndarray:
  z = (timepoint - plan["t_peak"] - plan["shift"]) / plan["width"]
  return plan["peak"] * np.exp(-0.5 * z * z)


def study_date(seed: int, patient: int, timepoint: int) -> str:
  """Study date 'YYYYMMDD': a per-patient start date plus 7 days per time point."""
  start = int(_rng(seed, patient, 3).integers(0, 21))
  return (BASE_DATE + datetime.timedelta(days=start + 7 * int(timepoint))).strftime("%Y%m%d")


def patient_id(seed: int, patient: int) -> str:
  return f"phantom-{int(seed)}-{int(patient):03d}"


def _check_args(seed, patient, timepoint, shape, spacing, noise_sd):
  for name, v in (("seed", seed), ("patient", patient), ("timepoint", timepoint)):
    if int(v) != v or v < 0:
      raise PhantomError(f"{name}={v!r} must be a non-negative integer")
  if len(shape) != 3 or any(int(s) != s or s < 8 for s in shape):
    raise PhantomError(
        f"shape={shape!r} must be 3 integers >= 8 in (z, y, x) order, e.g. {DEFAULT_SHAPE}")
  if spacing is not None and (len(spacing) != 3 or any(not s > 0 for s in spacing)):
    raise PhantomError(
        f"spacing={spacing!r} must be 3 positive mm values in (x, y, z) order, "
        f"e.g. {DEFAULT_SPACING}"
    )
  if not noise_sd >= 0:
    raise PhantomError(f"noise_sd={noise_sd!r} must be >= 0 HU")


def generate_scan(seed: int,
                  patient: int,
                  timepoint: int,
                  *,
                  shape: Sequence[int] = DEFAULT_SHAPE,
                  spacing: Sequence[float] | None = None,
                  noise_sd: float = DEFAULT_NOISE_SD) -> PhantomScan:
  """Generates one synthetic chest CT scan of one patient at one time point.

  Args:
    seed: cohort seed.
    patient: patient index (anatomy and lesion seeds depend on seed, patient).
    timepoint: time point index 0, 1, ...; lesion sizes follow the severity curve.
    shape: (z, y, x) voxels.
    spacing: (x, y, z) mm; default DEFAULT_FOV_MM / shape (1.4, 1.4, 5.0 at the default shape).
    noise_sd: standard deviation of the Gaussian image noise in HU (0: noise free).

  Returns:
    PhantomScan.
  """
  _check_args(seed, patient, timepoint, tuple(shape), spacing, noise_sd)
  nz, ny, nx = (int(s) for s in shape)
  if spacing is None:
    spacing = (DEFAULT_FOV_MM[0] / nx, DEFAULT_FOV_MM[1] / ny, DEFAULT_FOV_MM[2] / nz)
  sp = tuple(float(s) for s in spacing)
  zs = ((np.arange(nz) - (nz - 1) / 2) * sp[2]).astype(np.float32)
  ys = ((np.arange(ny) - (ny - 1) / 2) * sp[1]).astype(np.float32)
  xs = ((np.arange(nx) - (nx - 1) / 2) * sp[0]).astype(np.float32)
  a = _anatomy(seed, patient)
  ra = _rng(seed, patient, 0, 1)  # anatomy fields (same at every time point)
  hu = _torso(a, zs, ys, xs)
  lung, bb = _lungs(a, ra, hu, zs, ys, xs)
  Zb, Yb, Xb = zs[bb[0], None, None], ys[None, bb[1], None], xs[None, None, bb[2]]
  lb = lung[bb]

  # Parenchyma (denser posteriorly, by gravity), then vessels: the zero sets of
  # two smooth fields meet along curves; thickened, they are tubes, made
  # thicker near the hila.
  paren = HU_LUNG + 30 * Yb / a["lung_ay"] + 10 * _SmoothField(ra, (zs, ys, xs), 30.0).sample(bb)
  f1 = _SmoothField(ra, (zs, ys, xs), 12.0).sample(bb)
  f2 = _SmoothField(ra, (zs, ys, xs), 12.0).sample(bb)
  dh = np.sqrt((np.abs(Xb) - 30)**2 + (Yb - 10)**2 + (Zb - a["z_carina"] + 30)**2)
  radius = 0.42 * np.clip(1.35 - dh / 120.0, 0.35, 1.35)
  v = np.clip(2.0 * (1.0 - np.sqrt(f1 * f1 + f2 * f2) / radius), 0, 1)
  vessel_hu = paren + (HU_VESSEL - paren) * v * v * (3 - 2 * v)
  lung_hu = np.where(lb, vessel_hu, hu[bb])

  label_b = _lesions(seed, patient, timepoint, a, lung, bb, paren, lung_hu, zs, ys, xs)
  hu[bb] = lung_hu
  label = np.zeros((nz, ny, nx), np.uint8)
  label[bb] = label_b

  _airways(a, hu, lung, zs, ys, xs)
  if noise_sd > 0:
    noise = _rng(seed, patient, 4, timepoint).standard_normal(hu.shape, dtype=np.float32)
    hu += noise * np.float32(noise_sd)
  hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
  origin = (float(xs[0]), float(ys[0]), float(zs[0]) - 150.0)
  geometry = ct_io.Geometry.for_array((nz, ny, nx), sp, origin=origin)
  vv = geometry.voxel_volume_ml
  return PhantomScan(hu=hu,
                     label=label,
                     lung=lung,
                     geometry=geometry,
                     patient_id=patient_id(seed, patient),
                     timepoint=int(timepoint),
                     study_date=study_date(seed, patient, timepoint),
                     lesion_volume_ml=float(np.count_nonzero(label)) * vv,
                     lung_volume_ml=float(np.count_nonzero(lung)) * vv)


def _lesions(seed, patient, timepoint, a, lung, bb, paren, lung_hu, zs, ys, xs) -> np.ndarray:
  """Draws one time point's lesions into `lung_hu` (the lung box `bb`); returns their labels.

  Lesion j is the warped ellipsoid {q <= 1}, q = |(p - c_j) / R_j| / f_j +
  0.25 * noise(p), cut by the lung: GGO where q <= 1, consolidation where
  q <= k_j, which grows with the lesion's severity; f_j = sqrt(severity)
  scales the size. Centres, radii and the noise are fixed per patient, so the
  same lesions grow and shrink over time points. A thin unlabelled halo
  (1 < q < 1.15) blends GGO into the lung, as real borders are not sharp.
  """
  lb = lung[bb]
  label_b = np.zeros(lb.shape, np.uint8)
  plan = _lesion_plan(seed, patient)
  sev = _severity(plan, timepoint)
  rl = _rng(seed, patient, 2)
  les_field = _SmoothField(rl, (zs, ys, xs), 11.0)
  dens_field = _SmoothField(rl, (zs, ys, xs), 16.0)
  for j in range(len(sev)):
    f = np.sqrt(sev[j]) * plan["scale"][j]
    if f < 0.15:
      continue
    c = _lesion_centre(plan, j, a, lung, zs, ys, xs)
    if c is None:
      continue
    half = 1.8 * f * plan["radii"][j]
    box = tuple(_box((c[k] - half[k], c[k] + half[k]), ax) for k, ax in ((2, zs), (1, ys), (0, xs)))
    # Lesions live inside the lung, so their overlap with the lung box is all we need.
    inter = tuple(
        slice(max(box[k].start, bb[k].start), min(box[k].stop, bb[k].stop)) for k in range(3))
    if any(s.stop <= s.start for s in inter):
      continue
    loc = tuple(slice(inter[k].start - bb[k].start, inter[k].stop - bb[k].start) for k in range(3))
    dz = (zs[inter[0], None, None] - c[2]) / plan["radii"][j][2]
    dy = (ys[None, inter[1], None] - c[1]) / plan["radii"][j][1]
    dx = (xs[None, None, inter[2]] - c[0]) / plan["radii"][j][0]
    qn = np.sqrt(dx * dx + dy * dy + dz * dz) / f + 0.25 * les_field.sample(inter)
    k_cons = np.clip((sev[j] - 0.35) * 1.1 * (0.4 + plan["cons"][j]), 0, 0.75)
    inside = lb[loc]
    ggo = (qn <= 1.0) & inside
    cons = (qn <= k_cons) & inside
    dens = dens_field.sample(inter)
    ggo_hu = np.clip(-680 + 150 * sev[j] + plan["ggo_offset"][j] + 90 * dens, *GGO_RANGE)
    cons_hu = np.clip(0 + 30 * dens, *CONSOLIDATION_RANGE)
    halo = (qn > 1.0) & (qn < 1.15) & inside
    t = lung_hu[loc]
    base = paren[loc]
    t = np.where(halo, np.maximum(t, base + (ggo_hu - base) * (1.15 - qn) / 0.3), t)
    t = np.where(ggo, np.maximum(t, ggo_hu), t)
    t = np.where(cons, cons_hu, t)
    lung_hu[loc] = t
    lab = label_b[loc]
    lab[ggo & (lab == 0)] = 1
    lab[cons] = 2
  return label_b


def _torso(a: dict, zs, ys, xs) -> np.ndarray:
  """HU of everything but lungs and airways: body, fat, ribs, sternum, spine, aorta."""
  Y, X = ys[:, None], xs[None, :]
  ay = np.where(Y < 0, a["body_ay_ant"], a["body_ay_post"]).astype(np.float32)
  inner = (X / (a["body_ax"] - a["fat"]))**2 + (Y / (ay - a["fat"]))**2 <= 1.0
  sl = np.full((len(ys), len(xs)), HU_AIR, np.float32)
  sl[(X / a["body_ax"])**2 + (Y / ay)**2 <= 1.0] = HU_FAT
  sl[inner] = HU_SOFT
  sl[(np.abs(X) < 15) & (Y < -(a["body_ay_ant"] - a["fat"] - 22)) & inner] = HU_STERNUM
  # Vertebra: body with a cortical rim, canal in a ring of bone, spinous process.
  dv = np.sqrt(X**2 + (Y - a["spine_y"])**2)
  dc = np.sqrt(X**2 + (Y - a["spine_y"] - 30)**2)
  sl[dv <= 20] = HU_CORTEX
  sl[dv <= 17] = HU_VERTEBRA
  sl[(dc <= 13) & (dc > 8)] = HU_CORTEX
  sl[dc <= 8] = 20.0
  sl[(np.abs(X) < 4) & (Y > a["spine_y"] + 40) & (Y < a["spine_y"] + 60)] = HU_CORTEX
  hu = np.broadcast_to(sl, (len(zs),) + sl.shape).copy()
  # Ribs: an elliptic ring inside the muscle, cut into segments whose angle
  # drifts with z (ribs slope), sparing the sternum and the spine.
  rib_ax, rib_ay = a["body_ax"] - a["fat"] - 8, ay - a["fat"] - 8
  rr = np.sqrt((X / rib_ax)**2 + (Y / rib_ay)**2)
  theta = np.arctan2(Y / rib_ay, X / rib_ax)
  ring = (rr <= 1.0) & (rr >= 1.0 - 9.0 / rib_ax) \
      & (np.abs(theta + np.pi / 2) > 0.35) & (np.abs(theta - np.pi / 2) > 0.35)
  segs = np.sin(6 * theta[ring][None, :] + 2 * np.pi * zs[:, None] / 28.0 + a["rib_phase"]) > 0.35
  hu[:, ring] = np.where(segs, HU_RIB, hu[:, ring])
  # Descending aorta, below the arch.
  low = zs < a["z_carina"] + 10
  disc = (X - 22)**2 + (Y - 55)**2 <= 12**2
  sub = hu[low]
  sub[:, disc] = HU_BLOOD
  hu[low] = sub
  return hu


def _lungs(a: dict, ra: np.random.Generator, hu: np.ndarray, zs, ys, xs):
  """Lung mask and its bounding box; draws the heart into `hu`.

  Per side the lung is an ellipse whose size follows a dome profile in z,
  above a diaphragm dome, inside the ribs, lateral to the mediastinum, spine,
  heart and aorta; outlines are perturbed by a smooth field. Only a box that
  can hold lung is computed.
  """
  nz, ny, nx = hu.shape
  rib_ax = a["body_ax"] - a["fat"] - 20
  ay_ant, ay_post = a["body_ay_ant"] - a["fat"] - 20, a["body_ay_post"] - a["fat"] - 20
  cand = (_box((a["z_base"] - 25, a["z_apex"]), zs), _box((-ay_ant, ay_post), ys),
          _box((-rib_ax, rib_ax), xs))
  lung = np.zeros((nz, ny, nx), bool)
  if any(s.stop <= s.start for s in cand):
    return lung, cand
  Z, Y, X = zs[cand[0], None, None], ys[None, cand[1], None], xs[None, None, cand[2]]
  Y2, X2 = Y[0], X[0]
  irreg = _SmoothField(ra, (zs, ys, xs), 45.0).sample(cand)
  h = (Z - a["z_base"]) / (a["z_apex"] - a["z_base"])
  w2 = np.clip(1 - (np.maximum(h - 0.3, 0) / 0.7)**2, 0, 1) * (h <= 1.0)
  hx, hy, hax, hay, haz = a["heart"]
  hz = a["z_base"] + 50
  hr = ((X - hx) / hax)**2 + ((Y - hy) / hay)**2 + ((Z - hz) / haz)**2
  hu[cand] = np.where(hr <= 1, HU_BLOOD, hu[cand])
  heart_margin = (((X - hx) / (hax + 6))**2 + ((Y - hy) / (hay + 6))**2
                  + ((Z - hz) / (haz + 6))**2 <= 1)
  ay = np.where(Y2 < 0, ay_ant, ay_post)
  free2 = ((X2 / rib_ax)**2 + (Y2 / ay)**2 <= 1) & (np.abs(X2) > 15) \
      & (X2**2 + (Y2 - a["spine_y"])**2 > 30**2)
  aorta2 = (X2 - 22)**2 + (Y2 - 55)**2 <= 18**2
  right = X2 < 0
  cx = np.where(right, -a["lung_cx"], a["lung_cx"])
  q = ((X2 - cx) / a["lung_ax"])**2 + ((Y2 - a["lung_cy"]) / a["lung_ay"])**2
  dome = np.where(right, a["dome"][0], a["dome"][1])
  # Each dome peaks medial and anterior to the lung centre, so low slices show
  # the lung as a crescent open towards the mediastinum.
  qd = ((X2 - 0.6 * cx) / a["lung_ax"])**2 + ((Y2 - a["lung_cy"] + 10) / (0.9 * a["lung_ay"]))**2
  diaphragm = a["z_base"] + dome * np.clip(1 - qd, 0, 1) - 15 * (Y2 - a["lung_cy"]) / a["lung_ay"]
  inside = (q + 0.08 * irreg < w2) & (Z > diaphragm) & free2 & ~heart_margin
  inside &= ~(aorta2 & (Z < a["z_carina"] + 10))
  lung[cand] = inside
  nzb = [np.nonzero(inside.any(axis=ax))[0] for ax in ((1, 2), (0, 2), (0, 1))]
  if not nzb[0].size:
    return lung, cand
  bb = tuple(slice(c.start + int(n[0]), c.start + int(n[-1]) + 1) for c, n in zip(cand, nzb))
  return lung, bb


def _airways(a: dict, hu: np.ndarray, lung: np.ndarray, zs, ys, xs) -> None:
  """Draws the trachea and main bronchi (air) into `hu`; the bronchi stop at the lungs."""
  top = zs >= a["z_carina"]
  disc = xs[None, :]**2 + (ys[:, None] - a["trachea_y"])**2 <= 8.0**2
  sub = hu[top]
  sub[:, disc] = HU_AIR
  hu[top] = sub
  p0 = np.array([0.0, a["trachea_y"], a["z_carina"]])
  for side in (-1, 1):
    p1 = np.array([side * 45.0, a["trachea_y"] + 8, a["z_carina"] - 32])
    lo, hi = np.minimum(p0, p1) - 6, np.maximum(p0, p1) + 6
    box = (_box((lo[2], hi[2]), zs), _box((lo[1], hi[1]), ys), _box((lo[0], hi[0]), xs))
    if any(s.stop <= s.start for s in box):
      continue
    d = _segment_distance(xs[None, None, box[2]], ys[None, box[1], None], zs[box[0], None, None],
                          p0, p1)
    hu[box] = np.where((d <= 5.5) & ~lung[box], HU_AIR, hu[box])


def _segment_distance(X, Y, Z, p0, p1):
  d = p1 - p0
  t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / float(d @ d), 0, 1)
  return np.sqrt((X - p0[0] - t * d[0])**2 + (Y - p0[1] - t * d[1])**2 + (Z - p0[2] - t * d[2])**2)


def _lesion_centre(plan, j, a, lung, zs, ys, xs):
  """A lesion centre (x, y, z) mm inside the lung; planned position, else deterministic retries."""
  # angle 0 points laterally, +90 degrees posteriorly: COVID-19 opacities are
  # mostly peripheral and posterior, rarely on the mediastinal surface.
  tries = [(plan["height"][j], plan["angle"][j], plan["rho"][j])]
  tries += [(0.05 + 0.85 * u[0], np.deg2rad(-70 + 205 * u[1]), 0.3 + 0.62 * u[2])
            for u in plan["retry"][j]]
  for height, angle, rho in tries:
    z = a["z_base"] + height * (a["z_apex"] - a["z_base"])
    w = np.sqrt(max(1 - (max(height - 0.3, 0) / 0.7)**2, 0))
    x = plan["side"][j] * (a["lung_cx"] + rho * w * a["lung_ax"] * np.cos(angle))
    y = a["lung_cy"] + rho * w * a["lung_ay"] * np.sin(angle)
    k, i, m = (int(np.argmin(np.abs(ax - v))) for ax, v in ((zs, z), (ys, y), (xs, x)))
    if abs(zs[k] - z) < 1.5 * (zs[1] - zs[0]) and lung[k, i, m]:
      return np.array([x, y, z])
  return None


def generate_cohort(seed: int,
                    num_patients: int = DEFAULT_NUM_PATIENTS,
                    num_timepoints: int = DEFAULT_NUM_TIMEPOINTS,
                    **kwargs) -> Iterator[PhantomScan]:
  """Yields every patient's scans, patient-major: (0, t0), (0, t1), ..., (1, t0), ...

  Args:
    seed: cohort seed.
    num_patients: number of patients (>= 1).
    num_timepoints: scans per patient (>= 1).
    **kwargs: passed to `generate_scan` (shape, spacing, noise_sd).
  """
  for name, v in (("num_patients", num_patients), ("num_timepoints", num_timepoints)):
    if int(v) != v or v < 1:
      raise PhantomError(f"{name}={v!r} must be an integer >= 1")
  for p in range(int(num_patients)):
    for t in range(int(num_timepoints)):
      yield generate_scan(seed, p, t, **kwargs)
