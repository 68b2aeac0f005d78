"""The one way lora_jax writes files: complete or not at all, durable, and never over a user's file unless asked.

A file (:func:`write_atomic`) is written to a temporary file beside it,
``.NAME.<16 hex>.tmp``, flushed to disk (``fsync``), given its mode, and moved
over the target in one ``os.replace``; the folder is then flushed too. A
failure at any point leaves the previous file, if any, as it was.

Several files that belong together (:func:`write_directory_atomic`, e.g. a
PEFT folder's weights and config) are written to a temporary sibling folder,
``.DIR.<16 hex>.tmp``, which then takes the folder's place, so a reader never
sees new weights beside an old config.

Modes: a new file gets what ``open(path, "w")`` would give it (``0o666`` less
the umask; the kernel applies it when the temporary file is created), a new
folder what ``os.mkdir`` would; a replaced file or folder keeps its own mode.
A symbolic link is written through, as ``open`` would: its target is replaced,
the link stays.

Leftovers of a killed writer: a writer holds an exclusive ``flock`` on its
temporary file or folder for its whole life, and the kernel drops the lock when
the process dies. Every write first removes the temporary files and folders of
the same target (``.NAME.<token>.tmp``) that no process holds a lock on; a live
writer's are left alone. Where ``fcntl`` is missing (Windows) a leftover is
removed once it is older than :data:`STALE_AFTER`. A folder that a killed
writer left aside (``.DIR.<token>.old``, see :func:`write_directory_atomic`)
is put back in place, or merged into the new one, by the next write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from lora_jax.typing import PathLike

try:
    import fcntl
except ImportError:  # Windows: leftovers are recognised by their age instead
    fcntl = None

STALE_AFTER = 3600.0
"""Seconds after which a leftover temporary file is removed where file locks are unavailable (Windows)."""

# The random part of a temporary name: 16 hex digits. Nothing else is recognised, since a name a person chose
# (``.adapter.safetensors.20240101.old``) could match a looser pattern and would be removed or merged.
_TOKEN = r"[0-9a-f]{16}"
_POSIX = os.name != "nt"


def refuse_existing(paths: Iterable[PathLike], overwrite: bool) -> None:
    """Raise ``FileExistsError`` naming the first of ``paths`` that exists, unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def write_atomic(path: PathLike, write: Callable[[str], object], *, overwrite: bool = False) -> Path:
    """Write ``path`` through ``write(temporary_path)``, then move the result into place.

    Args:
      path: the file to write; its folder is created if missing.
      write: writes the complete content to the path it is given (into that file, not by replacing it).
      overwrite: replace an existing file; otherwise an existing file is an error.

    Returns:
      ``path`` as a ``Path``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      IsADirectoryError: ``path`` is a folder.
    """
    given = Path(path)
    refuse_existing([given], overwrite)
    target = Path(os.path.realpath(given))  # through a symbolic link, as open() writes
    if target.is_dir():
        raise IsADirectoryError(f"{given} is a folder; give the path of a file to write")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    with _temporary(target, folder=False) as (tmp, created_mode):
        write(str(tmp))
        _fsync(tmp)
        os.chmod(tmp, _mode(target, created_mode))
        os.replace(tmp, target)
    _fsync(target.parent)
    return given


