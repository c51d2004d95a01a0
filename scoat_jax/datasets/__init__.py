"""TFDS builders of the slice datasets; importing this package registers them.

- `covid_semiseg`: COVID-SemiSeg 8-bit slices (manual_dir with Imgs/ and GT/).
- `ct_volumes[/config]`: CT volumes in HU, MSD / nnU-Net layout (manual_dir).
- `ct_phantom[/config]`: the synthetic cohort, generated without download.
- `unlabelled_slices`, `unlabelled_volumes`: CT without masks, for semi-supervised
  training (their soft labels are folders of maps, `scoat_jax.data.soft_labels`).

Build with `python -m scoat_jax.datasets.build NAME ...`; read with
`open_source(NAME, data_dir)` (or `tfds.data_source(NAME, data_dir=...)`).
"""
from scoat_jax.datasets.base import (DatasetError, DatasetNotBuiltError, ScanEntry, SliceDataset,
                                     open_source)
from scoat_jax.datasets.covid_semiseg import CovidSemiseg
from scoat_jax.datasets.ct_phantom import CtPhantom
from scoat_jax.datasets.ct_volumes import CtVolumes
from scoat_jax.datasets.unlabelled import UnlabelledSlices, UnlabelledVolumes

BUILDERS = {"covid_semiseg": CovidSemiseg, "ct_volumes": CtVolumes, "ct_phantom": CtPhantom,
            "unlabelled_slices": UnlabelledSlices, "unlabelled_volumes": UnlabelledVolumes}

__all__ = ["BUILDERS", "CovidSemiseg", "CtPhantom", "CtVolumes", "DatasetError",
           "DatasetNotBuiltError", "ScanEntry", "SliceDataset", "UnlabelledSlices",
           "UnlabelledVolumes", "open_source"]
