"""Atomic writes: every file and folder the package writes goes through this module.

Two primitives, with one guarantee: an interruption at any instant (exception, kill, power cut) leaves either the
complete old state or the complete new one.

* :func:`write_file` - one file: written to a hidden temporary file in the same folder, flushed to disk, then
  renamed over the target (``os.replace`` is atomic on POSIX and Windows).
* :func:`commit_folder` - a set of files in a folder (a model checkpoint, a Trainer checkpoint, a Core ML
  package). The new files are staged in a hidden folder *inside* the target (same file system, so a mount point
  works and nothing outside the target is touched), then a commit record (a journal) is written atomically: that
  instant is the commit. Applying the journal renames the staged entries in one at a time (``config.json``
  last) and removes the stale files the caller owns (e.g. weight shards of an earlier, larger model). Files the
  caller does not own (a tokenizer, a ``checkpoint-500/`` folder, a project's sources) are never touched.
  :func:`recover_folder` - called by the next save and by every load - rolls a committed journal forward and
  removes staging folders that never reached their commit, so a reader never sees a mix of old and new files.

Only the main process writes: callers pass ``is_main_process``; on other ranks nothing is written or removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from typing import Callable, Iterable, Optional, Union

logger = logging.getLogger(__name__)

#: prefix of every temporary entry this module creates; :func:`recover_folder` owns exactly these names
TEMP_PREFIX = ".edkm-"
STAGING_PREFIX = TEMP_PREFIX + "staging-"
TRASH_PREFIX = TEMP_PREFIX + "trash-"
JOURNAL_NAME = TEMP_PREFIX + "commit.json"
#: the 0.1 save protocol renamed the whole folder aside; a crash could leave the model only in such a folder
LEGACY_RETIRED_PREFIX = ".edkm-old-"
JOURNAL_VERSION = 1

Content = Union[bytes, str, Callable[[object], None]]


# ------------------------------------------------------------------------------------------------ helpers
def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(path: str) -> None:
    if os.name != "posix":
        return
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


def _normalize_modes(path: str) -> None:
    """Give everything staged under ``path`` the user's normal permissions (some writers, safetensors among
    them, create 0600 files; a folder from ``mkdtemp`` is 0700)."""
    file_mode = _default_file_mode()
    folder_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r is granted
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), folder_mode)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, file_mode)


def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` (and the folders themselves) to disk."""
    for root, dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if os.path.islink(full):
                continue
            with open(full, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


try:
    import fcntl
except ImportError:  # Windows: no advisory locks; staging folders are then only removed once a day old
    fcntl = None

#: without fcntl, a staging folder older than this is taken as abandoned
_ABANDONED_AFTER_S = 24 * 3600


@contextlib.contextmanager
def _folder_lock(path: str, blocking: bool = True):
    """An exclusive advisory lock on the folder itself (no lock file is left behind): serialises concurrent
    saves and the recovery a load performs, and marks a staging folder as in use by a live process (the kernel
    drops the lock when the process dies). Yields False when ``blocking=False`` and another process holds it."""
    if fcntl is None:
        yield True
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _abandoned(staging: str) -> bool:
    """A staging folder whose writer is gone (its lock is free), so it can never reach its commit."""
    if fcntl is None:
        return time.time() - os.path.getmtime(staging) > _ABANDONED_AFTER_S
    with _folder_lock(staging, blocking=False) as acquired:
        return acquired


def resolve_target_folder(path: Union[str, os.PathLike], what: str = "save directory") -> str:
    """The real folder ``path`` names (a symlink is followed, so the folder it points to is updated); refuses a
    path that is an existing regular file (or anything else that is not a folder), naming it."""
    path = os.path.abspath(os.fspath(path))
    real = os.path.realpath(path)
    if os.path.lexists(real) and not os.path.isdir(real):
        kind = "a regular file" if os.path.isfile(real) else "not a folder"
        raise FileExistsError(
            f"the {what} {path!r} is {kind}"
            + (f" (it resolves to {real!r})" if real != path else "")
            + "; pass a folder path (nothing was written or moved)"
        )
    return real


def makedirs(path: str) -> None:
    """``os.makedirs`` with the user's normal permissions (umask), never 0700."""
    os.makedirs(path, exist_ok=True)


# ------------------------------------------------------------------------------------------------ one file
def write_file(
    path: Union[str, os.PathLike], content: Content, *, binary: Optional[bool] = None, encoding: str = "utf-8"
) -> str:
    """Write ``content`` (bytes, text, or a callable given the open file) to ``path`` atomically.

    The file keeps the permissions of the file it replaces (or the user's default ones for a new file).
    Returns the path.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    makedirs(folder)
    if binary is None:
        binary = isinstance(content, (bytes, bytearray, memoryview))
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.isfile(path) else _default_file_mode()
    fd, temporary = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": encoding})) as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(folder)
    return path


def write_json(path: Union[str, os.PathLike], document, *, indent: int = 2, default=None) -> str:
    """``json.dump`` to ``path`` atomically (sorted keys are not imposed; ends with a newline)."""
    text = json.dumps(document, indent=indent, default=default) + "\n"
    return write_file(path, text)


# ------------------------------------------------------------------------------------------------ a folder
def _journal_path(folder: str) -> str:
    return os.path.join(folder, JOURNAL_NAME)


def _remove_entry(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _apply_journal(folder: str, journal: dict) -> None:
    """Roll a committed journal forward. Idempotent: every step checks what is already done."""
    staging = os.path.join(folder, journal["staging"])
    for name in journal["remove"]:
        path = os.path.join(folder, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.unlink(path)
    for name in journal["install"]:
        source = os.path.join(staging, name)
        if not os.path.lexists(source):
            continue  # installed before the interruption
        target = os.path.join(folder, name)
        if os.path.isdir(target) and not os.path.islink(target):
            # a folder cannot be renamed over a non-empty folder: move the old one into the staging area first
            os.replace(target, os.path.join(staging, f"{TRASH_PREFIX}{uuid.uuid4().hex[:8]}-{name}"))
        os.replace(source, target)
    _fsync_dir(folder)
    os.unlink(_journal_path(folder))
    _fsync_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)


def _read_journal(folder: str) -> Optional[dict]:
    path = _journal_path(folder)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            journal = json.load(handle)
        if (
            journal.get("version") != JOURNAL_VERSION
            or not isinstance(journal.get("install"), list)
            or not isinstance(journal.get("remove"), list)
            or not str(journal.get("staging", "")).startswith(STAGING_PREFIX)
        ):
            raise ValueError("unexpected content")
        for name in journal["install"] + journal["remove"]:
            if not isinstance(name, str) or os.sep in name or name in ("", ".", ".."):
                raise ValueError(f"bad entry name {name!r}")
        return journal
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"the commit record {path!r} of an interrupted save is unreadable ({error}); it was not written by "
            f"optimum-edkm {JOURNAL_VERSION}: inspect the folder, then delete that file to continue"
        ) from None


def recover_folder(folder: Union[str, os.PathLike]) -> Optional[str]:
    """Finish or clean up what an interrupted :func:`commit_folder` left in ``folder``.

    A committed journal is rolled forward (the new files were complete before the commit); staging folders
    without a journal never reached their commit and are removed, as are this module's temporary files. A
    ``folder`` missing while exactly one folder retired by the 0.1 save protocol (``.edkm-old-*`` beside it)
    exists is restored from it. Returns ``"rolled-forward"``, ``"cleaned"``, ``"restored"`` or ``None``.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        return _restore_legacy(folder)
    outcome = None
    with _folder_lock(folder):
        journal = _read_journal(folder)
        if journal is not None:
            _apply_journal(folder, journal)
            logger.warning("completed an interrupted save in %s (its commit record was written)", folder)
            outcome = "rolled-forward"
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.startswith(STAGING_PREFIX) and os.path.isdir(path) and not os.path.islink(path):
                if _abandoned(path):
                    shutil.rmtree(path, ignore_errors=True)
                    outcome = outcome or "cleaned"
            elif name.startswith(TEMP_PREFIX) and name.endswith(".tmp") and _stale_temporary(path):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                outcome = outcome or "cleaned"
    return outcome


def _stale_temporary(path: str) -> bool:
    # a temporary file of write_file is renamed within moments; one that lingers belongs to a dead writer
    try:
        return time.time() - os.path.getmtime(path) > 600
    except OSError:
        return False


def _restore_legacy(folder: str) -> Optional[str]:
    parent = os.path.dirname(folder)
    if not os.path.isdir(parent):
        return None
    retired = [
        name
        for name in os.listdir(parent)
        if name.startswith(LEGACY_RETIRED_PREFIX) and os.path.isdir(os.path.join(parent, name))
    ]
    if len(retired) != 1:
        return None
    os.replace(os.path.join(parent, retired[0]), folder)
    logger.warning("restored %s from %s, left by an interrupted optimum-edkm 0.1 save", folder, retired[0])
    return "restored"


def commit_folder(
    folder: Union[str, os.PathLike],
    stage: Callable[[str], None],
    *,
    owns: Callable[[str], bool] = lambda name: False,
    last: Iterable[str] = ("config.json",),
    what: str = "save directory",
) -> str:
    """Replace files of ``folder`` by the files ``stage(staging_folder)`` writes, atomically (see module doc).

    Args:
        folder: the target folder (created if missing; a symlink is followed; a regular file is refused).
        stage: writes the new entries (files or folders) into the staging folder it is given.
        owns: ``owns(name)`` is True for an existing top-level entry of ``folder`` that belongs to what is being
            saved and must be removed when the new save does not write it (e.g. a stale weight shard).
        last: entries installed last, in this order (``config.json``: a reader that checks it first never sees a
            new config beside old weights).
    Returns the real path of the folder.
    """
    folder = resolve_target_folder(folder, what)
    created = not os.path.isdir(folder)
    makedirs(folder)
    recover_folder(folder)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder)
    with _folder_lock(staging):  # marks the staging folder as alive for recover_folder
        try:
            stage(staging)
            _normalize_modes(staging)
            _fsync_tree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created:  # a failed first save leaves no empty folder behind
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            raise
        _install(folder, staging, owns, last)
    return folder


def _install(folder: str, staging: str, owns: Callable[[str], bool], last: Iterable[str]) -> None:
    with _folder_lock(folder):
        last = list(last)
        entries = sorted(os.listdir(staging))
        order = [name for name in entries if name not in last] + [name for name in last if name in entries]
        stale = sorted(
            name
            for name in os.listdir(folder)
            if not name.startswith(TEMP_PREFIX)
            and name not in entries
            and owns(name)
            and (os.path.isfile(os.path.join(folder, name)) or os.path.islink(os.path.join(folder, name)))
        )
        journal = {"version": JOURNAL_VERSION, "staging": os.path.basename(staging), "install": order, "remove": stale}
        write_json(_journal_path(folder), journal)  # the commit point
        _apply_journal(folder, journal)
