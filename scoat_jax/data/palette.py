"""One palette for every picture of a prediction: mask PNGs, DICOM SEG, key images.

Label 1 (opacity for a 1-class model, ground-glass opacity for a 3-class one)
is gold and label 2 (consolidation) red, everywhere: the colour a
radiologist sees for ground glass on the key-image page is the colour the
viewer shows for the SEG's ground-glass segment (its RecommendedDisplayCIELab
Value) and the colour of the 2-D mask PNG. Gold and red differ in lightness
as well as hue, so they stay apart for red-green colour blindness, and both
stand out on the grey of a lung window.
"""
from __future__ import annotations

# label -> (R, G, B), 0..255.
LABEL_RGB = {1: (255, 215, 0), 2: (255, 0, 0)}
# label -> its name on a page, per number of classes.
LABEL_NAMES = {1: {1: "opacity"}, 3: {1: "ground glass", 2: "consolidation"}}


def hex_colour(label: int) -> str:
  """'#rrggbb' of a label (matplotlib's colour form)."""
  return "#{:02x}{:02x}{:02x}".format(*LABEL_RGB[label])


def png_palette() -> list[int]:
  """A 256-entry PIL palette (768 values): 0 black, then the labels' colours, then black."""
  flat = [0, 0, 0]
  for label in sorted(LABEL_RGB):
    flat += list(LABEL_RGB[label])
  return flat + [0, 0, 0] * (256 - len(flat) // 3)
