"""The three item modalities; their number is code 0 of every GENIUS ID."""
from __future__ import annotations

import enum

import numpy as np


class Modality(enum.IntEnum):
    IMAGE = 0
    TEXT = 1
    IMAGE_TEXT = 2

    @classmethod
    def parse(cls, value: "str | int | Modality") -> "Modality":
        """Accept 'image', 'text', 'image_text' (or 'image-text'), an int, or a Modality."""
        if isinstance(value, Modality):
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return cls(int(value))
        name = str(value).strip().lower().replace("-", "_").replace("+", "_")
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(
                f"unknown modality {value!r}: expected one of image, text, image_text"
            ) from None


NUM_MODALITIES = len(Modality)
