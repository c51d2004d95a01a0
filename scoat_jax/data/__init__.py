"""Data on the host: CT volumes with their geometry, intensities, slice preprocessing.

- `ct_io`: reading and writing CT volumes and masks (NIfTI, MHA, NRRD, DICOM series);
  `dicom_writer` writes a DICOM series.
- `intensity`: HU windowing and 8-bit scaling; `preprocess`: one slice to the network's
  grid and back (training and inference share it).
- `readers` / `writers`: the inputs a command takes and the files it writes.
- `folds`: cross-validation by case; `lung_mask`: classical lung segmentation;
  `phantom`: the synthetic chest-CT cohort.
"""
