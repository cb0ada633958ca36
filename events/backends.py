"""Where an event store's files live: a local directory (real fsync, an flock writer lock, owner-only modes) or
any ``pyarrow.fs`` filesystem (no fsync, no lock: see events/store.py). The store talks to either through the
same small set of calls, paths relative to the store's root.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from events.errors import StoreConfigError, StoreLockedError


class LocalFile:
    """An owner-only file written with os.write, so fsync is real."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(self.fd, 0o600)  # O_TRUNC of an existing placeholder keeps its old mode

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def sync(self) -> None:
        os.fsync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def close(self) -> None:
        os.close(self.fd)


class LocalBackend:
    """Local directory: owner-only modes, fsync of files and directories, an flock writer lock."""

    local = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_fd: int | None = None

    def describe(self) -> str:
        return str(self.root)

    def makedirs(self, rel: str) -> None:
        path = self.root / rel if rel else self.root
        missing = []
        while not path.is_dir():
            missing.append(path)
            path = path.parent
        for p in reversed(missing):  # every folder we create, parents included, is owner-only
            p.mkdir(mode=0o700, exist_ok=True)
            os.chmod(p, 0o700)  # mkdir's mode is masked by the umask

    def listdir(self, rel: str) -> list[tuple[str, int]]:
        with os.scandir(self.root / rel) as it:
            return [(e.name, e.stat().st_size) for e in it if e.is_file()]

    def size(self, rel: str) -> int:
        return (self.root / rel).stat().st_size

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def open_read(self, rel: str) -> pa.NativeFile:
        return pa.memory_map(str(self.root / rel))

    def create(self, rel: str) -> LocalFile:
        return LocalFile(self.root / rel)

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def write_atomic(self, rel: str, data: bytes) -> None:
        tmp = self.root / (rel + ".tmp")
        f = LocalFile(tmp)
        try:
            f.write(data)
            f.sync()
        finally:
            f.close()
        os.replace(tmp, self.root / rel)
        self.sync_dir(str(Path(rel).parent))

    def truncate(self, rel: str, size: int) -> None:
        fd = os.open(self.root / rel, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def sync_dir(self, rel: str) -> None:
        fd = os.open(self.root / rel if rel not in ("", ".") else self.root, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock(self, timeout_s: float) -> None:
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A restarted writer can race the last moments of the one it replaces: retry briefly.
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreLockedError(f"{self.root} is locked by another writer") from None
                time.sleep(0.05)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None


class ArrowFile:
    def __init__(self, stream: pa.NativeFile) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data)
        self.stream.flush()

    def sync(self) -> None:
        self.stream.flush()  # pyarrow.fs has no fsync

    def truncate(self, size: int) -> None:
        raise OSError("cannot truncate a pyarrow.fs output stream")

    def close(self) -> None:
        self.stream.close()


class ArrowBackend:
    """Any pyarrow.fs filesystem. No locking, no fsync (see module docstring)."""

    local = False

    def __init__(self, fs: pafs.FileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def describe(self) -> str:
        return f"{self.fs.type_name}:{self.root}"

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self._p(rel), recursive=True)

    def listdir(self, rel: str) -> list[tuple[str, int]]:
        infos = self.fs.get_file_info(pafs.FileSelector(self._p(rel), allow_not_found=True))
        return [(i.base_name, i.size or 0) for i in infos if i.type == pafs.FileType.File]

    def size(self, rel: str) -> int:
        return self.fs.get_file_info(self._p(rel)).size or 0

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def open_read(self, rel: str) -> pa.NativeFile:
        return self.fs.open_input_file(self._p(rel))

    def create(self, rel: str) -> ArrowFile:
        return ArrowFile(self.fs.open_output_stream(self._p(rel)))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_file(self._p(rel)) as f:
            return f.read()

    def write_atomic(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._p(rel + ".tmp")) as f:
            f.write(data)
        self.fs.move(self._p(rel + ".tmp"), self._p(rel))

    def truncate(self, rel: str, size: int) -> None:
        with self.fs.open_input_file(self._p(rel)) as f:
            keep = f.read(size)
        self.write_atomic(rel, keep)

    def remove(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._p(rel))
        except FileNotFoundError:
            pass

    def sync_dir(self, rel: str) -> None:
        pass

    def lock(self, timeout_s: float) -> None:
        pass

    def unlock(self) -> None:
        pass


Backend = LocalBackend | ArrowBackend


def backend_for(location: str | Path, filesystem: pafs.FileSystem | None) -> Backend:
    if filesystem is not None:
        return ArrowBackend(filesystem, str(location))
    if isinstance(location, Path) or "://" not in location:
        return LocalBackend(Path(location).absolute())
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise StoreConfigError(f"cannot open event store location {location!r}: {exc}") from None
    return ArrowBackend(fs, path)
