"""Synthetic chest CT phantoms with COVID-19-like opacities (embedded default data).

Each scan is a (z, y, x) volume in Hounsfield units with exact masks:
- air outside the body (-1000), a body ellipse of soft tissue (+45) under a
  subcutaneous fat layer (-100), ribs as ring segments (+700), sternum (+400),
  a vertebra (+400..+700) with its canal, heart and aorta (+40);
- two lungs (about -860, denser posteriorly) with smooth irregular outlines,
  diaphragm domes and a cardiac notch; tapering vessels (+40 at the core);
- trachea and main bronchi (-1000) that reach the lungs at the hila, so a
  threshold joins them to the lungs as in real CT;
- lesions inside the lungs only, mostly subpleural: ground-glass opacity (GGO,
  label 1, -740..-330 HU before noise; vessels stay visible through it) with a
  consolidation core (label 2, -90..+45 HU) that appears as a lesion becomes
  severe; lesion shapes are warped ellipsoids;
- Gaussian noise (20 HU sd by default).

Geometry: identity direction (LPS: x to the patient's left, y posterior, z
superior), so index z = 0 is the most inferior slice. Positions are in mm
relative to the volume centre, so any shape/spacing gives the same anatomy.

Follow-up: a patient keeps the same anatomy and the same lesion seeds at every
time point; each lesion's size follows the patient's severity curve
exp(-((t - t_peak - shift) / width)^2 / 2) over time points t, so lesions grow
then shrink. Everything is deterministic per (seed, patient, timepoint).
`lesion_volume_ml = (label > 0).sum() * voxel_volume_ml` and
`lung_volume_ml = lung.sum() * voxel_volume_ml` (lung includes its lesions).

Modules: `anatomy` generates a scan, `cohort` writes scans and a cohort table;
`python -m scoat_jax.data.phantom --out=DIR --patients=2 --timepoints=3
--format=nifti` writes one from the command line.
"""
from scoat_jax.data.phantom.anatomy import (BASE_DATE, DEFAULT_FOV_MM, DEFAULT_NOISE_SD,
                                            DEFAULT_NUM_PATIENTS, DEFAULT_NUM_TIMEPOINTS,
                                            DEFAULT_SHAPE, DEFAULT_SPACING, FORMATS, PhantomError,
                                            PhantomScan, generate_cohort, generate_scan,
                                            patient_id, study_date)
from scoat_jax.data.phantom.cohort import (COHORT_COLUMNS, planned_paths, scan_name, write_cohort,
                                           write_scan)

__all__ = ["BASE_DATE", "COHORT_COLUMNS", "DEFAULT_FOV_MM", "DEFAULT_NOISE_SD",
           "DEFAULT_NUM_PATIENTS", "DEFAULT_NUM_TIMEPOINTS", "DEFAULT_SHAPE", "DEFAULT_SPACING",
           "FORMATS", "PhantomError", "PhantomScan", "generate_cohort", "generate_scan",
           "patient_id", "planned_paths", "scan_name", "study_date", "write_cohort", "write_scan"]
