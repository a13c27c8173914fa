"""Every file robust writes: checked before the work, written atomically after it, one writer per folder.

- :func:`check_output` resolves an output file path and probes it *before* any work starts: a
  path ending in a separator (or naming an existing folder) is a folder, and the file gets the
  command's default name inside it; an existing file is refused unless ``force``; the nearest
  existing folder must accept a new file (a real probe write) and have room. Nothing is left
  behind. :func:`check_output_dir` does the same for an output folder.
- :func:`atomic_output` writes through a temporary file in the target folder (fsync, then
  ``os.replace``, or a no-clobber link when overwriting is not allowed), so a kill or a full disk
  at any moment leaves either the previous file or the complete new one, never a partial file.
- :class:`FolderLock` makes a folder single-writer: an exclusive ``flock`` on ``<folder>/.lock``,
  held while the writer runs and released by the OS when the process dies (a ``kill -9`` never
  leaves a stale lock). A second writer gets :class:`FolderBusy` naming the holder.

Every refusal is a :class:`~robust.config.ConfigError` whose message names the path, the problem
and the fix (the CLI prints it as one line with exit code 2).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from robust.errors import FolderBusy, OutputError
from robust.run import Run, RunFiles

LOCK_NAME = ".lock"


MIN_FREE_BYTES = 1 << 20  # what a small output (JSON, PNG) needs at least


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest ancestor that exists (absolute)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def names_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` means a folder: it ends in a separator or names an existing folder."""
    text = os.fspath(path)
    return text.endswith(os.sep) or (os.altsep is not None and text.endswith(os.altsep)) or Path(text).is_dir()


def probe_folder(path: str | os.PathLike[str], flag: str, need_bytes: int = MIN_FREE_BYTES,
                 what: str = "the output") -> Path:
    """Check that files can be created under ``path`` (which may not exist yet); return the folder probed.

    The nearest existing ancestor must be a folder (not a file), accept a new file (created,
    written, fsynced and removed again) and have ``need_bytes`` free.
    """
    base = nearest_existing(Path(path))
    if not base.is_dir():
        raise OutputError(f"cannot write {path}: {base} is a file, not a folder; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".robust-probe-", dir=base)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {base} ({exc.strerror or exc}); choose a writable folder for {flag}") from None
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise OutputError(f"{base} has {free / 1e6:.1f} MB free but {what} need{'s' if what == 'the output' else ''} "
                          f"about {need_bytes / 1e6:.1f} MB; free space or pass {flag} on another disk")
    return base


def check_output(path: str | os.PathLike[str], flag: str, force: bool = False, default_name: str | None = None,
                 need_bytes: int = MIN_FREE_BYTES) -> Path:
    """The file an output option will write, checked before any work: refuse now rather than lose results later.

    ``path`` ending in a separator, or naming an existing folder, is a folder: the file is
    ``default_name`` inside it (created at write time). An existing file is refused unless
    ``force``; a path through a file, a folder that refuses new files and a full disk are
    refused too. Nothing is written.
    """
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{flag} is empty; give a file path")
    target = Path(text)
    if names_folder(text):
        if default_name is None:
            raise OutputError(f"{flag} {text} is a folder; give a file path")
        target = target / default_name
    if target.is_dir():
        raise OutputError(f"{flag} {target} is a folder; give a file path or a folder ending in {os.sep}")
    if target.exists() and not force:
        raise OutputError(f"{target} already exists; pass --force to overwrite it or choose another {flag}")
    probe_folder(target.parent, flag, need_bytes)
    return target


# The files of a run folder (RunFiles.written_by_training) and of a compare folder that no output option may
# replace, even with --force: they are the run, not a result written from it.
_COMPARE_SETTINGS = "compare.json"


