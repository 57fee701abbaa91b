"""The model of a version: quantizer.pt, decoder.pt and, when stored, the encoder folder."""
from __future__ import annotations

from pathlib import Path

import torch

from genius.atomic import write_atomic
from genius.decoder import DecoderConfig, GeniusDecoder
from genius.quantizer import ModalResidualQuantizer, QuantizerConfig
from genius.store.layout import IndexFormatError

QUANTIZER = "quantizer.pt"
DECODER = "decoder.pt"
ENCODER = "encoder"


def save_model(model_dir: Path, quantizer: ModalResidualQuantizer, decoder: GeniusDecoder, encoder=None) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(model_dir / QUANTIZER, lambda f: torch.save(quantizer.state_dict(), f))
    write_atomic(model_dir / DECODER, lambda f: torch.save(decoder.state_dict(), f))
    if encoder is not None:
        encoder.save(model_dir / ENCODER)


def _load_state(module, path: Path, device: str) -> None:
    try:
        module.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: missing") from None
    except (RuntimeError, EOFError, ValueError, KeyError) as exc:
        raise IndexFormatError(f"{path}: damaged or of another model shape ({str(exc).splitlines()[0]})") from None


def load_quantizer(model_dir: Path, config: QuantizerConfig, embed_dim: int, device: str = "cpu") -> ModalResidualQuantizer:
    quantizer = ModalResidualQuantizer.from_config(embed_dim, config)
    _load_state(quantizer, Path(model_dir) / QUANTIZER, device)
    return quantizer.to(device).eval()


def load_decoder(model_dir: Path, config: DecoderConfig, embed_dim: int, num_levels: int, codebook_size: int,
                 device: str = "cpu") -> GeniusDecoder:
    decoder = GeniusDecoder(config, embed_dim, num_levels, codebook_size)
    _load_state(decoder, Path(model_dir) / DECODER, device)
    return decoder.to(device).eval()


def load_model(model_dir: Path, quantizer_config: QuantizerConfig, decoder_config: DecoderConfig, embed_dim: int,
               has_encoder: bool, device: str = "cpu"):
    """(quantizer, decoder, encoder or None) on `device`, in eval mode."""
    quantizer = load_quantizer(model_dir, quantizer_config, embed_dim, device)
    decoder = load_decoder(model_dir, decoder_config, embed_dim, quantizer_config.num_levels,
                           quantizer_config.codebook_size, device)
    encoder = None
    if has_encoder:
        from genius.encoders import MultimodalEncoder

        encoder = MultimodalEncoder.load(model_dir / ENCODER)
    return quantizer, decoder, encoder
