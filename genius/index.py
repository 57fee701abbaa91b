"""GeniusIndex: the whole GENIUS method behind one facade, in one process.

    index = GeniusIndex.fit(corpus, queries, targets, IndexConfig.for_corpus(len(corpus)))
    index.save("my-index")                      # publishes my-index/v-0 (format v2, genius.store)
    hits = GeniusIndex.load("my-index").search(new_queries, k=10)

fit: embed (encoders) -> train the quantizer on query->target pairs -> IDs for every item
-> trie -> train the decoder on query -> target ID (plus item -> own ID).
search: embed queries -> trie-constrained beam search -> items -> optional re-ranking.
A loaded index is memory-mapped: opening it reads no per-item data; keys, modalities and
vectors are read for the beam's items only. add/delete/compact publish new versions
(genius.store.update).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch

from genius.beam_search import beam_search, per_query_modalities
from genius.codes_check import MIN_CODES_RECALL_RATIO, check_codes
from genius.decoder import DecoderConfig, GeniusDecoder
from genius.decoder_training import DecoderTrainConfig, train_decoder
from genius.idcodec import IdCodec
from genius.items import Items
from genius.modality import NUM_MODALITIES, Modality
from genius.quantizer import ModalResidualQuantizer, QuantizerConfig, train_quantizer
from genius.rerank import Ranking, candidates, rank
from genius.store import data_files, update
from genius.store.item_table import ItemTables, make_table
from genius.store.layout import MODEL_DIR
from genius.store.manifest import Manifest
from genius.store.merge import MergeConfig, merge_id_tables
from genius.store.model_files import load_model, save_model
from genius.store.publish import VersionWriter
from genius.store.reader import open_version
from genius.store.vector_shards import VectorShards
from genius.trie import Trie

log = logging.getLogger(__name__)

RERANK_SOURCES = ("vectors", "codes")


# At 12 x 256 on full-pool WordNet (117k items), widths 256/400/200 keep the target's prefix
# after levels 1-3 for 100/72/40 % of queries against 94/40/27 % with the beam of 50 throughout
# (R@10 0.214 -> 0.234), for 2.3x the search time (bench/results/peers-genius-12x256-lw.md).
# Smaller corpora gain as much: WordNet 2k R@5/10 0.569/0.603 -> 0.607/0.653, 10k 0.372/0.439 ->
# 0.409/0.483 (peers-curve-widths.md), Openclipart image -> text 0.076/0.112 -> 0.080/0.115
# (peers-openclipart-widths.md), for ~1.6x the time of one query. Below WIDE_BEAM_CORPUS the
# levels hold few prefixes and it is unmeasured.
WIDE_BEAM_CORPUS = 2_000
WIDE_BEAM_WIDTHS = (256, 400, 200)


@dataclass
class IndexConfig:
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    decoder_training: DecoderTrainConfig = field(default_factory=DecoderTrainConfig)
    beam_size: int = 50  # the paper's beam
    # Weight of the quantizer's own score (projected query . an ID's code vectors, summed)
    # beside the decoder's log-probabilities in the beam; 0: the decoder alone (the paper).
    # It is 1/temperature of those inner products, which the quantizer's contrastive loss
    # trains as logits at temperature 0.01. Full-pool WordNet, beam 50: R@10 0.127 with 0,
    # 0.190 with 100 at 5 x 256 (bench/results/peers.md); 0.234 with 100 and 0.251 with 300
    # at 12 x 256 with the level widths below (peers-genius-12x256-lw.md), 0.276 with the
    # lookahead too (peers-genius-12x256-la.md).
    codebook_weight: float = 300.0
    # With the codes scoring the beam, the modalities the decoder gives less than this are
    # not searched: the codes' scores do not compare across modalities where a query lies
    # nearer its own (tests/genius/test_evaluation.py's universal pool: text -> image GENIUS+R
    # recall@1 0.43 with 0, 1.0 with 0.02), and the decoder reads the instruction. Small,
    # because a decoder that cannot know the target's modality is still sure of one (the
    # generated corpus: R@10 0.95 with 0, 0.92 with 0.02, 0.70 with 0.2).
    min_modality_prob: float = 0.02
    # False when fit found that the codes rank its training targets far worse than the
    # unquantized projection (genius.codes_check): then the config's codebook weight is not
    # applied (a weight passed to a search still is).
    codes_usable: bool = True
    # Beam widths of the first semantic levels (then beam_size; empty: beam_size throughout):
    # the first codes' scores cannot yet tell the target's prefix from its neighbours'.
    # for_corpus sets WIDE_BEAM_WIDTHS from WIDE_BEAM_CORPUS items.
    level_widths: list[int] = field(default_factory=list)
    # With the codes scoring the beam, prune each level by score plus an estimate of a
    # prefix's best completion read from up to this many of its items' codes, among the
    # lookahead_pool x width best by score (beam_search's best_completion); 0: by score alone.
    lookahead_rows: int = 4
    lookahead_pool: int = 4
    ranges_per_modality: int = 1  # trie partitions per modality (by first semantic code)
    store_vectors: bool = True  # keep item embeddings (fp16) for re-ranking
    query_batch: int = 32  # queries decoded together
    items_per_file: int = data_files.DEFAULT_ITEMS_PER_FILE  # rows per item table / vector shard file
    device: str = "cpu"

    @classmethod
    def paper(cls) -> "IndexConfig":
        """Paper size: 8 x 4096 codes, t5-small decoder, 31 epochs (GPU work)."""
        return cls()

    @classmethod
    def for_corpus(cls, num_items: int, **quantizer_overrides) -> "IndexConfig":
        """A CPU-sized config: codebooks sized to the corpus and a small decoder; from
        WIDE_BEAM_CORPUS items, a beam widened at the first levels (WIDE_BEAM_WIDTHS)."""
        return cls(
            quantizer=QuantizerConfig.for_corpus(num_items, **quantizer_overrides),
            decoder=DecoderConfig.small(),
            decoder_training=DecoderTrainConfig(epochs=30, batch_size=128, lr=2e-3),
            level_widths=list(WIDE_BEAM_WIDTHS) if num_items >= WIDE_BEAM_CORPUS else [],
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IndexConfig":
        # Configs saved before the codebook-scored beam, the level widths or the lookahead
        # existed searched without them: they keep doing so when loaded, whatever the defaults.
        kwargs: dict = {name: value for name, value in (("codebook_weight", 0.0), ("level_widths", []),
                                                        ("lookahead_rows", 0))
                        if name not in data}
        for f in fields(cls):
            value = data.get(f.name)
            if value is None:
                continue
            default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
            kwargs[f.name] = type(default)(**value) if is_dataclass(default) else value
        return cls(**kwargs)


@dataclass(frozen=True)
class BeamSettings:
    """How one search's beam is scored and pruned (IndexConfig's fields of the same names,
    which a search may override): GeniusIndex.beam_settings resolves them."""

    codebook_weight: float
    level_widths: tuple[int, ...]
    lookahead_rows: int
    lookahead_pool: int
    min_modality_prob: float
    skip_forced: bool = True  # beam_search's: same results; False only to time the difference
    # beam_search's: "allowed" renormalises each level's log-probabilities over the codes the trie
    # allows there (the default); "level" keeps the softmax over the whole level (an ablation)
    normalize: str = "allowed"


@dataclass
class SearchResult:
    items: np.ndarray  # (Q, k) item numbers, -1 where fewer than k were found
    scores: np.ndarray  # (Q, k)
    keys: list[list[str]]  # the items' keys, per query
    modalities: list[list[Modality]] = field(default_factory=list)  # the items' stored modalities

    def as_lists(self) -> list[list[int]]:
        return [[int(i) for i in row if i >= 0] for row in self.items]


class GeniusIndex:
    """Model (quantizer, decoder, optional encoder) plus data (trie, item tables, vectors).

    `items` holds key, modality, ID, source and metadata by item number; `vectors` the fp16
    re-ranking vectors (or None); `deleted` the sorted item numbers removed since the data
    was built (search skips them). `path` is the version folder it was loaded from or saved to.
    """

    def __init__(
        self,
        config: IndexConfig,
        quantizer: ModalResidualQuantizer,
        decoder: GeniusDecoder,
        trie: Trie,
        items: ItemTables,
        vectors: VectorShards | None = None,
        encoder=None,
        deleted: np.ndarray | None = None,
        path: Path | None = None,
    ):
        self.config = config
        self.quantizer = quantizer.eval()
        self.decoder = decoder.eval()
        self.trie = trie
        self.items = items
        self.vectors = vectors
        self.encoder = encoder
        self.deleted = np.zeros(0, dtype=np.int64) if deleted is None else np.asarray(deleted, dtype=np.int64)
        self.path = path
        self.decode_precision = "fp32"
        self._search_decoder = self.decoder

    def set_decode_precision(self, precision: str) -> "GeniusIndex":
        """Search with the decoder in `precision` ("fp32", "bf16", "int8"; a converted copy, the
        stored weights stay fp32). A precision this CPU or torch build cannot run is a ValueError
        saying why."""
        from genius.decoder_precision import PRECISIONS, precision_support, with_precision

        if precision not in PRECISIONS:
            raise ValueError(f"unknown decode precision {precision!r}: choose from {', '.join(PRECISIONS)}")
        ok, why = precision_support(precision)
        if not ok:
            raise ValueError(f"decode precision {precision} is not available here: {why}")
        self._search_decoder = with_precision(self.decoder, precision)
        self.decode_precision = precision
        return self

    def __len__(self) -> int:
        """Live items (deleted ones not counted)."""
        return self.items.num_items - len(self.deleted)

    @property
    def codec(self) -> IdCodec:
        return self.trie.codec

    @property
    def root(self) -> Path | None:
        """The index folder (holding CURRENT) this index was loaded from or saved to."""
        return None if self.path is None else self.path.parent

    def item_codes(self, items: np.ndarray) -> np.ndarray:
        """(n, 1+L) codes of these items: code 0 (the modality, or 0 without the modality
        code), then the semantic codes unpacked from the stored IDs."""
        items = np.asarray(items, dtype=np.int64)
        code0 = self.items.modality(items) if self.quantizer.use_modality_code else np.zeros(len(items), np.int64)
        return np.concatenate([code0[:, None], self.codec.unpack(self.items.ids(items))], axis=1)

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
        """Train quantizer and decoder on (queries[i] -> corpus[targets[i]]) and index `corpus`.

        Item numbers are positions in `corpus`; keys must be unique."""
        config = config or IndexConfig.for_corpus(len(corpus))
        targets = np.asarray(targets, dtype=np.int64)
        if len(targets) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(targets)} targets")
        if len(targets) and (targets.min() < 0 or targets.max() >= len(corpus)):
            raise ValueError(f"targets must index the corpus (0..{len(corpus) - 1})")
        keys = list(corpus.keys) if corpus.keys is not None else [str(i) for i in range(len(corpus))]
        check_unique_keys(keys)
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
        if config.codebook_weight and len(targets):
            check = check_codes(quantizer, query_emb, item_emb, item_codes, targets, seed=qcfg.seed)
            log.info("codes check: training targets' recall@10 among %d items %.3f by the codes, %.3f unquantized",
                     check.candidates, check.codes_recall, check.projected_recall)
            if not check.codes_usable:
                log.warning("the codes keep %.0f %% of the unquantized recall@10 (under %.0f %%): the beam is scored "
                            "by the decoder alone unless a search asks for a codebook weight", 100 * check.ratio,
                            100 * MIN_CODES_RECALL_RATIO)
                config = replace(config, codes_usable=False)
        log.info("stage 3: decoder on %d pairs (+%d items)", len(targets),
                 len(corpus) if config.decoder_training.index_task else 0)
        decoder = GeniusDecoder(config.decoder, dim, qcfg.num_levels, qcfg.codebook_size).to(config.device)
        decoder.init_token_embeddings(quantizer.codebooks.detach().cpu(), _modality_means(item_emb, corpus.modality, dim))
        train_decoder(
            decoder, torch.from_numpy(query_emb), torch.from_numpy(item_emb[targets]),
            torch.from_numpy(item_codes[targets]), config.decoder_training,
            item_emb=torch.from_numpy(item_emb), item_codes=torch.from_numpy(item_codes), progress=progress,
        )
        return cls.from_codes(config, quantizer, decoder, item_codes, corpus.modality, keys,
                              item_emb if config.store_vectors else None, encoder)

    @classmethod
    def from_codes(
        cls,
        config: IndexConfig,
        quantizer: ModalResidualQuantizer,
        decoder: GeniusDecoder,
        item_codes: np.ndarray,
        modality: np.ndarray,
        keys: Sequence[str],
        vectors: np.ndarray | None = None,
        encoder=None,
        source: Sequence[str | None] | None = None,
        metadata: Sequence[str | None] | None = None,
    ) -> "GeniusIndex":
        """An in-memory index of items with known codes (N, 1+L); item numbers 0..N-1."""
        codec = IdCodec(quantizer.num_levels, quantizer.codebook_size)
        ids = codec.pack(item_codes[:, 1:])
        trie = Trie.build(codec, ids, item_codes[:, 0], ranges_per_modality=config.ranges_per_modality)
        log.info("trie: %d items, %.1f bytes/item", len(trie), trie.bytes_per_item())
        items = ItemTables.in_memory(make_table(keys, np.asarray(modality), ids, source, metadata))
        stored = None if vectors is None else VectorShards.in_memory(vectors)
        return cls(config, quantizer, decoder, trie, items, stored, encoder)

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
        codebook_weight: float | None = None,
        level_widths: Sequence[int] | None = None,
        lookahead_rows: int | None = None,
    ) -> SearchResult:
        """Top-k items per query.

        rerank: score the beam's items by cosine similarity with the query, using the stored
        item vectors (rerank_with="vectors") or vectors rebuilt from the IDs ("codes").
        target_modalities: restrict results to these modalities (all queries, or one set
        each), by the items' stored modality; with the modality code the beam search is
        restricted to them from its first step. codebook_weight: the beam's weight of the
        codes' own score (default: config.codebook_weight). level_widths: the beam's widths
        at the first levels (default: config.level_widths). lookahead_rows: rows read to
        estimate a prefix's best completion (default: config.lookahead_rows).
        """
        if rerank_with not in RERANK_SOURCES:
            raise ValueError(f"rerank_with must be one of {RERANK_SOURCES}, got {rerank_with!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        beam_size = beam_size or self.config.beam_size
        query_emb = self._check_queries(self.embed(queries))
        all_items, all_scores = [], []
        settings = self.beam_settings(codebook_weight, level_widths, lookahead_rows)
        for chunk, beams, wanted in self._beam_search(query_emb, beam_size, target_modalities, settings):
            ranking = self._rank(beams, chunk, k, rerank, rerank_with, wanted)
            all_items.append(ranking.items)
            all_scores.append(ranking.scores)
        items = np.concatenate(all_items) if all_items else np.zeros((0, k), dtype=np.int64)
        scores = np.concatenate(all_scores) if all_scores else np.zeros((0, k))
        found = items[items >= 0]
        keys = iter(self.items.keys(found))
        modalities = iter(self.items.modality(found).tolist())
        per_row = [int((row >= 0).sum()) for row in items]
        return SearchResult(items, scores, [[next(keys) for _ in range(n)] for n in per_row],
                            [[Modality(next(modalities)) for _ in range(n)] for n in per_row])

    @torch.no_grad()
    def candidates(self, query_emb: np.ndarray, beam_size: int | None = None,
                   target_modalities: Collection | Sequence[Collection] | None = None,
                   codebook_weight: float | None = None, level_widths: Sequence[int] | None = None,
                   lookahead_rows: int | None = None,
                   skip_forced: bool = True, normalize: str = "allowed") -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query embedding: the items its beam search found that pass the filters (not
        deleted, of a wanted modality), in beam order, with their beam log-probabilities. The
        first half of `search`, for callers that score the items elsewhere (the serving
        replica scatters them to shard servers)."""
        query_emb = self._check_queries(self.embed(query_emb))
        out = []
        settings = self.beam_settings(codebook_weight, level_widths, lookahead_rows, skip_forced, normalize)
        for _, beams, wanted in self._beam_search(query_emb, beam_size or self.config.beam_size, target_modalities,
                                                  settings):
            keep = self.item_filter(wanted)
            out.extend(candidates(beams, q, keep) for q in range(len(beams.items)))
        return out

    def _check_queries(self, query_emb: np.ndarray) -> np.ndarray:
        if query_emb.ndim != 2 or query_emb.shape[1] != self.decoder.embed_dim:
            raise ValueError(f"query embeddings have shape {query_emb.shape}, index expects dim {self.decoder.embed_dim}")
        return query_emb

    def _beam_search(self, query_emb: np.ndarray, beam_size: int, target_modalities, settings: BeamSettings):
        """(query chunk, its beams, its wanted-modality rows or None) per chunk of config.query_batch."""
        per_query = per_query_modalities(target_modalities, len(query_emb))
        wanted = None if per_query is None else _modality_rows(per_query)
        device = self.config.device
        for start in range(0, len(query_emb), self.config.query_batch):
            chunk = torch.from_numpy(query_emb[start : start + self.config.query_batch]).to(device)
            chunk_wanted = None if wanted is None else wanted[start : start + len(chunk)]
            first_step = None
            if chunk_wanted is not None and self.quantizer.use_modality_code:
                first_step = [np.flatnonzero(row).tolist() for row in chunk_wanted]
            beams = self.beam(chunk, beam_size, first_step, settings)
            yield chunk, beams, chunk_wanted

    def beam(self, query_emb: torch.Tensor, beam_size: int, target_modalities=None,
             settings: BeamSettings | None = None, trace: list | None = None):
        """The trie-constrained beam search of one chunk of query embeddings, scored by the
        decoder and, with a codebook weight, by the codes (settings: the config's unless
        given). `trace`: a list that receives each step's prefixes (beam_search's)."""
        settings = settings or self.beam_settings()
        weight = settings.codebook_weight
        scores = self.quantizer.code_scores(query_emb) if weight else None
        return beam_search(self._search_decoder, self.trie, query_emb, beam_size, target_modalities,
                           codebook_scores=scores, codebook_weight=weight, trace=trace,
                           level_widths=settings.level_widths, min_modality_prob=settings.min_modality_prob,
                           lookahead_rows=settings.lookahead_rows, lookahead_pool=settings.lookahead_pool,
                           skip_forced=settings.skip_forced, normalize=settings.normalize)

    def beam_settings(self, codebook_weight: float | None = None, level_widths: Sequence[int] | None = None,
                      lookahead_rows: int | None = None, skip_forced: bool = True,
                      normalize: str = "allowed") -> BeamSettings:
        """The beam's settings: the config's, each overridden where given. The config's codebook
        weight applies only where fit found the codes usable (a weight given always does)."""
        config = self.config
        if codebook_weight is None:
            codebook_weight = config.codebook_weight if config.codes_usable else 0.0
        return BeamSettings(
            codebook_weight=float(codebook_weight),
            level_widths=tuple(config.level_widths if level_widths is None else level_widths),
            lookahead_rows=config.lookahead_rows if lookahead_rows is None else lookahead_rows,
            lookahead_pool=config.lookahead_pool,
            min_modality_prob=config.min_modality_prob,
            skip_forced=skip_forced,
            normalize=normalize,
        )

    def item_filter(self, wanted: np.ndarray | None):
        """The filter of a beam's items: not deleted, and of a wanted modality when asked."""
        if wanted is None and len(self.deleted) == 0:
            return None

        def keep(query: int, items: np.ndarray) -> np.ndarray:
            mask = np.ones(len(items), dtype=bool)
            if len(self.deleted):
                position = np.searchsorted(self.deleted, items)
                mask &= self.deleted[np.minimum(position, len(self.deleted) - 1)] != items
            if wanted is not None:
                mask &= wanted[query][self.items.modality(items)]
            return mask
        return keep

    def _rank(self, beams, query: torch.Tensor, k: int, rerank: bool, rerank_with: str,
              wanted: np.ndarray | None) -> Ranking:
        keep = self.item_filter(wanted)
        if not rerank:
            return rank(beams, k, keep=keep)
        if rerank_with == "vectors" and self.vectors is not None:
            vectors = self.vectors
            return rank(beams, k, query.cpu().numpy(), lambda items: vectors[items].astype(np.float32), keep=keep)
        # Rebuilt vectors live in the quantizer's projected space: compare the projected query.
        return rank(beams, k, self.projected_queries(query), self.rebuilt_vectors, keep=keep)

    def projected_queries(self, query_emb: torch.Tensor) -> np.ndarray:
        """Query embeddings in the quantizer's projected space, where `rebuilt_vectors` live."""
        return self.quantizer.project(query_emb).cpu().numpy()

    def rebuilt_vectors(self, items: np.ndarray) -> np.ndarray:
        """The items' vectors rebuilt from their IDs (the codes' reconstruction, projected space)."""
        return self.quantizer.decode(torch.from_numpy(self.item_codes(items))).cpu().numpy()

    # ------------------------------------------------------------------ storage
    def save(self, directory: str | os.PathLike) -> Path:
        """Publish this index as a new version of the index folder `directory` (created if
        needed); returns the version folder. Earlier versions stay until `gc`."""
        per_file = self.config.items_per_file
        with VersionWriter(directory) as writer:
            save_model(writer.path / MODEL_DIR, self.quantizer, self.decoder, self.encoder)
            partitions = data_files.write_trie(writer.path, self.trie)
            item_tables = data_files.write_item_tables(writer.path, self.items, per_file)
            vector_shards = [] if self.vectors is None else data_files.write_vector_shards(writer.path, self.vectors, per_file)
            manifest = Manifest(
                version=-1, parent=None, config=self.config.to_dict(), embed_dim=self.decoder.embed_dim,
                **data_files.codec_fields(self.codec), num_items=self.items.num_items, num_deleted=len(self.deleted),
                modality_counts=data_files.modality_counts(self.items, self.deleted), partitions=partitions,
                item_tables=item_tables, vector_shards=vector_shards,
                deletes=data_files.write_deletes(writer.path, self.deleted), has_encoder=self.encoder is not None,
            )
            self.path = writer.publish(manifest)
        return self.path

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu", mmap: bool = True,
             verify: bool = False) -> "GeniusIndex":
        """Open INDEX (the version its CURRENT names) or one version folder INDEX/v-<n>.

        O(files): the trie, item tables and vectors are memory-mapped, nothing per item is
        read. A missing or truncated file, or an index of another format, raises
        genius.store.IndexFormatError naming the file; verify=True also checks every
        file's sha256 (reads the whole index)."""
        version = open_version(directory, mmap=mmap, verify=verify)
        manifest = version.manifest
        config = IndexConfig.from_dict(manifest.config)
        config.device = device
        quantizer, decoder, encoder = load_model(version.path / MODEL_DIR, config.quantizer, config.decoder,
                                                 manifest.embed_dim, manifest.has_encoder, device)
        return cls(config, quantizer, decoder, version.trie, version.items, version.vectors, encoder,
                   version.deleted, version.path)

    # ------------------------------------------------------------------ updates
    def add(self, items: Items, source: Sequence[str | None] | None = None,
            metadata: Sequence[str | None] | None = None) -> "GeniusIndex":
        """Quantize new items with this index's codebooks, publish a version holding them too,
        and return the index of that version (this object keeps serving its own)."""
        root = self._saved_root("add")
        emb = embed_items(items, self.encoder)
        if emb.shape[1] != self.decoder.embed_dim:
            raise ValueError(f"new items have dim {emb.shape[1]}, the index expects {self.decoder.embed_dim}")
        codes = self.quantizer.encode(emb, items.modality).cpu().numpy()
        keys = list(items.keys) if items.keys is not None else None
        if keys is None:
            raise ValueError("new items need keys (Items(keys=...)): keys identify items for delete")
        vectors = emb.astype(np.float16) if self.vectors is not None else None
        update.add_items(root, keys, items.modality, self.codec.pack(codes[:, 1:]), vectors, source, metadata)
        return type(self).load(root, device=self.config.device)

    def delete(self, keys: Sequence[str], missing_ok: bool = False) -> "GeniusIndex":
        """Publish a version without the items of these keys; return its index."""
        root = self._saved_root("delete")
        update.delete_keys(root, keys, missing_ok=missing_ok)
        return type(self).load(root, device=self.config.device)

    def compact(self) -> "GeniusIndex":
        """Publish a version with deleted items dropped and the rest renumbered; return its index."""
        root = self._saved_root("compact")
        update.compact(root)
        return type(self).load(root, device=self.config.device)

    def _saved_root(self, what: str) -> Path:
        if self.root is None:
            raise ValueError(f"{what} updates a saved index: call save(directory) first")
        return self.root

    def reload(self) -> "GeniusIndex":
        """The index as CURRENT now names it (the same model files are reread)."""
        if self.root is None:
            raise ValueError("this index has not been saved: nothing to reload")
        return type(self).load(self.root, device=self.config.device)


