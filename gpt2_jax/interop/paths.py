"""The one path layer: the same calls for local paths and gs:// objects (workdirs, checkpoints, data, metrics).

Local paths go to the OS (atomic writes are a temporary file renamed into place). gs:// paths go
to Google Cloud Storage through gcsfs (the same filesystem Orbax's etils.epath uses, so both see
one cache); an object upload is atomic, so "write then rename" is a single upload there. Object
stores have no folders: `makedirs` is a no-op and `isdir` means "some object has this prefix".

STORAGE_EMULATOR_HOST (e.g. http://localhost:9023) sends all GCS traffic to an emulator: gcsfs
reads it itself; `honour_emulator` maps it onto tensorstore's endpoint (TENSORSTORE_GCS_HTTP_URL,
Orbax's array reads and writes) and turns off gcsfs's control-plane (gRPC) bucket probe, which
would go to googleapis.com. Call it before the first GCS access (Checkpoints and `gcs()` do).

Generation preconditions (`create_object`, `replace_object`, `delete_object`) are GCS's
compare-and-swap: the workdir lock is built on them (train/lock.py).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from typing import Iterator

GS = "gs://"


def is_remote(path) -> bool:
    return str(path).startswith(GS)


def honour_emulator() -> None:
    """Point tensorstore (and gcsfs) at STORAGE_EMULATOR_HOST when it is set (idempotent)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url.rstrip("/"))
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no storage-control API there


def gcs():
    """The gcsfs filesystem: the very instance Orbax's etils.epath uses (fsspec caches instances
    by arguments; these are epath's), so a `refresh` here is seen there too."""
    honour_emulator()
    import fsspec

    return fsspec.filesystem("gcs", finalize_on_close=True)


def _key(path: str) -> str:
    return str(path)[len(GS):].rstrip("/")


def absolute(path) -> str:
    """A local path made absolute (~ expanded); a gs:// path normalised (no trailing slash)."""
    path = str(path)
    if is_remote(path):
        return GS + _key(path)
    return os.path.abspath(os.path.expanduser(path))


def join(base, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def dirname(path) -> str:
    path = str(path)
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def basename(path) -> str:
    path = str(path)
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def exists(path) -> bool:
    return gcs().exists(_key(path)) if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return gcs().isdir(_key(path)) if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
    return gcs().isfile(_key(path)) if is_remote(path) else os.path.isfile(path)


def makedirs(path) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def refresh(path) -> None:
    """Forget cached listings under `path` (gs://): another process may have written there."""
    if is_remote(path):
        gcs().invalidate_cache(_key(path))


def listdir(path) -> list[str]:
    """Names directly under `path` (sorted); [] if there is nothing."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs = gcs()
    refresh(path)  # another process (or host) may have written since
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(_key(path), detail=False))
    except FileNotFoundError:
        return []


def glob(path, pattern: str) -> list[str]:
    """Full paths of the entries of folder `path` whose names match `pattern` (sorted)."""
    import fnmatch

    return [join(path, n) for n in listdir(path) if fnmatch.fnmatch(n, pattern)]


def size(path) -> int:
    return int(gcs().info(_key(path))["size"]) if is_remote(path) else os.path.getsize(path)


def read_bytes(path, offset: int = 0, length: int | None = None) -> bytes:
    """`length` bytes from `offset` (all the rest if None): on GCS one ranged GET, never the whole
    object unless asked."""
    if is_remote(path):
        end = None if length is None else offset + length
        return gcs().cat_file(_key(path), start=offset or None, end=end)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def read_text(path) -> str:
    return read_bytes(path).decode()


def write_atomic(path, data: bytes | str) -> None:
    """Replace `path` with `data` all at once: readers see the old or the new content, never half."""
    data = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        gcs().pipe_file(_key(path), data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def upload(local_file: str, path) -> None:
    """Copy a local file to `path` (local or gs://), replacing it whole."""
    if is_remote(path):
        gcs().put_file(local_file, _key(path))
    else:
        shutil.copyfile(local_file, path)


def rename(src, dst) -> None:
    """Move a file or folder. On GCS a folder move is a copy of each object, then a delete:
    not atomic, so only used to set damaged checkpoints aside."""
    if is_remote(src):
        fs = gcs()
        fs.mv(_key(src), _key(dst), recursive=True)
        fs.invalidate_cache(_key(dirname(src)))
    else:
        os.replace(src, dst)


def remove(path) -> None:
    if is_remote(path):
        gcs().rm(_key(path), recursive=True)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def walk_files(path) -> Iterator[str]:
    """Every file under folder `path`, as full paths."""
    if is_remote(path):
        for key in gcs().find(_key(path)):
            yield GS + key
        return
    for root, _, files in os.walk(path):
        for name in files:
            yield os.path.join(root, name)


# Generation preconditions (gs:// only): GCS's compare-and-swap on one object.


def _upload_url(fs, bucket: str) -> str:
    from urllib.parse import quote

    return f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o"


def _split(path) -> tuple[str, str]:
    bucket, _, name = _key(path).partition("/")
    return bucket, name


def create_object(path, data: bytes, if_generation: int = 0) -> int | None:
    """Upload `data` to `path` only if the object's generation is `if_generation` (0: only if it
    does not exist); its new generation, or None when the precondition failed (GCS answered 412)."""
    fs = gcs()
    bucket, name = _split(path)
    try:
        out = fs.call("POST", _upload_url(fs, bucket), uploadType="media", name=name, data=data,
                      ifGenerationMatch=str(if_generation), json_out=True,
                      headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    except FileExistsError:  # gcsfs's name for 412 Precondition Failed
        return None
    fs.invalidate_cache(_key(dirname(path)))
    return int(out["generation"])


def replace_object(path, data: bytes, generation: int) -> int | None:
    """`create_object` that replaces generation `generation` (compare-and-swap)."""
    return create_object(path, data, if_generation=generation)


def read_object(path) -> tuple[bytes, int] | None:
    """(content, generation) of `path`, or None if there is no such object. The two come from
    one metadata read and one download pinned to that generation, so they belong together."""
    fs = gcs()
    bucket, name = _split(path)
    try:
        meta = fs.call("GET", "b/{}/o/{}", bucket, name, json_out=True)
        gen = int(meta["generation"])
        _, data = fs.call("GET", "b/{}/o/{}", bucket, name, alt="media", generation=str(gen))
    except FileNotFoundError:
        return None
    return data, gen


def delete_object(path, generation: int) -> bool:
    """Delete `path` if it still has `generation`; False if it does not (gone or replaced)."""
    fs = gcs()
    bucket, name = _split(path)
    try:
        fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(generation))
    except (FileExistsError, FileNotFoundError):
        return False
    fs.invalidate_cache(_key(dirname(path)))
    return True
