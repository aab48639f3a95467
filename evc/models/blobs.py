"""Embedded blob storage: content-addressed files under ``<data_dir>/models/blobs/sha256/<hex>``.

A blob is written once, atomically (a private temporary file in the same file system, renamed
into place), mode 0600, and named by the SHA-256 of its bytes; a read verifies the digest
(:meth:`BlobStore.verify`, :meth:`BlobStore.open_verified`). The API and the workers must share
the data directory (``evc up`` runs both on one machine). Which records use a blob is kept in
the store (:class:`~evc.store.models.ModelStore`); :meth:`BlobStore.remove` is called once none
does, under the blob's lock (:func:`blob_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from evc.errors import Conflict, EVCError, NotFound, ValidationError

CHUNK = 1024 * 1024
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class BlobCorrupt(EVCError):
    """A stored blob no longer has the digest it is named by."""

    status = 500
    code = "corrupt"


class TooLarge(EVCError):
    """An upload is larger than the configured limit."""

    status = 413
    code = "too_large"


@dataclass(frozen=True)
class Blob:
    digest: str  # hex SHA-256
    size: int
    path: Path
    temporary: bool = False  # a verified copy (from a registry) the reader removes when done


class BlobStore:
    """Content-addressed blobs in ``<root>/blobs/sha256`` (temporary files in ``<root>/tmp``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "blobs" / "sha256"
        self.tmp = root / "tmp"

    @classmethod
    def of(cls, data_dir: Path) -> BlobStore:
        return cls(data_dir / "models")

    def _ensure(self) -> None:
        for d in (self.root, self.root / "blobs", self.dir, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise ValidationError(f"not a SHA-256 digest: {digest!r}", field="sha256")
        return self.dir / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def stage(self, stream: IO[bytes], limit: int | None = None) -> Staged:
        """Copy *stream* into the temporary area, hashing it (at most *limit* bytes, else
        :class:`TooLarge`): :meth:`Staged.commit` puts it in place. A :class:`Spool` of this
        store (an upload the API wrote there as it arrived) is taken as it is: not copied again."""
        if isinstance(stream, Spool) and stream.bs.tmp == self.tmp:
            staged = stream.staged(limit)
            if staged is not None:
                return staged
        return Staged(self, stream, limit)

    def spool(self) -> Spool:
        """A file in the temporary area to write an upload to, hashed as it is written."""
        return Spool(self)

    def get(self, digest: str) -> Blob:
        p = self.path(digest)
        try:
            return Blob(digest, p.stat().st_size, p)
        except FileNotFoundError as exc:
            raise NotFound(f"blob sha256:{digest} is not stored", sha256=digest) from exc

    def verify(self, digest: str) -> Blob:
        """The blob, after reading it through: :class:`BlobCorrupt` when its bytes changed."""
        blob = self.get(digest)
        h = hashlib.sha256()
        with open(blob.path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise BlobCorrupt(
                f"stored blob sha256:{digest} is corrupt (its bytes hash to sha256:{h.hexdigest()}); upload it again",
                sha256=digest,
            )
        return blob

    def read_verified(self, digest: str) -> bytes:
        """The blob's bytes, verified against its digest."""
        data = self.get(digest).path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BlobCorrupt(f"stored blob sha256:{digest} is corrupt (hashes to sha256:{actual})", sha256=digest)
        return data

    def remove(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
            return True
        except FileNotFoundError:
            return False


class Staged:
    """An upload copied into the blob store's temporary area and hashed, not yet in place:
    :meth:`commit` it (or :meth:`discard` it; committing discards what is left)."""

    def __init__(self, bs: BlobStore, stream: IO[bytes], limit: int | None) -> None:
        bs._ensure()
        self.bs = bs
        self.tmp = bs.tmp / f"upload-{os.getpid()}-{secrets.token_hex(8)}"
        h, size = hashlib.sha256(), 0
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise TooLarge(f"the upload is larger than the limit of {human_size(limit)} ({limit} bytes)")
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            self.discard()
            raise
        if size == 0:
            self.discard()
            raise ValidationError("the uploaded file is empty", field="file")
        self.digest, self.size = h.hexdigest(), size

    @classmethod
    def adopt(cls, bs: BlobStore, tmp: Path, digest: str, size: int) -> Staged:
        """A file already in the temporary area, hashed by its writer (a verified pull)."""
        self = cls.__new__(cls)
        self.bs, self.tmp, self.digest, self.size = bs, tmp, digest, size
        return self

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def commit(self, store: Any, ref: str) -> Blob:
        """Reference the blob as *ref* in *store* and put it in place (an atomic rename; a blob
        already stored stays), both under the blob's lock: a concurrent :func:`release` of its
        last other reference cannot remove it in between."""
        final = self.bs.path(self.digest)
        with blob_lock(store, self.digest):
            store.ref_blob(self.digest, ref)
            if final.is_file() and final.stat().st_size == self.size:
                self.discard()
            else:
                os.replace(self.tmp, final)
        return Blob(self.digest, self.size, final)


class Spool(io.RawIOBase):
    """An upload written once, as it arrives, into the blob store's temporary area and hashed on
    the way (the API's multipart parser writes file parts here instead of its own temporary
    file): :meth:`BlobStore.stage` adopts it without copying. Closed, it removes its file unless
    that was moved into place."""

    def __init__(self, bs: BlobStore) -> None:
        super().__init__()
        bs._ensure()
        self.bs = bs
        self.path = bs.tmp / f"upload-{os.getpid()}-{secrets.token_hex(8)}"
        self._f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), "w+b")
        self._h, self.size, self._sequential, self._rewound = hashlib.sha256(), 0, True, False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self._rewound:  # a write after a seek: the running digest no longer holds
            self._sequential = False
        data = bytes(b)
        self._h.update(data)
        self.size += len(data)
        return self._f.write(data)

    def readinto(self, b: Any) -> int:
        return self._f.readinto(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._rewound = True
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        super().close()

    def staged(self, limit: int | None) -> Staged | None:
        """This upload as a :class:`Staged` (its file, its digest), or None when it was not
        written in one pass (then it is copied like any stream)."""
        if not self._sequential:
            self.seek(0)
            return None
        if limit is not None and self.size > limit:
            raise TooLarge(f"the upload is larger than the limit of {human_size(limit)} ({limit} bytes)")
        if self.size == 0:
            raise ValidationError("the uploaded file is empty", field="file")
        self._f.flush()
        os.fsync(self._f.fileno())
        return Staged.adopt(self.bs, self.path, self._h.hexdigest(), self.size)


def release(store: Any, bs: BlobStore, digest: str, ref: str) -> bool:
    """Drop *ref* from the blob's references; remove the blob once none is left (under its
    lock). True when the blob was removed."""
    with blob_lock(store, digest):
        if store.unref_blob(digest, ref) == 0:
            return bs.remove(digest)
    return False


@contextlib.contextmanager
def blob_lock(store: Any, digest: str, timeout_s: float = 30.0) -> Iterator[None]:
    """Hold the store lock of one blob: a blob is referenced (and written) or, unreferenced,
    removed, never both at once."""
    name, owner = f"model-blob:{digest}", secrets.token_hex(8)
    deadline = time.monotonic() + timeout_s
    while not store.acquire_lock(name, owner, timeout_s):
        if time.monotonic() > deadline:
            raise Conflict(f"blob sha256:{digest} is busy; retry", sha256=digest)
        time.sleep(0.02)
    try:
        yield
    finally:
        store.release_lock(name, owner)


def human_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"
