"""The names made in a directory tree while a test watches it (inotify(7)): what a reader of
the directory could have met, however briefly. inotify watches inodes, so a watch added
before a pin sees the disk directory's entries made below the pin too."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct

IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class NameWatch:
    """Every directory below `root` (as it is when made) watched for names created or moved
    in or out."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.dirs: dict[int, str] = {}
        try:
            for d, _, _ in os.walk(self.root):
                mask = IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO
                wd = _libc.inotify_add_watch(self.fd, os.fsencode(d), mask)
                if wd < 0:
                    raise OSError(ctypes.get_errno(), "inotify_add_watch", d)
                self.dirs[wd] = os.path.relpath(d, self.root)
        except BaseException:
            os.close(self.fd)
            raise

    def take(self) -> list[tuple[str, str]]:
        """The events since the last call: ("create" | "from" | "to", relative path)."""
        out: list[tuple[str, str]] = []
        while select.select([self.fd], [], [], 0)[0]:
            buf = os.read(self.fd, 1 << 16)
            i = 0
            while i < len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, i)
                name = os.fsdecode(buf[i + _EVENT.size : i + _EVENT.size + size].rstrip(b"\0"))
                i += _EVENT.size + size
                kind = "create" if mask & IN_CREATE else "from" if mask & IN_MOVED_FROM else "to"
                rel = os.path.normpath(os.path.join(self.dirs.get(wd, "?"), name))
                out.append((kind, rel))
        return out

    def made(self) -> set[str]:
        """The names created, or moved away, since the last call: a name a file was made under
        before its rename into place shows as both."""
        return {rel for kind, rel in self.take() if kind in ("create", "from")}

    def close(self) -> None:
        os.close(self.fd)