def publish_merged(
    root: str | os.PathLike,
    id_tables: Sequence[str | os.PathLike],
    config: IndexConfig,
    quantizer: ModalResidualQuantizer,
    decoder: GeniusDecoder,
    encoder=None,
    work_dir: str | os.PathLike | None = None,
) -> Path:
    """Merge per-shard ID tables (genius.store.merge) and publish them with this model as a new
    version of `root`; the local form of what a cluster build's coordinator does."""
    import tempfile

    merge_config = MergeConfig(quantizer.num_levels, quantizer.codebook_size, config.ranges_per_modality,
                               quantizer.use_modality_code, config.items_per_file)
    with VersionWriter(root) as writer, tempfile.TemporaryDirectory(dir=work_dir, prefix="genius-merge-") as work:
        save_model(writer.path / MODEL_DIR, quantizer, decoder, encoder)
        merged = merge_id_tables(id_tables, merge_config, writer.path, work)
        if merged.vector_dim is not None and merged.vector_dim != decoder.embed_dim:
            raise ValueError(f"ID tables carry vectors of dim {merged.vector_dim}, the model embeds {decoder.embed_dim}")
        manifest = Manifest(
            version=-1, parent=None, config=config.to_dict(), embed_dim=decoder.embed_dim,
            **data_files.codec_fields(merge_config.codec), num_items=merged.num_items, num_deleted=0,
            modality_counts=merged.modality_counts, partitions=merged.partitions, item_tables=merged.item_tables,
            vector_shards=merged.vector_shards, deletes=None, has_encoder=encoder is not None,
        )
        return writer.publish(manifest)


def check_unique_keys(keys: Sequence[str]) -> None:
    """Keys identify items: a repeated key is an error naming both rows."""
    first: dict[str, int] = {}
    for row, key in enumerate(keys):
        if key in first:
            raise ValueError(f"duplicate key {key!r}: rows {first[key]} and {row}")
        first[key] = row


def _modality_rows(per_query: list[Collection]) -> np.ndarray:
    """(Q, 3) bool: the modalities each query asks for."""
    out = np.zeros((len(per_query), NUM_MODALITIES), dtype=bool)
    for q, row in enumerate(per_query):
        for m in row:
            out[q, int(Modality.parse(m))] = True
    return out


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