def protected_file(path: Path) -> str | None:
    """What ``path`` is when it is a file of a run or compare folder (``the best.pt of the run folder runs/a``)."""
    name, folder = path.name, path.parent
    if RunFiles.written_by_training(name) and Run.holds_run(folder):
        return f"the {name} of the run folder {folder}"
    if name == _COMPARE_SETTINGS and folder.joinpath(_COMPARE_SETTINGS).is_file():
        return f"the settings of the comparison in {folder}"
    return None


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when the two paths name one file (after resolving links, ``..`` and relative parts)."""
    return Path(os.path.realpath(a)) == Path(os.path.realpath(b))


def check_output_file(path: str | os.PathLike[str], flag: str, force: bool = False, default_name: str | None = None,
                      inputs: tuple = (), outputs: dict[str, str | os.PathLike[str] | None] | None = None) -> Path:
    """:func:`check_output`, and never a file this command reads (``inputs``), another of its outputs
    (``outputs``: flag -> path) or a run's own file (its checkpoints, config.json, metrics.jsonl; a
    comparison's compare.json), even with --force."""
    target = check_output(path, flag, True, default_name)  # the file meant; what it is decides the message
    for source in inputs:
        if source is not None and same_file(source, target):
            raise OutputError(f"{flag} {target} is the file this command reads; it is never overwritten, not even "
                              f"with --force: choose another {flag}")
    for other_flag, other in (outputs or {}).items():
        if other is not None and same_file(other, target):
            raise OutputError(f"{flag} and {other_flag} are the same file, {target}; each output needs its own: "
                              f"choose another {flag}")
    real = Path(os.path.realpath(target))
    what = protected_file(real) if real.exists() else None
    if what:
        raise OutputError(f"{flag} {target} is {what}; a run's own files are never overwritten, not even with --force: "
                          f"choose another {flag}")
    if target.exists() and not force:
        raise OutputError(f"{target} already exists; pass --force to overwrite it or choose another {flag}")
    return target


def check_output_dir(path: str | os.PathLike[str], flag: str, need_bytes: int = MIN_FREE_BYTES) -> Path:
    """An output folder (existing or to be created), checked before any work; nothing is written."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{flag} is empty; give a folder path")
    folder = Path(text)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder} is a file, not a folder; pass a folder path")
    probe_folder(folder, flag, need_bytes)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[BinaryIO]:
    """Write ``path`` atomically: yield a binary file in the target folder, publish it only when complete.

    On success the data is fsynced and the temporary file becomes ``path`` (``os.replace``; with
    ``overwrite=False`` a no-clobber link, so a file that appeared meanwhile is never replaced).
    On any failure the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (then keep it beside, under a free name, and say so)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        kept = path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}")
        os.replace(tmp, kept)
        raise OutputError(f"{path} appeared while we worked and was left as it is; the new output is in {kept}") from None
    except OSError as exc:  # a filesystem without hard links
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if path.exists():
            kept = path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}")
            os.replace(tmp, kept)
            raise OutputError(f"{path} appeared while we worked and was left as it is; the new output is in {kept}") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_output(path: str | os.PathLike[str], data: str | bytes, overwrite: bool = True) -> Path:
    """Write text or bytes to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, overwrite) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | os.PathLike[str], value: Any, overwrite: bool = True) -> Path:
    """``value`` as indented JSON with a final newline, written atomically: every JSON file the package writes."""
    return write_output(path, json.dumps(value, indent=2) + "\n", overwrite)


def holds_files(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` exists and holds anything but a lock file."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())


class FolderLock:
    """An exclusive, OS-released lock on a folder: ``flock`` on ``<folder>/.lock``.

    ``acquire()`` creates the folder (and its parents) if needed, then the lock file, and takes
    the lock without waiting; :class:`FolderBusy` names the holder's pid and command when another
    process has it. ``release()`` removes the lock file while still holding the lock, then the
    folders ``acquire()`` created if they are still empty, so a refused run leaves nothing behind.
    A process that dies (even by ``kill -9``) releases its lock with its open files. flock locks
    belong to an open file description: two ``FolderLock`` objects in one process exclude each
    other too.
    """

    def __init__(self, folder: str | os.PathLike[str], flag: str = "--out", what: str = "run folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.flag, self.what = flag, what
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            return self
        missing = []
        parent = Path(os.path.abspath(self.folder))
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created = [p for p in missing if p.is_dir()]
            for _ in range(100):  # retried only when a releasing holder removed the file under us
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_umask())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                    os.close(fd)
                    self._remove_created()
                    raise FolderBusy(f"{self.what} {self.folder} is in use by another process"
                                     f"{f' ({holder})' if holder else ''}; wait for it to finish or pass {self.flag} NEW") from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # we locked a file its previous holder unlinked: try again on the new one
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {_command()}\n".encode(), 0)
                self._fd = fd
                return self
            raise OutputError(f"could not lock {self.path}; it keeps disappearing (is another program deleting it?)")
        except OSError as exc:
            self._remove_created()
            raise OutputError(f"cannot write to {nearest_existing(self.folder)} ({exc.strerror or exc}); "
                              f"pass {self.flag} to a writable folder") from None

    def release(self) -> None:
        """Give the lock back (idempotent); remove the lock file and the folders we created if still empty."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def _command() -> str:
    """This process's command line, short (``python -m robust.cli`` and the console script both read as robust)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    text = " ".join(["robust" if name in ("__main__.py", "robust") else name, *sys.argv[1:]])
    return text if len(text) <= 200 else text[:197] + "..."
