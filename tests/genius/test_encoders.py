"""MultimodalEncoder: the offline MiniLM + small-CNN default and the generic open_clip path."""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub in tests

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genius.encoders import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EncoderConfig,
    MultimodalEncoder,
    decode_image_bytes,
    load_image,
)
from genius.errors import GeniusError, InvalidInputError


@pytest.fixture(scope="module")
def encoder() -> MultimodalEncoder:
    torch.manual_seed(0)
    return MultimodalEncoder.from_config(EncoderConfig(batch_size=4))


def _image(seed: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    """A smooth synthetic RGB picture (JPEG keeps it close to the original)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.15, 2).tolist() + [rng.uniform(0, 6.3)]
        channels.append(127.5 + 127.5 * np.sin(fx * xx + fy * yy + phase))
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _unit(t: torch.Tensor) -> bool:
    return bool(torch.allclose(t.norm(dim=-1), torch.ones(len(t)), atol=1e-5))


def _train_a_little(model: MultimodalEncoder) -> None:
    """Move the trainable weights off their initial values, as stage-1 training would."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in list(model.image_tower.parameters()) + list(model.fusion.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# --------------------------------------------------------------------------- shapes, norms


def test_shapes_dtype_and_unit_norm(encoder: MultimodalEncoder) -> None:
    d = encoder.embed_dim
    assert d == 384  # MiniLM's width: no projection on the locked text tower
    texts = ["a red bicycle", "two cats on a sofa", "a bowl of soup", "a city at night", "snow"]
    images = [_image(i) for i in range(5)]
    for out in (encoder.encode_text(texts), encoder.encode_image(images), encoder.encode_pair(images, texts)):
        assert out.shape == (5, d)  # 5 records over batches of 4
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        assert not out.requires_grad
        assert _unit(out)
    assert encoder.encode_text([]).shape == (0, d)
    assert encoder.encode_image([]).shape == (0, d)


def test_generic_encode_dispatches(encoder: MultimodalEncoder) -> None:
    texts, images = ["a lighthouse"], [_image(3)]
    assert torch.equal(encoder.encode(texts=texts), encoder.encode_text(texts))
    assert torch.equal(encoder.encode(images=images), encoder.encode_image(images))
    assert torch.equal(encoder.encode(texts=texts, images=images), encoder.encode_pair(images, texts))
    with pytest.raises(InvalidInputError):
        encoder.encode()


def test_batching_does_not_change_results(encoder: MultimodalEncoder) -> None:
    texts = ["short", "a much longer sentence about a harbour full of fishing boats at dawn", "mid length text"]
    images = [_image(i) for i in range(3)]
    big = dataclasses.replace(encoder.cfg, batch_size=64)
    small_t, small_i = encoder.encode_text(texts), encoder.encode_image(images)
    encoder.cfg = big
    try:
        assert torch.allclose(encoder.encode_text(texts), small_t, atol=1e-5)
        assert torch.allclose(encoder.encode_image(images), small_i, atol=1e-5)
    finally:
        encoder.cfg = dataclasses.replace(big, batch_size=4)


def test_padding_trim_matches_full_context(encoder: MultimodalEncoder) -> None:
    """Cutting padding columns (a speed-up) leaves text embeddings unchanged."""
    texts = ["a dog", "a small brown dog running across a field"]
    trimmed = encoder.tokenize(texts)
    full = encoder.tokenizer(texts)
    assert trimmed.shape[1] < full.shape[1] == encoder.cfg.text_context_length
    with torch.no_grad():
        assert torch.allclose(encoder.embed_text(trimmed), encoder.embed_text(full), atol=1e-5)


# --------------------------------------------------------------------------- text semantics


def test_text_embeddings_are_semantic(encoder: MultimodalEncoder) -> None:
    e = encoder.encode_text(["a photo of a dog", "a picture of a puppy", "stock market report"])
    sim = e @ e.T
    assert sim[0, 1] > 0.6
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[1, 0] > sim[1, 2] + 0.3


def test_text_tower_is_minilm_mean_pooled(encoder: MultimodalEncoder) -> None:
    """The text embedding is exactly MiniLM's masked mean of token states, normalised."""
    from transformers import AutoModel, AutoTokenizer

    from genius.encoders import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    bert = AutoModel.from_pretrained(minilm_path()).eval()
    texts = ["a photo of a dog", "stock market report for the third quarter"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(encoder.encode_text(texts), reference, atol=1e-5)


# --------------------------------------------------------------------------- images


def test_pil_png_and_jpeg_bytes_agree(encoder: MultimodalEncoder) -> None:
    img = _image(11)
    png = _encode(img, "PNG")
    jpeg = _encode(img, "JPEG", quality=95)
    e = encoder.encode_image([img, png, bytearray(png), jpeg, Image.open(io.BytesIO(jpeg))])
    assert torch.allclose(e[0], e[1], atol=1e-6), "PNG is lossless: same pixels, same embedding"
    assert torch.equal(e[1], e[2])
    assert torch.allclose(e[3], e[4], atol=1e-6), "JPEG bytes and the same JPEG opened by PIL agree"
    assert float(e[0] @ e[3]) > 0.98, "JPEG artefacts move the embedding only slightly"


def test_grayscale_and_transparent_images(encoder: MultimodalEncoder) -> None:
    gray = _image(4).convert("L")
    e = encoder.encode_image([gray, _encode(gray, "PNG"), gray.convert("RGB"), _image(4)])
    assert e.shape == (4, 384)
    # one grey channel is read as three equal ones, from a PIL image or from PNG bytes alike
    assert torch.allclose(e[0], e[2], atol=1e-6) and torch.allclose(e[1], e[2], atol=1e-6)
    assert not torch.allclose(e[2], e[3], atol=1e-3), "the colour picture is another input"
    # transparent pixels are composited on white, not black: line art stays visible
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (10, 10, 30, 30))
    decoded = decode_image_bytes(_encode(rgba, "PNG"), 10_000)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((20, 20)) == (0, 0, 0)
    assert load_image(rgba, 10_000).tobytes() == decoded.tobytes()


def test_large_jpeg_is_downscaled_while_decoding() -> None:
    img = _image(5, size=(1600, 1200))
    jpeg = _encode(img, "JPEG", quality=90)
    out = decode_image_bytes(jpeg, max_pixels=200_000)  # 1.92 MP → draft at 1/4 = 400x300
    assert out.mode == "RGB"
    assert out.size[0] * out.size[1] <= 200_000
    assert out.size == (400, 300)
    assert decode_image_bytes(jpeg, max_pixels=10_000_000).size == (1600, 1200)


# --------------------------------------------------------------------------- pairs and fusion


def test_pair_uses_fusion_and_differs_from_parts(encoder: MultimodalEncoder) -> None:
    images = [_image(i) for i in range(3)]
    texts = ["a beach", "a mountain", "a forest"]
    x, y = encoder.encode_image(images), encoder.encode_text(texts)
    pair = encoder.encode_pair(images, texts)
    assert torch.allclose(pair, encoder.fusion(x, y), atol=1e-5)
    assert (pair * x).sum(-1).max() < 0.99 and (pair * y).sum(-1).max() < 0.99
    # the fusion's parameters are what decides the pair embedding
    saved = {k: v.clone() for k, v in encoder.fusion.state_dict().items()}
    try:
        with torch.no_grad():
            encoder.fusion.gate[-1].weight.normal_(0, 1.0)
            encoder.fusion.mlp[-1].weight.normal_(0, 0.1)
        pair2, lam = encoder.fusion(x, y, return_lambda=True)
        assert not torch.allclose(pair2, pair, atol=1e-3)
        assert lam.shape == (3,) and torch.all((lam > 0) & (lam < 1)) and lam.std() > 1e-4
        assert torch.allclose(encoder.encode_pair(images, texts), pair2, atol=1e-5)
    finally:
        encoder.fusion.load_state_dict(saved)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "texts, index, reason",
    [
        (["fine", "   "], 1, "empty"),
        (["fine", "", "also fine"], 1, "empty"),
        (["fine", "ok", 42], 2, "must be str"),
        ([None], 0, "must be str"),
        (["ok", "bad \udcff surrogate"], 1, "Unicode"),
    ],
)
def test_bad_texts_name_the_index(encoder: MultimodalEncoder, texts, index, reason) -> None:
    with pytest.raises(InvalidInputError) as info:
        encoder.encode_text(texts)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, GeniusError)
    assert err.index == index
    assert reason in err.reason
    assert f"record {index}" in str(err)


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb); no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_bad_images_name_the_index(encoder: MultimodalEncoder) -> None:
    good = _encode(_image(1), "PNG")
    truncated = good[: len(good) // 2]
    cases = [
        ([good, b"not an image at all"], 1, "cannot decode"),
        ([good, good, b""], 2, "empty"),
        ([truncated], 0, "cannot decode"),
        ([good, "a string"], 1, "must be bytes"),
        ([good, _bomb_png(100_000, 100_000)], 1, "too large"),  # PIL's bomb check
        ([_bomb_png(7_000, 7_000), good], 0, "above the bound"),  # our bound, before decoding
    ]
    for images, index, reason in cases:
        with pytest.raises(InvalidInputError) as info:
            encoder.encode_image(images)
        assert info.value.index == index, (reason, info.value)
        assert reason in info.value.reason, info.value
    # errors name the record's index in the caller's list, not within a batch (size 4)
    with pytest.raises(InvalidInputError) as info:
        encoder.encode_image([good] * 6 + [b"junk"])
    assert info.value.index == 6


def test_pixel_bound_applies_to_pil_and_bytes(encoder: MultimodalEncoder) -> None:
    img = _image(2, size=(200, 100))  # 20,000 pixels
    old = encoder.cfg
    encoder.cfg = dataclasses.replace(old, max_image_pixels=10_000)
    try:
        for item in (img, _encode(img, "PNG")):
            with pytest.raises(InvalidInputError) as info:
                encoder.encode_image([_image(0, size=(50, 50)), item])
            assert info.value.index == 1 and "above the bound" in info.value.reason
    finally:
        encoder.cfg = old


def test_bad_pairs(encoder: MultimodalEncoder) -> None:
    img = _image(0)
    with pytest.raises(InvalidInputError) as info:
        encoder.encode_pair([img, img], ["one", " "])
    assert info.value.index == 1
    with pytest.raises(InvalidInputError) as info:
        encoder.encode_pair([img, b"xx"], ["one", "two"])
    assert info.value.index == 1
    with pytest.raises(InvalidInputError) as info:
        encoder.encode_pair([img], ["one", "two"])
    assert info.value.index is None and "2 texts" in info.value.reason
    with pytest.raises(InvalidInputError):
        encoder.encode_text("a bare string, not a list")


# --------------------------------------------------------------------------- training state


def test_text_tower_frozen_image_tower_and_fusion_trainable(encoder: MultimodalEncoder) -> None:
    text_params = encoder.text_parameters()
    assert len(text_params) == len(list(encoder.text_tower.parameters())) > 0
    assert not any(p.requires_grad for p in text_params)
    assert all(p.requires_grad for p in encoder.image_tower.parameters())
    assert all(p.requires_grad for p in encoder.fusion.parameters())

    encoder.train()
    try:
        assert encoder.image_tower.training
        assert not encoder.text_tower.training, "a locked text tower must not run dropout"
        texts = ["a cat", "a car"]
        images = [_image(0), _image(1)]
        t = encoder.embed_text(texts)
        i = encoder.embed_image(images)
        p = encoder.embed_pair(images, texts)
        assert not t.requires_grad  # frozen: no graph through the text tower
        assert i.requires_grad and p.requires_grad
        (i * t).sum().add(p.sum()).backward()
        assert all(q.grad is not None for q in encoder.image_tower.parameters())
        assert encoder.fusion.gate[-1].weight.grad is not None
        assert all(q.grad is None for q in text_params)
        # the same text gives the same vector in train mode: dropout is off in the locked tower
        assert torch.allclose(encoder.embed_text(texts), t)
    finally:
        encoder.zero_grad(set_to_none=True)
        encoder.train(False)


# --------------------------------------------------------------------------- save / load


def test_save_load_gives_identical_embeddings(tmp_path) -> None:
    torch.manual_seed(1)
    model = MultimodalEncoder.from_config(EncoderConfig(batch_size=8, max_image_pixels=5_000_000))
    _train_a_little(model)
    texts = ["a harbour at dawn", "a red kite"]
    images = [_image(21), _encode(_image(22), "PNG")]
    before = (model.encode_text(texts), model.encode_image(images), model.encode_pair(images, texts))

    model.save(tmp_path / "enc")
    assert (tmp_path / "enc" / CONFIG_FILE).is_file()
    # the locked MiniLM comes from the package, so only the small trainable part is stored
    assert (tmp_path / "enc" / WEIGHTS_FILE).stat().st_size < 20_000_000
    assert not [p for p in (tmp_path / "enc").iterdir() if p.name.endswith(".tmp")]

    loaded = MultimodalEncoder.load(tmp_path / "enc")
    assert loaded.cfg == model.cfg
    after = (loaded.encode_text(texts), loaded.encode_image(images), loaded.encode_pair(images, texts))
    for b, a in zip(before, after):
        assert torch.equal(b, a)


def test_default_model_takes_a_local_checkpoint_as_pretrained(encoder: MultimodalEncoder, tmp_path) -> None:
    """A stage-1 CustomTextCLIP checkpoint (text weights optional) loads via `pretrained`."""
    trained = MultimodalEncoder.from_config(EncoderConfig(batch_size=4))
    _train_a_little(trained)
    state = {k: v for k, v in trained.clip.state_dict().items() if not k.startswith("text.")}
    torch.save(state, tmp_path / "stage1.pt")
    again = MultimodalEncoder.from_config(EncoderConfig(batch_size=4, pretrained=str(tmp_path / "stage1.pt")))
    images = [_image(3), _image(4)]
    assert torch.equal(again.encode_image(images), trained.encode_image(images))
    assert not torch.allclose(again.encode_image(images), encoder.encode_image(images))
    with pytest.raises(FileNotFoundError):
        MultimodalEncoder.from_config(EncoderConfig(pretrained="laion2b_s34b_b79k"))  # tags need a real CLIP name


def test_config_json_round_trip() -> None:
    cfg = EncoderConfig(image_size=96, image_timm_model=None, image_layers=(2, 1, 1, 1), batch_size=3)
    again = EncoderConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.image_layers, tuple)
    with pytest.raises(ValueError):
        EncoderConfig(image_timm_model=None, image_size=50)  # ModifiedResNet needs a multiple of 32
    assert EncoderConfig(image_size=50).image_size == 50  # the timm CNN pools globally
    with pytest.raises(ValueError):
        EncoderConfig(batch_size=0)


