"""TFDS builders of the slice datasets; importing this package registers them.

- `covid_semiseg`: COVID-SemiSeg 8-bit slices (manual_dir with Imgs/ and GT/).
- `ct_volumes[/config]`: CT volumes in HU, MSD / nnU-Net layout (manual_dir).
- `ct_phantom[/config]`: the synthetic cohort, generated without download.

Build with `python -m scoat_jax.datasets.build NAME ...`; read with
`open_source(NAME, data_dir)` (or `tfds.data_source(NAME, data_dir=...)`).
"""
from scoat_jax.datasets.base import (DatasetError, DatasetNotBuiltError, ScanEntry, SliceDataset,
                                     open_source)
from scoat_jax.datasets.covid_semiseg import CovidSemiseg
from scoat_jax.datasets.ct_phantom import CtPhantom
from scoat_jax.datasets.ct_volumes import CtVolumes

BUILDERS = {"covid_semiseg": CovidSemiseg, "ct_volumes": CtVolumes, "ct_phantom": CtPhantom}

__all__ = ["BUILDERS", "CovidSemiseg", "CtPhantom", "CtVolumes", "DatasetError",
           "DatasetNotBuiltError", "ScanEntry", "SliceDataset", "open_source"]
