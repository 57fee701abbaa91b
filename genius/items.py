"""A batch of items or queries: texts, images, image-text pairs, or precomputed embeddings."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from genius.modality import Modality


@dataclass
class Items:
    """Rows of text and/or image, or their embeddings.

    A row's modality is TEXT when it has only text, IMAGE when only an image, IMAGE_TEXT
    when both. With `embeddings` given, `modality` must be given too (the vectors cannot
    tell). `keys` are the caller's identifiers, kept in the item table.
    """

    texts: Sequence[str | None] | None = None
    images: Sequence[object | None] | None = None  # PIL images or encoded bytes
    embeddings: np.ndarray | None = None
    modality: np.ndarray | None = None
    keys: Sequence[str] | None = None

    def __post_init__(self) -> None:
        lengths = {name: len(v) for name, v in
                   (("texts", self.texts), ("images", self.images), ("embeddings", self.embeddings),
                    ("modality", self.modality), ("keys", self.keys)) if v is not None}
        if not lengths:
            raise ValueError("Items needs texts, images or embeddings")
        if len(set(lengths.values())) > 1:
            raise ValueError(f"Items fields differ in length: {lengths}")
        if self.modality is None:
            if self.embeddings is not None and self.texts is None and self.images is None:
                raise ValueError("Items with only embeddings need `modality` too")
            self.modality = np.array([self._row_modality(i) for i in range(len(self))], dtype=np.int64)
        else:
            self.modality = np.array([int(Modality.parse(m)) for m in self.modality], dtype=np.int64)
        if self.embeddings is not None:
            self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
            if self.embeddings.ndim != 2:
                raise ValueError(f"embeddings must be 2-D (N, D), got shape {self.embeddings.shape}")

    def __len__(self) -> int:
        for v in (self.embeddings, self.texts, self.images, self.modality, self.keys):
            if v is not None:
                return len(v)
        return 0

    def _row_modality(self, i: int) -> int:
        has_text = self.texts is not None and self.texts[i] is not None
        has_image = self.images is not None and self.images[i] is not None
        if has_text and has_image:
            return int(Modality.IMAGE_TEXT)
        if has_image:
            return int(Modality.IMAGE)
        if has_text:
            return int(Modality.TEXT)
        raise ValueError(f"row {i} has neither text nor image")

    def subset(self, index: Sequence[int] | np.ndarray) -> "Items":
        index = np.asarray(index, dtype=np.int64)
        pick = lambda seq: None if seq is None else [seq[i] for i in index]  # noqa: E731
        return Items(
            texts=pick(self.texts), images=pick(self.images),
            embeddings=None if self.embeddings is None else self.embeddings[index],
            modality=self.modality[index], keys=pick(self.keys),
        )

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, modality, keys: Sequence[str] | None = None) -> "Items":
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if np.isscalar(modality) or isinstance(modality, (str, Modality)):
            modality = [modality] * len(embeddings)
        return cls(embeddings=embeddings, modality=np.asarray([int(Modality.parse(m)) for m in modality]), keys=keys)
