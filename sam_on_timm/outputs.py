"""Where a run writes: the run folder's name, output files, and one writer per run folder.

- ``check_experiment_name``: ``--experiment`` names a folder *inside* ``--output``.
- ``check_output_file``: an output file (a JSON, a figure) can be written, checked before the work
  that produces it.
- ``RunLock``: an exclusive ``flock`` on ``<run folder>/train.lock``, held for the life of the run. The
  operating system releases it when the process ends in any way (a crash, SIGKILL), so the file a dead
  run leaves behind never blocks a resume; a second live run writing the same folder is refused.

Each check raises ``ValueError`` with one line (train.py reports it as its own error).
"""
import csv
import errno
import fcntl
import os
import socket
import tempfile
from typing import Optional

__all__ = ['LOCK_NAME', 'check_experiment_name', 'check_output_file', 'RunLock', 'lock_holder', 'trim_summary',
           'probe_folder']

LOCK_NAME = 'train.lock'


def check_experiment_name(name: str, flag: str = '--experiment') -> None:
    """``name`` is a relative folder path that stays inside the output folder: one or more folder names
    separated by '/' (sub-folders group runs, as in timm), none of them empty, '.' or '..'. An absolute
    path or '..' would put the run outside ``--output``. ``''`` (the default name) passes."""
    if not name:
        return
    if '\0' in name:
        raise ValueError(f'{flag} {name!r} holds a NUL character: pass a folder name')
    parts = name.replace(os.sep, '/').split('/')
    if os.path.isabs(name) or any(p in ('', '.', '..') for p in parts):
        raise ValueError(f"{flag} '{name}' must name a folder inside --output (folder names separated by '/', "
                         f"none of them empty, '.' or '..', not an absolute path): put the location in --output")


def probe_folder(target: str) -> str:
    """The nearest existing folder on the way to the folder ``target`` (itself, if it exists) takes a temporary
    file, removed at once; returns that folder. Nothing is created. NotADirectoryError: a component on the way is
    a file (the error's filename); OSError: the folder cannot be written (filename: the folder)."""
    existing = target
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise NotADirectoryError(errno.ENOTDIR, 'a file on the way', existing)
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), existing) from None
    return existing


def check_output_file(path: str, flag: str = '--output') -> None:
    """``path`` can be written as a file: it is not a folder, no component on the way is a file, and the
    nearest existing folder takes a temporary file (removed at once). Nothing is created."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ValueError(f"{flag} '{path}' is a folder: pass a file name")
    try:
        probe_folder(os.path.dirname(target))
    except NotADirectoryError as e:
        raise ValueError(f"{flag} '{path}': '{e.filename}' is a file, so it cannot hold '{target}'") from None
    except OSError as e:
        raise ValueError(f"{flag} '{path}' cannot be written ('{e.filename}': {e.strerror})") from None


def _describe(text: str) -> str:
    return text.strip() or 'a process that has not written its id yet'


def lock_holder(folder: str) -> Optional[str]:
    """Who holds ``folder``'s run lock ('pid N on HOST'), or None: no lock file, or one that no live process
    holds (left by a run that crashed or was killed). Takes nothing: the probe's lock is dropped at once."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _describe(os.pread(fd, 200, 0).decode('utf-8', 'replace'))
            return None   # a file system without flock: no lock to honour
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """One writer per run folder: ``acquire()`` takes an exclusive ``flock`` on ``folder/train.lock`` (the
    file is created if needed and keeps the holder's 'pid N on HOST' for the message another run gets),
    ``release()`` drops it. The file stays: removing it would let two processes lock two different files
    of the same name. A file system that does not support ``flock`` runs unlocked."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock, or ValueError naming the process that holds it."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):   # no flock here (some NFS)
                self._fd = fd
                return
            holder = _describe(os.pread(fd, 200, 0).decode('utf-8', 'replace'))
            os.close(fd)
            raise ValueError(f"output folder '{self.folder}' is in use by another run ({holder}): wait for it to "
                             f"end, or choose another --experiment / --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays, for the next run to lock)."""
        if self._fd is not None:
            os.close(self._fd)   # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> 'RunLock':
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def trim_summary(path: str, start_epoch: int) -> None:
    """Drop the rows of epochs >= ``start_epoch`` from a resumed run's summary.csv (rewritten whole, then
    renamed): an epoch whose checkpoint was never written (a full disk, a kill) is trained again, and
    its row is written again, once."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < start_epoch]
    if len(kept) == len(rows):
        return
    with open(path + '.tmp', 'w', newline='') as f:
        csv.writer(f).writerows(kept)
    os.replace(path + '.tmp', path)
