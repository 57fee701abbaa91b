"""GeniusIndex: the whole GENIUS method behind one facade, in one process.

    index = GeniusIndex.fit(corpus, queries, targets, IndexConfig.for_corpus(len(corpus)))
    index.save("my-index")
    hits = GeniusIndex.load("my-index").search(new_queries, k=10)

fit: embed (encoders) -> train the quantizer on query->target pairs -> IDs for every item
-> trie -> train the decoder on query -> target ID (plus item -> own ID).
search: embed queries -> trie-constrained beam search -> items -> optional re-ranking.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from genius.atomic import write_atomic, write_json_atomic
from genius.beam_search import beam_search, per_query_modalities
from genius.decoder import DecoderConfig, GeniusDecoder
from genius.decoder_training import DecoderTrainConfig, train_decoder
from genius.idcodec import IdCodec
from genius.items import Items
from genius.modality import Modality
from genius.quantizer import ModalResidualQuantizer, QuantizerConfig, train_quantizer
from genius.rerank import Ranking, rank
from genius.trie import Trie

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RERANK_SOURCES = ("vectors", "codes")


@dataclass
class IndexConfig:
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    decoder_training: DecoderTrainConfig = field(default_factory=DecoderTrainConfig)
    beam_size: int = 50  # the paper's beam
    ranges_per_modality: int = 1  # trie partitions per modality (by first semantic code)
    store_vectors: bool = True  # keep item embeddings (fp16) for re-ranking
    query_batch: int = 32  # queries decoded together
    device: str = "cpu"

    @classmethod
    def paper(cls) -> "IndexConfig":
        """Paper size: 8 x 4096 codes, t5-small decoder, 31 epochs (GPU work)."""
        return cls()

    @classmethod
    def for_corpus(cls, num_items: int, **quantizer_overrides) -> "IndexConfig":
        """A CPU-sized config: codebooks sized to the corpus and a small decoder."""
        return cls(
            quantizer=QuantizerConfig.for_corpus(num_items, **quantizer_overrides),
            decoder=DecoderConfig.small(),
            decoder_training=DecoderTrainConfig(epochs=30, batch_size=128, lr=2e-3),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IndexConfig":
        kwargs = {}
        for f in fields(cls):
            value = data.get(f.name)
            if value is None:
                continue
            default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
            kwargs[f.name] = type(default)(**value) if is_dataclass(default) else value
        return cls(**kwargs)


@dataclass
class SearchResult:
    items: np.ndarray  # (Q, k) item numbers, -1 where fewer than k were found
    scores: np.ndarray  # (Q, k)
    keys: list[list[str]]  # the items' keys, per query

    def as_lists(self) -> list[list[int]]:
        return [[int(i) for i in row if i >= 0] for row in self.items]


class GeniusIndex:
    def __init__(
        self,
        config: IndexConfig,
        quantizer: ModalResidualQuantizer,
        decoder: GeniusDecoder,
        trie: Trie,
        item_codes: np.ndarray,
        item_keys: list[str],
        item_vectors: np.ndarray | None = None,
        encoder=None,
    ):
        self.config = config
        self.quantizer = quantizer.eval()
        self.decoder = decoder.eval()
        self.trie = trie
        self.item_codes = item_codes  # (N, 1+L): modality, then semantic codes
        self.item_keys = item_keys
        self.item_vectors = item_vectors  # (N, D) fp16, or None
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.item_codes)

    @property
    def codec(self) -> IdCodec:
        return self.trie.codec

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(
        cls,
        corpus: Items,
        queries: Items,
        targets: Sequence[int] | np.ndarray,
        config: IndexConfig | None = None,
        encoder=None,
        progress: bool = True,
    ) -> "GeniusIndex":
        """Train quantizer and decoder on (queries[i] -> corpus[targets[i]]) and index `corpus`."""
        config = config or IndexConfig.for_corpus(len(corpus))
        targets = np.asarray(targets, dtype=np.int64)
        if len(targets) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(targets)} targets")
        if len(targets) and (targets.min() < 0 or targets.max() >= len(corpus)):
            raise ValueError(f"targets must index the corpus (0..{len(corpus) - 1})")
        torch.manual_seed(config.quantizer.seed)
        item_emb = embed_items(corpus, encoder)
        query_emb = embed_items(queries, encoder)
        dim = item_emb.shape[1]
        qcfg = config.quantizer
        log.info("stage 2: quantizer (%d levels x %d codes) on %d pairs, %d items",
                 qcfg.num_levels, qcfg.codebook_size, len(targets), len(corpus))
        quantizer = ModalResidualQuantizer.from_config(dim, qcfg).to(config.device)
        train_quantizer(
            quantizer, query_emb, item_emb[targets], corpus.modality[targets],
            item_emb=item_emb, item_modality=corpus.modality, config=qcfg, progress=progress,
            query_modality=queries.modality,
        )
        item_codes = quantizer.encode(item_emb, corpus.modality).cpu().numpy()
        codec = IdCodec(qcfg.num_levels, qcfg.codebook_size)
        trie = Trie.build(codec, codec.pack(item_codes[:, 1:]), item_codes[:, 0],
                          ranges_per_modality=config.ranges_per_modality)
        log.info("trie: %d items, %d distinct IDs, %.1f bytes/item", len(trie),
                 len(np.unique(item_codes, axis=0)), trie.bytes_per_item())

        log.info("stage 3: decoder on %d pairs (+%d items)", len(targets),
                 len(corpus) if config.decoder_training.index_task else 0)
        decoder = GeniusDecoder(config.decoder, dim, qcfg.num_levels, qcfg.codebook_size).to(config.device)
        decoder.init_token_embeddings(quantizer.codebooks.detach().cpu(), _modality_means(item_emb, corpus.modality, dim))
        train_decoder(
            decoder, torch.from_numpy(query_emb), torch.from_numpy(item_emb[targets]),
            torch.from_numpy(item_codes[targets]), config.decoder_training,
            item_emb=torch.from_numpy(item_emb), item_codes=torch.from_numpy(item_codes), progress=progress,
        )
        keys = list(corpus.keys) if corpus.keys is not None else [str(i) for i in range(len(corpus))]
        vectors = item_emb.astype(np.float16) if config.store_vectors else None
        return cls(config, quantizer, decoder, trie, item_codes, keys, vectors, encoder)

    # ------------------------------------------------------------------ search
    def embed(self, queries: Items | np.ndarray) -> np.ndarray:
        if isinstance(queries, np.ndarray):
            return np.asarray(queries, dtype=np.float32)
        return embed_items(queries, self.encoder)

    @torch.no_grad()
    def search(
        self,
        queries: Items | np.ndarray,
        k: int = 10,
        beam_size: int | None = None,
        rerank: bool = True,
        target_modalities: Collection | Sequence[Collection] | None = None,
        rerank_with: str = "vectors",
    ) -> SearchResult:
        """Top-k items per query.

        rerank: score the beam's items by cosine similarity with the query, using the stored
        item vectors (rerank_with="vectors") or vectors rebuilt from the IDs ("codes").
        target_modalities: restrict results to these modalities (all queries, or one set each).
        """
        if rerank_with not in RERANK_SOURCES:
            raise ValueError(f"rerank_with must be one of {RERANK_SOURCES}, got {rerank_with!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        beam_size = beam_size or self.config.beam_size
        query_emb = self.embed(queries)
        if query_emb.shape[1] != self.decoder.embed_dim:
            raise ValueError(f"query embeddings have dim {query_emb.shape[1]}, index expects {self.decoder.embed_dim}")
        per_query = per_query_modalities(target_modalities, len(query_emb))
        all_items, all_scores = [], []
        device = self.config.device
        for start in range(0, len(query_emb), self.config.query_batch):
            chunk = torch.from_numpy(query_emb[start : start + self.config.query_batch]).to(device)
            modalities = None if per_query is None else per_query[start : start + len(chunk)]
            beams = beam_search(self.decoder, self.trie, chunk, beam_size, modalities)
            ranking = self._rank(beams, chunk, k, rerank, rerank_with)
            all_items.append(ranking.items)
            all_scores.append(ranking.scores)
        items = np.concatenate(all_items) if all_items else np.zeros((0, k), dtype=np.int64)
        scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k))
        keys = [[self.item_keys[i] for i in row if i >= 0] for row in items]
        return SearchResult(items, scores, keys)

    def _rank(self, beams, query: torch.Tensor, k: int, rerank: bool, rerank_with: str) -> Ranking:
        if not rerank:
            return rank(beams, k)
        if rerank_with == "vectors" and self.item_vectors is not None:
            return rank(beams, k, query.cpu().numpy(), lambda items: self.item_vectors[items].astype(np.float32))
        # Rebuilt vectors live in the quantizer's projected space: compare the projected query.
        projected = self.quantizer.project(query).cpu().numpy()
        rebuild = lambda items: self.quantizer.decode(torch.from_numpy(self.item_codes[items])).cpu().numpy()  # noqa: E731
        return rank(beams, k, projected, rebuild)

    # ------------------------------------------------------------------ storage
    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.trie.save(directory / "trie")
        write_atomic(directory / "quantizer.pt", lambda f: torch.save(self.quantizer.state_dict(), f))
        write_atomic(directory / "decoder.pt", lambda f: torch.save(self.decoder.state_dict(), f))
        table = pa.table({
            "item": pa.array(np.arange(len(self)), pa.int64()),
            "key": pa.array(self.item_keys, pa.string()),
            "modality": pa.array([Modality(int(m)).name.lower() for m in self.item_codes[:, 0]], pa.string()),
            "id": pa.array(self.codec.to_bytes(self.codec.pack(self.item_codes[:, 1:])), pa.binary(self.codec.width)),
        })
        write_atomic(directory / "items.parquet", lambda f: pq.write_table(table, f))
        if self.item_vectors is not None:
            write_atomic(directory / "vectors.npy", lambda f: np.save(f, self.item_vectors))
        if self.encoder is not None:
            self.encoder.save(directory / "encoder")
        meta = {"format_version": FORMAT_VERSION, "config": self.config.to_dict(),
                "embed_dim": self.decoder.embed_dim, "num_items": len(self),
                "has_encoder": self.encoder is not None, "has_vectors": self.item_vectors is not None}
        write_json_atomic(directory / "index.json", meta)  # written last: marks the index complete

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu", mmap: bool = True) -> "GeniusIndex":
        directory = Path(directory)
        meta_path = directory / "index.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory} holds no complete GENIUS index (missing index.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        config = IndexConfig.from_dict(meta["config"])
        config.device = device
        dim = meta["embed_dim"]
        quantizer = ModalResidualQuantizer.from_config(dim, config.quantizer)
        quantizer.load_state_dict(torch.load(directory / "quantizer.pt", map_location=device))
        decoder = GeniusDecoder(config.decoder, dim, config.quantizer.num_levels, config.quantizer.codebook_size)
        decoder.load_state_dict(torch.load(directory / "decoder.pt", map_location=device))
        trie = Trie.load(directory / "trie", mmap=mmap)
        table = pq.read_table(directory / "items.parquet")
        codec = trie.codec
        ids = codec.from_bytes(table.column("id").to_pylist())
        modality = np.array([int(Modality.parse(m)) for m in table.column("modality").to_pylist()], dtype=np.int64)
        item_codes = np.concatenate([modality[:, None], codec.unpack(ids)], axis=1)
        vectors = None
        if meta.get("has_vectors"):
            vectors = np.load(directory / "vectors.npy", mmap_mode="r" if mmap else None)
        encoder = None
        if meta.get("has_encoder"):
            from genius.encoders import MultimodalEncoder

            encoder = MultimodalEncoder.load(directory / "encoder")
        return cls(config, quantizer.to(device), decoder.to(device), trie, item_codes,
                   table.column("key").to_pylist(), vectors, encoder)


def embed_items(items: Items, encoder) -> np.ndarray:
    """Embeddings of `items`: the given ones, or the encoder's (by modality)."""
    if items.embeddings is not None:
        return items.embeddings
    if encoder is None:
        raise ValueError("these items carry no embeddings: pass an encoder (genius.encoders.MultimodalEncoder)")
    out: np.ndarray | None = None
    for modality in Modality:
        rows = np.flatnonzero(items.modality == modality)
        if len(rows) == 0:
            continue
        texts = None if items.texts is None else [items.texts[i] for i in rows]
        images = None if items.images is None else [items.images[i] for i in rows]
        if modality == Modality.TEXT:
            emb = encoder.encode_text(texts)
        elif modality == Modality.IMAGE:
            emb = encoder.encode_image(images)
        else:
            emb = encoder.encode_pair(images, texts)
        emb = emb.detach().cpu().numpy().astype(np.float32)
        if out is None:
            out = np.zeros((len(items), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
    assert out is not None
    return out


def _modality_means(item_emb: np.ndarray, modality: np.ndarray, dim: int) -> torch.Tensor:
    means = torch.zeros(len(Modality), dim)
    for m in Modality:
        rows = modality == m
        if rows.any():
            means[m] = torch.from_numpy(item_emb[rows].mean(0))
    return means
