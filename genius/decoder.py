"""The GENIUS ID decoder: a T5-shaped decoder (no encoder layers) over query prefix vectors.

The query embedding is projected to P prefix vectors that the decoder cross-attends to, as
in the reference code. The vocabulary holds one token set per level:

    token 0               decoder start (T5's pad)
    tokens 1..3           code 0, the modality
    4 + (l-1)*K + c       code c of semantic level l (1..L)

The math is T5's (RMS layer norm, unscaled attention, relative position bias in the
first self-attention layer shared by all layers, ReLU feed-forward), so the weights load
into transformers' T5 for comparison (`to_hf_t5`). It is written out here so that beam
search can keep its own KV cache and compute logits for the current level's tokens only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genius.modality import NUM_MODALITIES

START_TOKEN = 0
MODALITY_TOKEN_OFFSET = 1
CODE_TOKEN_OFFSET = 1 + NUM_MODALITIES


@dataclass
class DecoderConfig:
    """Shape of the decoder. Defaults are t5-small's decoder (paper size)."""

    d_model: int = 512
    num_layers: int = 6
    num_heads: int = 8
    d_kv: int = 64
    d_ff: int = 2048
    dropout: float = 0.1
    prefix_len: int = 30  # P: prefix vectors made from the query embedding
    relative_buckets: int = 32
    relative_max_distance: int = 128
    layer_norm_eps: float = 1e-6

    @classmethod
    def small(cls) -> "DecoderConfig":
        """A CPU-sized decoder that trains in minutes on small corpora."""
        return cls(d_model=128, num_layers=2, num_heads=4, d_kv=32, d_ff=512, prefix_len=4, dropout=0.1)

    @classmethod
    def medium(cls) -> "DecoderConfig":
        """Between small and t5-small (~4x small's cost per step): for larger CPU corpora
        with fine-grained targets (instance-level retrieval)."""
        return cls(d_model=256, num_layers=4, num_heads=4, d_kv=64, d_ff=1024, prefix_len=8, dropout=0.1)

    @classmethod
    def named(cls, name: str) -> "DecoderConfig":
        """'small', 'medium' or 'paper' (t5-small)."""
        sizes = {"small": cls.small, "medium": cls.medium, "paper": cls}
        if name not in sizes:
            raise ValueError(f"unknown decoder size {name!r}: choose from {sorted(sizes)}")
        return sizes[name]()


def level_token_offset(level: int, codebook_size: int) -> int:
    """First token id of step `level` (0 = modality, l >= 1 = semantic level l)."""
    return MODALITY_TOKEN_OFFSET if level == 0 else CODE_TOKEN_OFFSET + (level - 1) * codebook_size


