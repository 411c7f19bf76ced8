"""Volatile pins' `max_age`: systemd-tmpfiles removes the files nobody used for that long.

rampiped has no cleaner of its own. systemd-tmpfiles-clean.timer (15 minutes after boot, then
daily) runs `systemd-tmpfiles --clean`, which reads /run/tmpfiles.d/*.conf among others. For
the time of that run, and only then, /run/tmpfiles.d/rampiped.conf holds

    e /home/alice/.cache - - - 864000s       one line per volatile pin with max_age
    x /home/alice/.cache/app/index.db        one line per file that is open in it right now

written by `rampiped-tmpfiles write` (ExecStartPre= of systemd-tmpfiles-clean.service) and
removed by `rampiped-tmpfiles remove` (its ExecStopPost=); the generator (generator.py) puts
both into a drop-in for that service when a volatile pin has max_age. Why not a file that the
daemon keeps up to date, and why not the generator writing the lines itself:

* A generator runs before anything is mounted and may write only into its output directories,
  which systemd-tmpfiles does not read (systemd.generator(7)); nor can it know which files
  are open when the clean-up runs, a day later.
* An `e` line stays valid only while the pin's tmpfs covers the directory: once it is
  unmounted, the same line would delete old files on the disk below, which a volatile pin
  promises never to touch. A file that lived between clean-ups (a daemon killed with
  SIGKILL, an administrator's umount) would do exactly that at the next run. Written
  right before each run, the file names only what is a mounted tmpfs of rampiped's then.
* The unmount cannot slip in between: writing the file and unmounting a volatile pin both
  happen under a lock (LOCK_NAME in runtime_dir), and the daemon does not unmount a pin that
  the file names (the unpin is retried later, like one that is busy). So the file is written
  either before the unmount, and the unmount waits until the clean-up is over, or after it,
  and then it does not name the pin.

What "used" means: systemd-tmpfiles (252, Debian 12) removes a file when none of its access,
modification, status change and birth times is within the age, and an empty directory when
none of its access, modification and birth times is. The default, kept on purpose: a file just
copied in with old times (`cp -p`, `tar x`) has a new ctime and birth time and stays.

Open files: systemd-tmpfiles 252 does not look at them (newer versions skip only files locked
with flock(2)); on a tmpfs an unlinked file that is still open keeps its data for whoever
holds it, but others no longer find it by its name. So every file that a process holds open,
maps, or has as its working or root directory gets an `x` line (systemd-tmpfiles leaves paths
with a line of their own alone, a directory with everything in it). A file held by a process
whose path cannot be named (another mount namespace's view, a name with characters that a
tmpfiles.d line cannot carry safely) makes the whole pin skip this clean-up, which is the
careful answer, and is reported on stderr (the journal of systemd-tmpfiles-clean.service).
Directories that `keep` binds from the disk are other mounts: systemd-tmpfiles does not
descend into them.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rampiped import mounts
from rampiped.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from rampiped.osutil import write_atomic

if TYPE_CHECKING:
    from rampiped import config

PROG = "rampiped-tmpfiles"
AREA_FSTYPES = ("tmpfs", "ext4")  # a volatile pin's mount: ramarea.FSTYPES (not imported: light)
RUN_DIR = "/run/tmpfiles.d"  # read by systemd-tmpfiles (tmpfiles.d(5))
CONF_NAME = "rampiped.conf"
# In the daemon's runtime_dir (the helper reads the same configuration): see `unmount_guard`.
LOCK_NAME = "tmpfiles.lock"

# Characters a path in a line may hold: nothing that tmpfiles.d would read as a quote, an
# escape, a specifier (%), a glob (* ? [) or a separator; names with others are not named.
_PLAIN = re.compile(r"/[A-Za-z0-9._+,@=:/-]*", re.ASCII)


def plain(path: str) -> bool:
    """Whether `path` can stand as it is in a tmpfiles.d line."""
    return _PLAIN.fullmatch(path) is not None


def age_field(seconds: float) -> str:
    """The age field of a line: whole seconds, rounded up (at least 1s)."""
    return f"{max(1, math.ceil(seconds))}s"


@dataclass(frozen=True)
class Target:
    path: str  # a volatile pin, mounted (its tmpfs's mount point)
    max_age: float  # seconds
    spared: tuple[str, ...] = ()  # paths inside that are in use: left alone


def render(targets: list[Target], source: str) -> str:
    out = [
        f"# Written by {PROG} from {source} for one run of systemd-tmpfiles --clean, and",
        "# removed after it: the volatile pins with max_age that are mounted now, and the",
        "# files in them that are in use now (x: left alone).",
    ]
    for t in targets:
        out.append(f"e {t.path} - - - {age_field(t.max_age)}")
        out.extend(f"x {p}" for p in t.spared)
    return "\n".join(out) + "\n"


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def in_use(dev: int, proc: str = "/proc") -> tuple[set[str], list[str]]:
    """The paths (as this process sees them) of everything on the filesystem `dev` that a
    process holds: open files, mappings, working and root directories; and a description of
    each one held whose path is not known here (its path as its holder sees it)."""
    held: set[str] = set()
    unknown: list[str] = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        links = [f"{proc}/{name}/cwd", f"{proc}/{name}/root"]
        for sub in ("fd", "map_files"):
            with contextlib.suppress(OSError):
                links += [f"{proc}/{name}/{sub}/{n}" for n in os.listdir(f"{proc}/{name}/{sub}")]
        for link in links:
            try:
                st = os.stat(link)  # the object itself, wherever its holder reached it
                target = os.readlink(link)
            except OSError:
                continue  # gone, or not a file (sockets, pipes and anonymous memory)
            if st.st_dev != dev:
                continue
            if target.endswith(" (deleted)"):
                continue  # unlinked already: nothing left to remove
            try:
                here = os.stat(target)  # the same object, by that path, on our side?
            except OSError:
                here = None
            if here is not None and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
                held.add(target)
            else:
                unknown.append(f"pid {name}: {target}")
    return held, unknown


def targets(
    cfg: config.Config,
    expected_source: Callable[[str], str],
    say: Callable[[str], None],
    in_use: Callable[[int], tuple[set[str], list[str]]] = in_use,
) -> list[Target]:
    """The volatile pins with max_age that are a tmpfs of rampiped's right now (whose mount
    source is `expected_source(path)`), each with what is in use in it."""
    out: list[Target] = []
    for pin in cfg.pins:
        if pin.mode != "volatile" or pin.max_age is None:
            continue
        paths = sorted(glob.glob(pin.path)) if glob.has_magic(pin.path) else [pin.path]
        for path in paths:
            top = mounts.mount_at(path)
            if top is None or top.fstype not in AREA_FSTYPES or top.source != expected_source(path):
                continue  # not pinned now: the directory on disk is never cleaned
            where = top.mountpoint
            if not plain(where):
                say(f"{where}: not cleaned, a tmpfiles.d line cannot name it safely")
                continue
            held, unknown = in_use(top.dev)
            spared: set[str] = set()
            for p in sorted(held):
                if p == where:
                    continue  # the top is never removed
                if not _within(p, where):
                    unknown.append(f"{p} (the same file, reached by another path)")
                    continue
                while not plain(p):  # spare the nearest ancestor that can be named
                    p = os.path.dirname(p)
                if p == where:
                    unknown.append(f"a name in {where} that a tmpfiles.d line cannot carry")
                    break
                spared.add(p)
            if unknown:
                say(
                    f"{where}: not cleaned this time, in use where it cannot be named: {unknown[0]}"
                )
                continue
            out.append(Target(where, pin.max_age, tuple(sorted(spared))))
    return out


def _lock_fd(runtime_dir: str) -> int:
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(os.path.join(runtime_dir, LOCK_NAME), flags, 0o600)


@contextlib.contextmanager
def locked(runtime_dir: str) -> Iterator[None]:
    """Held while the file is written (and see `unmount_guard`)."""
    fd = _lock_fd(runtime_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _names(path: str, directory: str) -> bool:
    """Whether the file written for the running clean-up names `path`."""
    try:
        with open(os.path.join(directory, CONF_NAME), encoding="utf-8") as f:
            return any(line.split()[:2] == ["e", path] for line in f)
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def unmount_guard(path: str, runtime_dir: str, directory: str = RUN_DIR) -> Iterator[str | None]:
    """For the daemon, around the unmount of the volatile pin at `path`: yields None when it
    may unmount now (the lock is then held until the block ends, so no clean-up can name the
    pin meanwhile), or why not (a clean-up that names it runs, or the lock is taken: try again
    later). Never waits: the unmount is retried like a busy one."""
    fd = _lock_fd(runtime_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield f"{PROG} is listing the pins for systemd-tmpfiles --clean right now"
            return
        if _names(path, directory):
            yield "systemd-tmpfiles --clean is removing old files in it (max_age)"
            return
        yield None
    finally:
        os.close(fd)


def write(
    cfg: config.Config,
    expected_source: Callable[[str], str],
    say: Callable[[str], None],
    directory: str = RUN_DIR,
) -> list[Target]:
    with locked(cfg.runtime_dir):
        found = targets(cfg, expected_source, say)
        conf = os.path.join(directory, CONF_NAME)
        if found:
            os.makedirs(directory, mode=0o755, exist_ok=True)  # systemd makes it only if needed
            write_atomic(
                conf, render(found, cfg.source or "the built-in defaults").encode(), mode=0o644
            )
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(conf)
    return found


def remove(directory: str = RUN_DIR) -> None:
    """After the clean-up (no lock: a file that names less never does harm)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, CONF_NAME))


def _say(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """`rampiped-tmpfiles write|remove`: run by systemd-tmpfiles-clean.service (generator.py
    adds them). It never fails that service: whatever goes wrong, the pins are not cleaned."""
    args = sys.argv[1:] if argv is None else argv
    if args not in (["write"], ["remove"]):
        _say("usage: rampiped-tmpfiles write|remove (systemd-tmpfiles-clean.service runs it)")
        return EXIT_USAGE
    try:
        if args == ["remove"]:
            remove()
            return EXIT_OK
        from rampiped import config, pins  # here: a broken installation is reported

        source = os.environ.get("RAMPIPED_CONFIG") or config.DEFAULT_PATH
        try:
            cfg = config.load(source)
        except config.ConfigError as exc:
            _say(f"{source} is invalid, no volatile pin is cleaned: {exc}")
            remove()
            return EXIT_OK
        for t in write(cfg, lambda p: pins.SOURCE_PREFIX + pins.pin_id(p), _say):
            _say(f"{t.path}: files unused for {age_field(t.max_age)} go; {len(t.spared)} in use")
    except Exception as exc:
        _say(f"no volatile pin is cleaned: {type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):
            remove()
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
