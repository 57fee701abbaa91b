"""`genius train ...`: training jobs run from the command line.

    genius train encoder --shards DIR_OR_GLOB --out DIR     stage 1 on (image, caption) shards

Shards are WebDataset tars (`<key>.png|jpg`, `<key>.txt`, `<key>.json`) read with
`genius.data.shards.ShardReader`; records without both an image and a text are not
training pairs and are left out. Checkpoints go to OUT/checkpoints (resume with
--resume), the trained encoder to OUT (`MultimodalEncoder.save`), the per-epoch
history to OUT/train_history.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import random
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("genius.train")

CHECKPOINT_SUBDIR = "checkpoints"
HISTORY_FILE = "train_history.json"
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's key.ext split


def resolve_shards(spec: str) -> list[Path | str]:
    """A folder (its manifest's shards, else its *.tar), a glob, a brace pattern, one file, or
    URLs WebDataset opens (strings; reachability is checked when they are read)."""
    from genius.data.shards import ShardReader, is_url

    if is_url(spec):
        return ShardReader(spec).paths
    if any(c in spec for c in "*?[") and not Path(spec).exists():
        paths = sorted(Path(p) for p in glob.glob(spec))
        if not paths:
            raise FileNotFoundError(f"{spec}: no shard matches this pattern")
        return paths
    path = Path(spec)
    if "{" not in spec and not path.exists():
        raise FileNotFoundError(f"{spec}: no such shard file or folder")
    paths = ShardReader(spec).paths
    if not paths:
        raise FileNotFoundError(f"{spec}: holds no shards (*.tar)")
    return paths


def _manifest_pairs(shard: Path | str) -> int | None:
    """Image-text records of `shard` per its folder's shards.json, None when not listed (or a URL)."""
    from genius.data.shards import read_manifest

    if isinstance(shard, str):
        return None
    try:
        manifest = read_manifest(shard.parent)
    except (ValueError, OSError):
        return None
    if manifest is None:
        return None
    for entry in manifest.get("shards", []):
        if entry.get("file") == shard.name:
            return int(entry.get("modalities", {}).get("image_text", 0))
    return None


def _scan_pairs(shard: Path) -> int:
    """Count keys with an image and a text member from the tar headers (no data read)."""
    from genius.data.shards import IMAGE_EXTS, TEXT_EXTS

    kinds: dict[str, set[str]] = {}
    try:
        with tarfile.open(shard, "r:*", ignore_zeros=True) as tar:
            for info in tar:
                match = _MEMBER_NAME.match(info.name) if info.isreg() else None
                if match is None:
                    continue
                ext = match.group(2).lower()
                kind = "image" if ext in IMAGE_EXTS else "text" if ext in TEXT_EXTS else None
                if kind:
                    kinds.setdefault(match.group(1), set()).add(kind)
    except (OSError, tarfile.TarError, EOFError) as e:
        log.warning("%s: cannot scan (%s); counting what was read", shard, e)
    return sum(1 for k in kinds.values() if len(k) == 2)


class ShardPairs:
    """(image, caption) `PairExample`s from WebDataset shards, re-iterable.

    Every pass gives the same order for the same epoch (`set_epoch`, called by
    `train_encoder`): with `shuffle`, the shard order and a `buffer`-sized shuffle
    buffer are drawn from a generator seeded by (seed, epoch), so that a resumed run
    sees exactly the data an uninterrupted one would. `len()` is the number of image-text
    records, from the shards' manifest or a scan of the tar headers.
    """

    def __init__(self, paths: list[Path], *, shuffle: bool = True, buffer: int = 1000, seed: int = 0,
                 exclude: frozenset[str] = frozenset()) -> None:
        from genius.data.shards import ReadStats

        self.paths = list(paths)
        self.shuffle = shuffle
        self.buffer = buffer
        self.seed = seed
        self.exclude = frozenset(exclude)
        self.epoch = 0
        self.stats = ReadStats()
        self.not_pairs = 0  # records with only an image or only a text
        self.excluded = 0  # records left out by key (held-out evaluation records)
        if self.exclude:
            # Which keys are present is only known by reading the records (without decoding).
            self._len = sum(1 for _ in self._records(self.paths))
            self.stats, self.not_pairs = ReadStats(), 0
        else:
            counts = [_manifest_pairs(p) for p in self.paths]
            self._len = sum(c if c is not None else _scan_pairs(p) for c, p in zip(counts, self.paths))

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _records(self, paths: list[Path]) -> Iterator[Any]:
        from genius.data.shards import ShardReader

        # Images are decoded (and bad ones skipped and counted) by the training collate.
        reader = ShardReader(paths, check_images="none", stats=self.stats)
        self.excluded = 0
        for record in reader:
            if record.key in self.exclude:
                self.excluded += 1
                continue
            if record.image is None or record.text is None:
                self.not_pairs += 1
                continue
            yield record

    def __iter__(self) -> Iterator[Any]:
        from genius.encoder_training import PairExample

        paths = list(self.paths)
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(paths)
        pool: list[Any] = []
        for record in self._records(paths):
            example = PairExample.caption(record.image, record.text, key=record.key)
            if not self.shuffle or self.buffer <= 1:
                yield example
                continue
            pool.append(example)
            if len(pool) >= self.buffer:
                i = rng.randrange(len(pool))
                pool[i], pool[-1] = pool[-1], pool[i]
                yield pool.pop()
        rng.shuffle(pool)
        yield from pool


def read_key_list(path: str) -> frozenset[str]:
    """Record keys to leave out: a JSON file with a "held_out" list (`genius eval --split-out`)
    or a JSON list, or a text file with one key per line."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return frozenset(line.strip() for line in text.splitlines() if line.strip())
    keys = data.get("held_out") if isinstance(data, dict) else data
    if not isinstance(keys, list):
        raise ValueError(f"{path}: expected a JSON list of keys or an object with a 'held_out' list")
    return frozenset(str(k) for k in keys)


def _train_encoder(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from genius.encoder_training import CHECKPOINT_FILE, EncoderTrainConfig, train_encoder
    from genius.encoders import DEFAULT_MODEL_NAME, EncoderConfig, MultimodalEncoder

    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    checkpoints = out / CHECKPOINT_SUBDIR
    paths = resolve_shards(args.shards)
    if (checkpoints / CHECKPOINT_FILE).exists() and not args.resume:
        raise ValueError(f"{checkpoints / CHECKPOINT_FILE} exists: pass --resume to continue that run, "
                         "or choose another --out")
    exclude = read_key_list(args.exclude_keys) if args.exclude_keys else frozenset()
    data = ShardPairs(paths, shuffle=not args.no_shuffle, buffer=args.shuffle_buffer, seed=args.seed,
                      exclude=exclude)
    log.info("%d shards, %d image-text pairs%s", len(paths), len(data),
             f" ({data.excluded} records left out by --exclude-keys)" if exclude else "")
    if len(data) == 0:
        raise ValueError(f"{args.shards}: no image-text records to train on")

    enc_cfg = EncoderConfig(device=args.device)
    if args.model:
        enc_cfg = replace(enc_cfg, model_name=args.model)
    if args.pretrained:
        enc_cfg = replace(enc_cfg, pretrained=args.pretrained)
    if args.image_size:
        if not enc_cfg.is_default:
            raise ValueError("--image-size applies to the default model only (open_clip models fix their own)")
        enc_cfg = replace(enc_cfg, image_size=args.image_size)
    # Fine-tuning a given CLIP trains both towers; the offline default keeps MiniLM locked.
    unlock = args.unlock_text if args.unlock_text is not None else (enc_cfg.model_name != DEFAULT_MODEL_NAME)
    import torch

    torch.manual_seed(args.seed)  # the image tower's initial weights: same seed, same run
    encoder = MultimodalEncoder.from_config(enc_cfg)

    cfg = EncoderTrainConfig(seed=args.seed, unlock_text=unlock, shuffle=not args.no_shuffle)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                                   ("max_steps", args.max_steps), ("warmup_steps", args.warmup_steps),
                                   ("checkpoint_every_steps", args.checkpoint_every)) if v is not None}
    cfg = replace(cfg, **overrides)
    history = train_encoder(encoder, data, cfg, checkpoint_dir=checkpoints, progress=not args.quiet)
    encoder.save(out)
    (out / HISTORY_FILE).write_text(json.dumps({
        "history": history,
        "config": cfg.to_dict(),
        "shards": [str(p) for p in paths],
        "read": data.stats.as_dict(),
        "records_without_pair": data.not_pairs,
        "excluded_records": data.excluded,
        "exclude_keys": args.exclude_keys,
    }, indent=2) + "\n")
    skipped = sum(h["skipped"] for h in history)
    last = history[-1] if history else {}
    log.info("encoder written to %s: %d epochs, last loss %.4f, %.0f images/s; skipped %d bad examples, "
             "%d bad shard records", out, len(history), last.get("loss", float("nan")),
             last.get("images_per_s", 0.0), skipped, sum(data.stats.skipped.values()))
    return 0


def add_train_commands(subparsers: Any) -> None:
    """Register `train` (with its `encoder` stage) on the `genius` CLI's subparsers."""
    train = subparsers.add_parser("train", help="training jobs (stage 1: encoder alignment)",
                                  description="Training jobs. Each STAGE has --help.")
    stages = train.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    p = stages.add_parser(
        "encoder", help="stage 1: align the image tower (and fine-tune CLIP) on image-caption shards",
        description="Stage 1: contrastive (ClipLoss) alignment of the image tower to the text tower on\n"
                    "(image, caption) records of WebDataset shards. The offline default model trains its\n"
                    "small CNN against the locked MiniLM; a real open_clip model (--model, --pretrained)\n"
                    "is fine-tuned with both towers unlocked. Resumable from OUT/checkpoints.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shard folder, glob ('data/*.tar') or brace pattern")
    p.add_argument("--out", required=True, help="folder for the trained encoder, checkpoints and history")
    p.add_argument("--epochs", type=int, help="epochs (default: 10)")
    p.add_argument("--batch-size", type=int, help="batch size (default: 256)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 5e-3; ~1e-5 to fine-tune CLIP)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 50)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (the schedule ends there)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: 500)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--model", help="open_clip model name (default: the offline MiniLM + small CNN model)")
    p.add_argument("--pretrained", help="open_clip pretrained tag or local checkpoint path")
    p.add_argument("--image-size", type=int, help="image size of the default model (default: 64)")
    lock = p.add_mutually_exclusive_group()
    lock.add_argument("--unlock-text", dest="unlock_text", action="store_true", default=None,
                      help="train the text tower too (default for --model)")
    lock.add_argument("--lock-text", dest="unlock_text", action="store_false",
                      help="keep the text tower frozen (default for the offline model)")
    p.add_argument("--no-shuffle", action="store_true", help="read the shards in order, unshuffled")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="shuffle buffer size (default: 1000)")
    p.add_argument("--exclude-keys", metavar="FILE",
                   help="leave out these records: `genius eval --split-out` JSON (its held_out list), a JSON "
                        "list, or one key per line; keeps evaluation records unseen by stage 1")
    p.add_argument("--seed", type=int, default=0, help="seed of shuffling and training (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: torch's choice). On a small shared CPU machine use 1: "
                        "idle-waiting OpenMP threads made training ~12x slower on a busy 2-core machine")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train_encoder)
