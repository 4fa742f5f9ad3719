"""What kind of filesystem a folder lives on, from statfs(2)'s f_type.

The daemon's promises were measured on local filesystems and on NFS (see
systemd/README.md, "Several hosts on one shared inbox"); on NFS some hold only
with settings the daemon cannot choose for itself (polling, the mount's
attribute caching), so the caller warns. Pure lookup, no side effects.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# From linux/magic.h.
NFS_SUPER_MAGIC = 0x6969
SMB2_MAGIC_NUMBER = 0xFE534D42
CIFS_MAGIC_NUMBER = 0xFF534D42
FUSE_SUPER_MAGIC = 0x65735546
NETWORK = {NFS_SUPER_MAGIC: "nfs", SMB2_MAGIC_NUMBER: "smb", CIFS_MAGIC_NUMBER: "cifs", FUSE_SUPER_MAGIC: "fuse"}


class _Statfs(ctypes.Structure):
    # struct statfs on 64-bit Linux: f_type first; the rest is not read.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def _libc():
    # The C library already loaded into this process; find_library would need
    # a writable temporary folder (and a compiler) to look.
    return ctypes.CDLL(None, use_errno=True)


def fs_type(path: Path) -> int | None:
    """statfs(path).f_type, or None where it cannot be read (not Linux, no such path)."""
    try:
        libc = _libc()
    except OSError:
        return None
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def network_fs(path: Path) -> str | None:
    """"nfs", "smb", "cifs" or "fuse" when `path` is on such a filesystem, else None."""
    t = fs_type(path)
    return NETWORK.get(t) if t is not None else None


def nfs_warnings(folders: dict[str, Path | None], *, polling: bool) -> list[str]:
    """One line per caveat that applies to these folders on NFS (the figures
    behind each are in systemd/README.md, "Several hosts on one shared inbox")."""
    on_nfs = {k: p for k, p in folders.items() if p is not None and network_fs(p) == "nfs"}
    if not on_nfs:
        return []
    out = []
    if "inbox" in on_nfs and not polling:
        out.append(f"inbox {on_nfs['inbox']} is on NFS: inotify does not see files other hosts write; "
                   "set polling = true")
    if "inbox" in on_nfs:
        out.append(f"inbox {on_nfs['inbox']} is on NFS: another host takes over this one's claims only once "
                   "its lock is released (its process ended and its NFS client is up); a host that "
                   "vanished holds them until the server drops its lock")
    return out