def test_modified_resnet_image_tower() -> None:
    """The alternative small tower (open_clip ModifiedResNet) builds, encodes and trains."""
    model = MultimodalEncoder.from_config(EncoderConfig(image_timm_model=None, image_size=32, batch_size=4))
    assert type(model.image_tower).__name__ == "ModifiedResNet"
    out = model.encode_image([_image(0), _image(1)])
    assert out.shape == (2, 384) and _unit(out)
    assert all(p.requires_grad for p in model.image_tower.parameters())


# --------------------------------------------------------------------------- generic open_clip


TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory) -> str:
    """Register a tiny open_clip config (the stock ones take tens of seconds to build here)."""
    import json

    import open_clip

    name = "genius-test-tiny-clip"
    path = tmp_path_factory.mktemp("clip_cfg") / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return name


def test_generic_open_clip_model_builds_and_encodes(tiny_clip_name: str, tmp_path) -> None:
    """Any other model name goes through open_clip.create_model_and_transforms."""
    torch.manual_seed(0)
    model = MultimodalEncoder.from_config(EncoderConfig(model_name=tiny_clip_name, pretrained=None, batch_size=2))
    assert model.embed_dim == 64
    texts = ["a diagram", "a cat", "a boat"]
    images = [_image(0), _encode(_image(1), "JPEG"), _image(2)]
    outs = (model.encode_text(texts), model.encode_image(images), model.encode_pair(images, texts))
    for out in outs:
        assert out.shape == (3, 64) and _unit(out)
    text_params = model.text_parameters()
    assert len(text_params) > len(list(model.text_tower.parameters()))  # + positional_embedding, ...
    assert not any(p.requires_grad for p in text_params)
    assert all(p.requires_grad for p in model.image_tower.parameters())
    with pytest.raises(InvalidInputError) as info:
        model.encode_text(["ok", ""])
    assert info.value.index == 1

    # a local checkpoint file works as `pretrained`, like a downloaded CLIP would
    checkpoint = tmp_path / "clip.pt"
    torch.save(model.clip.state_dict(), checkpoint)
    from_file = MultimodalEncoder.from_config(
        EncoderConfig(model_name=tiny_clip_name, pretrained=str(checkpoint), batch_size=2)
    )
    assert torch.equal(from_file.encode_text(texts), outs[0])
    assert torch.equal(from_file.encode_image(images), outs[1])

    # save/load stores every weight of a generic model (no package to rebuild them from)
    model.save(tmp_path / "generic")
    loaded = MultimodalEncoder.load(tmp_path / "generic")
    for a, b in zip(outs, (loaded.encode_text(texts), loaded.encode_image(images), loaded.encode_pair(images, texts))):
        assert torch.equal(a, b)
