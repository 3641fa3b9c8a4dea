"""Durable file writes shared by the trainer, the teacher cache and checkpoints.

Every file a run leaves behind is either complete or absent: it is written to a temporary file in the
same directory, flushed, fsynced, then moved over its final name with ``os.replace`` (atomic on POSIX),
and the directory entry is fsynced so the rename survives a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` to produce the file, then move it over ``path`` atomically."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, _w)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def atomic_replace_dir(src: str, dst: str) -> None:
    """Move the finished directory ``src`` to ``dst``; an older ``dst`` is moved aside first and removed after."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    trash = None
    if os.path.exists(dst):
        trash = tempfile.mkdtemp(prefix=".old-" + os.path.basename(dst) + ".", dir=parent)
        os.rmdir(trash)
        os.replace(dst, trash)
    os.replace(src, dst)
    fsync_dir(parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` (and the directories), before the tree is published by a rename."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