def write_text(path: PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def write_bytes(path: PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; see :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)


def write_directory_atomic(
    directory: PathLike, files: Mapping[str, Callable[[str], object]], *, overwrite: bool = False
) -> Path:
    """Write several files into ``directory`` so that a reader sees all of them new or all of them old.

    Each ``files[name](temporary_path)`` writes one file into a temporary sibling
    folder ``.DIR.<token>.tmp``. When all are written and flushed, that folder
    takes ``directory``'s place. Everything else already in ``directory`` is
    carried over (hard links, or copies where the file system has none), and so
    is the folder's mode. The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux;
    elsewhere, or where the file system lacks it, two renames: the old folder
    goes aside to ``.DIR.<token>.old`` and the new one into place, so a crash
    between them leaves no ``directory`` but both complete folders, and the
    next write to ``directory`` puts the old one back first. ``directory`` is
    then a new folder (a process inside the old one stays in the old one).

    A folder that cannot be swapped (a mount point, or one whose parent is not
    writable) is written in place instead: all files to temporary files inside
    it, flushed, then each moved over its target in the order of ``files``; only
    a crash between two of those moves can leave some files new and others old.

    Args:
      directory: the folder to write into; created (with its parents) if missing.
      files: file name (no folder part) -> function that writes that file's complete content to the path it is given.
      overwrite: replace files of ``files`` that exist; otherwise the first that exists is an error.

    Returns:
      ``directory`` as a ``Path``.

    Raises:
      FileExistsError: one of the files exists in ``directory`` and ``overwrite`` is False (names it).
      NotADirectoryError: ``directory`` is a file.
      ValueError: a name in ``files`` is not a plain file name.
    """
    given = Path(directory)
    for name in files:
        if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
            raise ValueError(f"{name!r} is not a file name; write_directory_atomic writes files directly in {given}")
    target = Path(os.path.realpath(given))
    remove_leftovers(target)  # first: it may put back the folder a killed write left aside
    refuse_existing([given / name for name in files], overwrite)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{given} is a file; give a folder to write {', '.join(files)} into")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        for name in files:
            remove_leftovers(target / name)
    if target.is_dir() and os.path.ismount(target):  # a mount point cannot be renamed
        return _write_in_place(given, target, files)
    with contextlib.ExitStack() as stack:
        try:
            tmp, folder_mode = stack.enter_context(_temporary(target, folder=True))
        except PermissionError:  # the parent is not ours to write in; the folder may be
            if not target.is_dir():
                raise
            return _write_in_place(given, target, files)
        for name, write in files.items():
            path = tmp / name
            write(str(path))
            _fsync(path)
            os.chmod(path, _mode(target / name, folder_mode & 0o666))
        if target.is_dir():
            _carry_over(target, tmp, skip=set(files))
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            _fsync(tmp)
            _swap(tmp, target)
        else:
            _fsync(tmp)
            os.rename(tmp, target)
    _fsync(target.parent)
    return given


def remove_leftovers(path: PathLike) -> None:
    """Remove the temporary files and folders that killed writers of ``path`` left beside it.

    ``.NAME.<token>.tmp`` (a file or folder) is removed when no live writer holds
    its lock (where ``fcntl`` is missing: when it is older than
    :data:`STALE_AFTER`). ``.NAME.<token>.old``, a folder that
    :func:`write_directory_atomic` moved aside, goes back to ``path`` when
    ``path`` is missing, else what ``path`` lacks of it is moved into ``path``
    and the rest removed. Anything else, and anything that cannot be removed, is
    left as it is.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_TOKEN}\.(tmp|old)")
    try:
        entries = [entry for entry in os.scandir(path.parent) if pattern.fullmatch(entry.name)]
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink():
            continue
        leftover = Path(entry.path)
        with contextlib.suppress(OSError), _claim(leftover) as claimed:
            if not claimed:
                continue
            if leftover.name.endswith(".old"):
                if not leftover.is_dir():
                    continue  # only folders are set aside; this file is not ours
                if not path.exists():
                    os.rename(leftover, path)
                    continue
                _merge_into(leftover, path)
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                os.remove(leftover)


# -- temporary files and their locks ----------------------------------------------------------------------------


def _lock_fd(path: Path, *, wait: bool) -> int | None:
    """Open ``path`` and lock it (exclusive ``flock``); None where locks are unavailable, or held and not waited for."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        if wait:
            raise
        return None
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def _claim(leftover: Path) -> Iterator[bool]:
    """Hold a leftover's lock while it is removed; yield whether it is a leftover (no live writer holds it)."""
    if fcntl is None:
        yield time.time() - leftover.lstat().st_mtime > STALE_AFTER
        return
    fd = _lock_fd(leftover, wait=False)
    if fd is None:
        yield False
        return
    try:
        yield _same_file(fd, leftover)  # not removed and made again by someone else meanwhile
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temporary(target: Path, *, folder: bool) -> Iterator[tuple[Path, int]]:
    """Make and lock ``.NAME.<token>.tmp`` beside ``target``; yield it and the mode it was made with.

    The file is made with mode ``0o666`` and the folder with ``0o777``: the kernel
    takes the umask off, as for ``open(path, "w")`` and ``os.mkdir``. It is
    removed on the way out unless it was moved.
    """
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
        if folder:
            os.mkdir(tmp, 0o777)
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        fd = _lock_fd(tmp, wait=True)
        # A cleaner may have taken it between creation and lock: then it is gone, and we make another.
        if fd is None or _same_file(fd, tmp):
            break
        os.close(fd)
    try:
        yield tmp, stat.S_IMODE(os.stat(tmp).st_mode)
    finally:
        try:
            if folder and tmp.is_dir():
                shutil.rmtree(tmp)
            elif tmp.exists():
                os.remove(tmp)
        finally:
            if fd is not None:
                os.close(fd)


def _mode(path: Path, default: int) -> int:
    """Return the permission bits of ``path`` if it exists (a replaced file keeps its mode), else ``default``."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return default


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; where a folder cannot be opened or flushed, skip it."""
    if path.is_dir():
        if not _POSIX:
            return
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return
    fd = os.open(path, os.O_RDONLY if _POSIX else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- folders -------------------------------------------------------------------------------------------------------


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Put into ``new`` everything in ``old`` but the names in ``skip``: hard links where possible, else copies."""
    for entry in os.scandir(old):
        if entry.name in skip:
            continue
        destination = new / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, destination, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        else:
            _link_or_copy(entry.path, str(destination))


def _merge_into(old: Path, new: Path) -> None:
    """Move into ``new`` what ``old`` holds and ``new`` lacks (files made in the old folder during a swap)."""
    for entry in os.scandir(old):
        if not os.path.lexists(new / entry.name):
            os.rename(entry.path, new / entry.name)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    if not _POSIX:
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap(new: Path, target: Path) -> None:
    """Put the folder ``new`` in ``target``'s place; the old folder's late additions are merged, the rest removed."""
    held = _lock_fd(target, wait=True)  # the old folder: no cleaner takes it for a leftover while it is aside
    try:
        aside = target.parent / f".{target.name}.{secrets.token_hex(8)}.old"
        if _exchange(new, target):
            os.rename(new, aside)  # the old folder, now under the temporary name
        else:
            os.rename(target, aside)
            try:
                os.rename(new, target)
            except BaseException:
                os.rename(aside, target)
                raise
        _fsync(target.parent)
        # The new folder is in place: what fails from here on is settled by the next write (remove_leftovers).
        with contextlib.suppress(OSError):
            _merge_into(aside, target)
            shutil.rmtree(aside)
    finally:
        if held is not None:
            os.close(held)


def _write_in_place(given: Path, target: Path, files: Mapping[str, Callable[[str], object]]) -> Path:
    """Write ``files`` into ``target`` without a sibling folder: all to temporary files, then each moved in turn."""
    with contextlib.ExitStack() as stack:
        written = []
        for name, write in files.items():
            path = target / name
            tmp, created_mode = stack.enter_context(_temporary(path, folder=False))
            write(str(tmp))
            _fsync(tmp)
            os.chmod(tmp, _mode(path, created_mode))
            written.append((tmp, path))
        for tmp, path in written:
            os.replace(tmp, path)
    _fsync(target)
    return given
