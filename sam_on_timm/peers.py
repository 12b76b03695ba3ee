"""Which rank failed, when a distributed run loses one.

When a rank dies (killed, out of memory, a crash), the survivors' next collective fails inside the
communication backend (gloo: ``Connection reset by peer``; NCCL: a ``DistBackendError``), with a
traceback that names no rank. ``note_ranks()``, called once after the process group starts, records
each rank's host and process id; ``peer_failure(error)`` then turns such an error into one line that
names the rank that is gone (a rank on this host whose process has ended), or says that another
rank stopped where none can be named (a rank on another host).
"""
import os
import socket
import time
from typing import List, Optional, Tuple

__all__ = ['note_ranks', 'peer_failure', 'is_peer_failure']

_RANKS: List[Tuple[str, int]] = []   # (host, pid) per rank, from note_ranks()

# what the backends write when a peer's connection breaks (gloo raises a plain RuntimeError)
_MARKERS = ('gloo/transport', 'Connection reset by peer', 'Connection closed by peer', 'Broken pipe',
            'NCCL communicator was aborted')


def note_ranks() -> List[Tuple[str, int]]:
    """Every rank's (host, pid), gathered once (a collective: all ranks call it)."""
    import torch.distributed as dist
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (socket.gethostname(), os.getpid()))
    _RANKS[:] = [tuple(r) for r in ranks]
    return list(_RANKS)


def is_peer_failure(error: BaseException) -> bool:
    """``error`` is a broken collective of a live process group (not a bug of this rank's own)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, dist.DistError) or any(m in str(error) for m in _MARKERS)


def _ended(pid: int) -> bool:
    """The process has ended: gone, or a zombie its launcher has not reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] in ('Z', 'X')
    except (OSError, IndexError):
        return False


def peer_failure(error: BaseException, wait_s: float = 1.0) -> Optional[str]:
    """One line for a collective that failed because another rank stopped, or None (another error).

    The ranks on this host whose process has ended are named (checked for up to ``wait_s`` seconds: a
    rank that crashed closes its connections as it exits)."""
    if not is_peer_failure(error):
        return None
    import torch.distributed as dist
    rank, host = dist.get_rank(), socket.gethostname()
    local = [(r, pid) for r, (h, pid) in enumerate(_RANKS) if h == host and r != rank]
    deadline = time.monotonic() + wait_s
    while True:
        gone = [(r, pid) for r, pid in local if _ended(pid)]
        if gone or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(text) > 160:
        text = text[:157] + '...'
    if gone:
        who = ', '.join(f'rank {r} (pid {pid})' for r, pid in gone)
        return (f"{who} ended (killed or crashed: see its own output for the cause); rank {rank} stops too, "
                f"the checkpoints are those of the epochs completed before")
    return (f"another rank stopped (this rank {rank}'s collective failed: {text}); see the other ranks' output "
            f"for the cause; the checkpoints are those of the epochs completed before")
