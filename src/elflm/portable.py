"""Folders that travel: a model folder or training checkpoint holds the local files its encoder
settings name, so that it loads from any working directory, after being moved or copied, and on
another machine.

:func:`bundle_encoder` copies every local file or folder an :class:`~elflm.config.EncoderConfig`
names (``name_or_path``, ``weights``, ``tokenizer``) into ``<folder>/encoder/`` and records it
relative to the folder; Hub ids (``t5-small``, ``org/repo``, ``org/repo/file.pkl``) and the word
``random`` stay as they are. :func:`resolve_encoder` turns those relative paths back into paths
inside the folder when it is read. Nothing records a path relative to the working directory or
absolute to one machine.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

from .config import EncoderConfig

ENCODER_DIR = "encoder"
PATH_FIELDS = ("weights", "name_or_path", "tokenizer")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)*")  # t5-small, org/repo, org/repo/file.pkl


def is_local(value) -> bool:
    """Whether a setting names an existing local file or folder (not ``random``, not a Hub id)."""
    return value is not None and value != "random" and Path(str(value)).expanduser().exists()


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def bundle_encoder(enc: EncoderConfig, folder: str | Path) -> EncoderConfig:
    """``enc`` with every local path copied into ``folder/encoder`` (once per source: a folder
    becomes ``encoder/`` itself when that does not exist yet, else ``encoder/<field>``; a file keeps
    its name) and
    recorded relative to ``folder``; paths already inside ``folder`` become relative. A value that
    is neither an existing path, a Hub id nor ``random`` is refused: the folder would not load
    elsewhere."""
    folder = Path(folder)
    copied: dict[Path, str] = {}
    out = {}
    for field in PATH_FIELDS:
        value = getattr(enc, field)
        if value is None or value == "random":
            out[field] = value
            continue
        if not is_local(value):
            text = str(value)
            if text.startswith(("/", ".", "~")) or not _HUB_NAME.fullmatch(text):
                raise ValueError(
                    f"encoder.{field}={text!r} is neither an existing local path nor a Hub id, so the folder "
                    f"{folder} would not load anywhere; give the encoder as a path that exists from here or a Hub id"
                )
            out[field] = text
            continue
        src = Path(str(value)).expanduser().resolve()
        if _inside(src, folder):
            out[field] = os.path.relpath(src, folder.resolve())
            continue
        if src not in copied:
            root = folder / ENCODER_DIR
            if src.is_dir():  # encoder/ itself when free, else encoder/<field> (never mixed into another)
                dest = root / field if root.exists() else root
                shutil.copytree(src, dest, dirs_exist_ok=True)
            else:
                dest = root / src.name if not (root / src.name).exists() else root / field / src.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
            copied[src] = os.path.relpath(dest, folder)
        out[field] = copied[src]
    return replace(enc, **out)


def resolve_encoder(enc: EncoderConfig, folder: str | Path) -> EncoderConfig:
    """``enc`` with the relative paths that exist inside ``folder`` made paths into it."""
    folder = Path(folder)

    def resolve(value):
        if value is None or Path(str(value)).is_absolute() or not (folder / str(value)).exists():
            return value
        return str(folder / str(value))

    return replace(enc, **{f: resolve(getattr(enc, f)) for f in PATH_FIELDS})


def same_files(a, b) -> bool:
    """Whether two encoder settings name the same thing: equal values, or two local files or
    folders with the same content (the same relative file names, byte for byte), e.g. an encoder
    folder and its copy inside a checkpoint."""
    if a == b:
        return True
    if not (is_local(a) and is_local(b)):
        return False
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    if pa.is_file() and pb.is_file():
        return filecmp.cmp(pa, pb, shallow=False)
    if not (pa.is_dir() and pb.is_dir()):
        return False
    files = lambda root: sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())  # noqa: E731
    names = files(pa)
    return names == files(pb) and all(filecmp.cmp(pa / n, pb / n, shallow=False) for n in names)