def codes_to_tokens(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(N, 1+L) codes (modality first) -> (N, 1+L) token ids."""
    offsets = torch.tensor(
        [level_token_offset(l, codebook_size) for l in range(codes.shape[1])], device=codes.device
    )
    return codes + offsets


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's unidirectional bucketing (memory position - query position)."""
    distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (
        torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return torch.where(is_small, distance, large)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same math as T5LayerNorm (no mean subtraction, no bias), fused.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.h, self.dk = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., T, h*dk) -> (..., h, T, dk)"""
        return x.unflatten(-1, (self.h, self.dk)).transpose(-3, -2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(x.transpose(-3, -2).flatten(-2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.cross_attn = Attention(cfg)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(F.relu(self.wi(self.ff_norm(x)))))


class DecoderCache:
    """KV cache of a beam search over Q queries with W beams each.

    Self-attention keys/values are (Q*W, h, t, dk), beams of a query contiguous.
    Cross-attention keys/values are computed once per query, (Q, h, P, dk), and shared by
    its beams: the beams are the rows of one matmul per query and head, never copied.
    """

    def __init__(self, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor]):
        self.cross_k, self.cross_v = cross_k, cross_v
        self.self_k: list[torch.Tensor | None] = [None] * len(cross_k)
        self.self_v: list[torch.Tensor | None] = [None] * len(cross_k)

    @property
    def length(self) -> int:
        return 0 if self.self_k[0] is None else self.self_k[0].shape[-2]

    def reorder(self, parent: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Keep, for each (query, new slot), the cache of beam `parent[q, slot]` of that query.
        queries: positions of the queries kept, ascending (the others' decoding is over; parent
        has a row per kept query); all by default."""
        Q_old = self.cross_k[0].shape[0]
        W_old = self.self_k[0].shape[0] // Q_old
        if queries is None:
            queries = torch.arange(Q_old, device=parent.device)
        else:
            self.cross_k = [k.index_select(0, queries) for k in self.cross_k]
            self.cross_v = [v.index_select(0, queries) for v in self.cross_v]
        if len(queries) != len(parent):
            raise ValueError(f"{len(parent)} rows of parents for {len(queries)} queries")
        flat = (queries[:, None] * W_old + parent).reshape(-1)
        for i in range(len(self.self_k)):
            self.self_k[i] = self.self_k[i].index_select(0, flat)
            self.self_v[i] = self.self_v[i].index_select(0, flat)


class GeniusDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, embed_dim: int, num_levels: int, codebook_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed_dim, self.num_levels, self.codebook_size = embed_dim, num_levels, codebook_size
        self.vocab_size = CODE_TOKEN_OFFSET + num_levels * codebook_size
        self.prefix_proj = nn.Linear(embed_dim, cfg.d_model * cfg.prefix_len)
        self.embed = nn.Embedding(self.vocab_size, cfg.d_model)
        self.relative_bias = nn.Embedding(cfg.relative_buckets, cfg.num_heads)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, self.vocab_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        # T5's initialisation (Mesh TensorFlow), so that training behaves like t5-small's.
        d, dk, h = self.cfg.d_model, self.cfg.d_kv, self.cfg.num_heads
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=d**-0.5)
        nn.init.normal_(self.relative_bias.weight, std=d**-0.5)
        for layer in self.layers:
            for attn in (layer.self_attn, layer.cross_attn):
                nn.init.normal_(attn.q.weight, std=(d * dk) ** -0.5)
                nn.init.normal_(attn.k.weight, std=d**-0.5)
                nn.init.normal_(attn.v.weight, std=d**-0.5)
                nn.init.normal_(attn.o.weight, std=(h * dk) ** -0.5)
            nn.init.normal_(layer.wi.weight, std=d**-0.5)
            nn.init.normal_(layer.wo.weight, std=self.cfg.d_ff**-0.5)

    # ------------------------------------------------------------ building blocks
    def prefix(self, query_emb: torch.Tensor) -> torch.Tensor:
        """(Q, D) query embeddings -> (Q, P, d_model) prefix vectors."""
        return self.prefix_proj(query_emb).view(len(query_emb), self.cfg.prefix_len, self.cfg.d_model)

    def position_bias(self, q_len: int, k_len: int, q_start: int = 0) -> torch.Tensor:
        """(h, q_len, k_len) relative position bias for queries at positions q_start.."""
        device = self.relative_bias.weight.device
        q_pos = torch.arange(q_start, q_start + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.cfg.relative_buckets, self.cfg.relative_max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1)

    def level_weight(self, level: int) -> torch.Tensor:
        """Output-embedding rows of the tokens of step `level`: (3 or K, d_model)."""
        start = level_token_offset(level, self.codebook_size)
        size = NUM_MODALITIES if level == 0 else self.codebook_size
        return self.lm_head.weight[start : start + size]

    # ------------------------------------------------------------ training path
    def forward(self, query_emb: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced logits per step, each over that step's tokens only.

        codes: (N, 1+L) target codes (modality first). Returns [ (N, 3), (N, K) x L ].
        """
        N, steps = codes.shape
        tokens = codes_to_tokens(codes, self.codebook_size)
        inputs = torch.cat([torch.full((N, 1), START_TOKEN, device=codes.device), tokens[:, :-1]], dim=1)
        hidden = self.hidden_states(self.prefix(query_emb), inputs)
        logits = [hidden[:, 0] @ self.level_weight(0).T]
        if steps > 1:
            w = self.lm_head.weight[CODE_TOKEN_OFFSET:].view(self.num_levels, self.codebook_size, -1)[: steps - 1]
            sem = torch.einsum("nld,lkd->nlk", hidden[:, 1:], w)
            logits.extend(sem.unbind(1))
        return logits

    def hidden_states(self, prefix: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Full causal pass: (N, P, d) prefix, (N, T) input tokens -> (N, T, d) final hidden."""
        T = inputs.shape[1]
        x = self.dropout(self.embed(inputs))
        causal = torch.full((T, T), float("-inf"), device=x.device).triu(1)
        bias = self.position_bias(T, T) + causal
        for layer in self.layers:
            h = layer.self_norm(x)
            a = layer.self_attn
            scores = a.split(a.q(h)) @ a.split(a.k(h)).transpose(-1, -2) + bias
            x = x + self.dropout(a.merge(self.dropout(scores.softmax(-1)) @ a.split(a.v(h))))
            h = layer.cross_norm(x)
            c = layer.cross_attn
            scores = c.split(c.q(h)) @ c.split(c.k(prefix)).transpose(-1, -2)
            x = x + self.dropout(c.merge(self.dropout(scores.softmax(-1)) @ c.split(c.v(prefix))))
            x = x + self.dropout(layer.feed_forward(x))
        return self.dropout(self.final_norm(x))

    # ------------------------------------------------------------ incremental path
    def start_cache(self, query_emb: torch.Tensor) -> DecoderCache:
        prefix = self.prefix(query_emb)
        ks, vs = [], []
        for layer in self.layers:
            c = layer.cross_attn
            ks.append(c.split(c.k(prefix)))  # (Q, h, P, dk)
            vs.append(c.split(c.v(prefix)))
        return DecoderCache(ks, vs)

    def step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """One decoding step for (Q, W) beams: input tokens (Q, W) -> final hidden (Q, W, d).

        Appends this step's self-attention keys and values to `cache`.
        """
        Q, W = tokens.shape
        h, dk = self.cfg.num_heads, self.cfg.d_kv
        t = cache.length
        x = self.embed(tokens.reshape(-1))  # (Q*W, d)
        bias = self.position_bias(1, t + 1, q_start=t)  # (h, 1, t+1)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            y = layer.self_norm(x)
            k_new = a.k(y).view(Q * W, h, 1, dk)
            v_new = a.v(y).view(Q * W, h, 1, dk)
            if cache.self_k[i] is None:
                cache.self_k[i], cache.self_v[i] = k_new, v_new
            else:
                cache.self_k[i] = torch.cat([cache.self_k[i], k_new], dim=2)
                cache.self_v[i] = torch.cat([cache.self_v[i], v_new], dim=2)
            q = a.q(y).view(Q * W, h, 1, dk)
            scores = q @ cache.self_k[i].transpose(-1, -2) + bias  # (Q*W, h, 1, t+1)
            x = x + a.o((scores.softmax(-1) @ cache.self_v[i]).reshape(Q * W, h * dk))
            c = layer.cross_attn
            y = layer.cross_norm(x)
            q = c.q(y).view(Q, W, h, dk).transpose(1, 2)  # (Q, h, W, dk): beams as rows
            attn = (q @ cache.cross_k[i].transpose(-1, -2)).softmax(-1) @ cache.cross_v[i]  # (Q, h, W, dk)
            x = x + c.o(attn.transpose(1, 2).reshape(Q * W, h * dk))
            x = x + layer.feed_forward(x)
        return self.final_norm(x).view(Q, W, -1)

    # ------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_token_embeddings(self, codebooks: torch.Tensor, modality_means: torch.Tensor | None = None) -> None:
        """Initialise code token embeddings from the quantizer's codebooks.

        codebooks: (L, K, D) semantic codebooks; modality_means: (3, D). A fixed random
        orthogonal map takes D to d_model; rows are rescaled to T5's embedding scale.
        """
        L, K, D = codebooks.shape
        if (L, K) != (self.num_levels, self.codebook_size):
            raise ValueError(f"codebooks have shape {(L, K)}, decoder expects {(self.num_levels, self.codebook_size)}")
        gen = torch.Generator().manual_seed(0)
        proj = torch.empty(D, self.cfg.d_model)
        nn.init.orthogonal_(proj, generator=gen)
        def scaled(v: torch.Tensor) -> torch.Tensor:
            e = v.float().cpu() @ proj
            return e / e.std().clamp(min=1e-6)  # T5 embeddings have unit std
        w = self.embed.weight
        w[CODE_TOKEN_OFFSET:] = scaled(codebooks.reshape(L * K, D)).to(w)
        if modality_means is not None:
            w[MODALITY_TOKEN_OFFSET:CODE_TOKEN_OFFSET] = scaled(modality_means).to(w)

    def describe(self) -> dict:
        return {"decoder": asdict(self.cfg), "embed_dim": self.embed_dim, "num_levels": self.num_levels,
                "codebook_size": self.codebook_size}
