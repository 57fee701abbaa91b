"""Do the quantizer's codes rank well enough to score the beam? A check at fit time.

The codebook-scored beam (IndexConfig.codebook_weight) trusts the codes' own ranking: the
projected query's inner product with an item's reconstruction. When the quantizer's training
has collapsed (the projection squeezed into a cone that a few codes cover: seen on spread-out
data such as random unit vectors), that ranking is noise and a large weight drowns the
decoder. This check ranks a sample of training targets among random items both by the codes
and by the unquantized projection; the ratio of their recall@10 says how much the codes keep.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genius.quantizer import ModalResidualQuantizer

# Below this share of the unquantized projection's recall@10, the codes do not score the beam.
# Codes that keep less still help: Openclipart text -> image (5 x 64 codes keeping 47 %),
# GENIUS recall@10 0.020 by the decoder alone, 0.050 with the codes at weight 300
# (bench/results/peers-openclipart.md); collapsed codes keep next to nothing.
MIN_CODES_RECALL_RATIO = 0.25


@dataclass
class CodesCheck:
    codes_recall: float  # recall@10 of the training targets ranked by query . reconstruction
    projected_recall: float  # the same ranked by query . projected item (no quantization)
    queries: int
    candidates: int

    @property
    def ratio(self) -> float:
        return self.codes_recall / self.projected_recall if self.projected_recall > 0 else 1.0

    @property
    def codes_usable(self) -> bool:
        return self.ratio >= MIN_CODES_RECALL_RATIO


@torch.no_grad()
def check_codes(quantizer: ModalResidualQuantizer, query_emb: np.ndarray, item_emb: np.ndarray,
                item_codes: np.ndarray, targets: np.ndarray, sample: int = 256, candidates: int = 4096,
                seed: int = 0) -> CodesCheck:
    """Rank each of up to `sample` training queries' target among the sampled queries' targets
    plus random items (`candidates` in all, or every item), by the codes and unquantized."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(targets), min(sample, len(targets)), replace=False)
    wanted = np.unique(targets[rows])
    others = rng.choice(len(item_emb), min(candidates, len(item_emb)), replace=False)
    pool = np.union1d(wanted, others)
    position = np.searchsorted(pool, targets[rows])
    query = quantizer.project(torch.from_numpy(np.ascontiguousarray(query_emb[rows], dtype=np.float32)))
    items = quantizer.project(torch.from_numpy(np.ascontiguousarray(item_emb[pool], dtype=np.float32)))
    rebuilt = quantizer.decode(torch.from_numpy(item_codes[pool]))

    def recall_at_10(vectors: torch.Tensor) -> float:
        top = (query @ vectors.T).topk(min(10, len(pool)), dim=1).indices.numpy()
        return float((top == position[:, None]).any(axis=1).mean())

    return CodesCheck(recall_at_10(rebuilt), recall_at_10(items), len(rows), len(pool))
