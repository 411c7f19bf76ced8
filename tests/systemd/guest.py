"""A Debian 12 machine booted with systemd in a container, for testing rampiped as a service.

The root tree comes from debootstrap once per package list and is cached under
/var/cache/rampiped-test (outside the repository); every session boots a copy of it, so a run
never changes the cache. systemd-nspawn runs without machined (`--register=no --keep-unit`),
shares the host's network (pip reaches PyPI) and is started from the test's private mount
namespace, so none of its mounts reach the host. Commands run inside through nsenter with the
namespaces of the container's init.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

SUITE = "bookworm"  # Debian 12, the release rampiped supports
VARIANT = "minbase"
# What `make install` needs in the guest, so that it never has to run apt-get there (install.sh
# still would, on a machine that lacks them): systemd as init (systemd-sysv) with dbus; Python
# with venv and headers, gcc, libc6-dev and make to build pyfanotify; rsync for write-back;
# util-linux (findmnt) and e2fsprogs as on a real machine; procps for ps/pgrep when debugging;
# ca-certificates for pip's TLS; libpam-systemd so that a login (su, login) opens a logind
# session, as on a real machine. Not the Python modules the Debian package depends on: its test
# installs them from Debian's .deb files (test_deb.py).
PACKAGES = (
    "ca-certificates",
    "dbus",
    "e2fsprogs",
    "gcc",
    "libc6-dev",
    "libpam-systemd",
    "make",
    "procps",
    "python3",
    "python3-dev",
    "python3-venv",
    "rsync",
    "systemd-sysv",
    "util-linux",
)
# Bump when the post-processing of the tree changes, so that the cache is rebuilt.
RECIPE = 1

CACHE_ROOT = Path(os.environ.get("RAMPIPED_TEST_CACHE", "/var/cache/rampiped-test"))
NSPAWN_STATE = Path("/run/systemd/nspawn")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class GuestError(AssertionError):
    """The guest could not be built, booted or commanded; the message says what ran."""


def tree_key() -> str:
    recipe = json.dumps({"suite": SUITE, "variant": VARIANT, "packages": PACKAGES, "r": RECIPE})
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def host_mirror() -> str:
    """The Debian mirror this host's apt uses for SUITE (never a name written in the code), or
    RAMPIPED_TEST_MIRROR when set."""
    override = os.environ.get("RAMPIPED_TEST_MIRROR")
    if override:
        return override
    apt = Path("/etc/apt")
    files = [apt / "sources.list"]
    files += sorted((apt / "sources.list.d").glob("*.sources"))
    files += sorted((apt / "sources.list.d").glob("*.list"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        entries = _deb822_entries(text) if path.suffix == ".sources" else _one_line_entries(text)
        for uris, suites in entries:
            if SUITE in suites:
                for uri in uris:
                    if uri.startswith(("http://", "https://", "file:/")):
                        return uri
    raise GuestError(
        f"no Debian {SUITE} mirror in the host's apt sources ({apt}/sources.list, "
        f"{apt}/sources.list.d/*): set RAMPIPED_TEST_MIRROR=<URL of a Debian mirror>"
    )


def _deb822_entries(text: str) -> list[tuple[list[str], list[str]]]:
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in paragraph.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            out.append((fields.get("uris", "").split(), fields.get("suites", "").split()))
    return out


def _one_line_entries(text: str) -> list[tuple[list[str], list[str]]]:
    out = []
    for line in text.splitlines():
        # deb [ option=value ... ] URI suite component...
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            out.append(([words[1]], [words[2]]))
    return out


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_tree() -> tuple[Path, float | None]:
    """The cached root tree, built first when missing; and the build time in seconds (None on
    a cache hit). The build goes to a temporary directory that is renamed when complete, so a
    killed build never passes for a cached tree."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    key = tree_key()
    final = CACHE_ROOT / f"debian-{SUITE}-{key}"
    with _flock(CACHE_ROOT / ".build.lock"):
        if final.is_dir():
            return final, None
        # Holding the lock, no other build runs: whatever .build-* exists was left by a killed
        # one (its debootstrap mounts died with its mount namespace).
        for stale in CACHE_ROOT.glob(".build-*"):
            _remove_tree(stale)
        build = CACHE_ROOT / f".build-{key}-{os.getpid()}"
        mirror = host_mirror()
        argv = [
            "debootstrap",
            f"--variant={VARIANT}",
            "--components=main",
            "--include=" + ",".join(PACKAGES),
            SUITE,
            str(build),
            mirror,
        ]
        started = time.monotonic()
        log = CACHE_ROOT / "debootstrap.log"
        with open(log, "w") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            _remove_tree(build)
            raise GuestError(f"{shlex.join(argv)} failed with exit {proc.returncode}:\n{tail}")
        # The downloaded packages are not needed in the tree; each session copies it.
        for deb in (build / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        (build / "etc/hostname").write_text("rampiped-test\n")
        os.rename(build, final)
        return final, time.monotonic() - started


def _remove_tree(path: Path) -> None:
    # --one-file-system: should anything still be mounted below, it is not descended into.
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _container_init(nspawn_pid: int) -> int | None:
    """The container's PID 1 (as seen from here): nspawn's child that is PID 1 in its own PID
    namespace and has executed the init program."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() != str(nspawn_pid):
            continue
        nspid = fields.get("NSpid", "").split()
        if len(nspid) >= 2 and nspid[-1] == "1" and fields.get("Name", "").strip() == "systemd":
            return int(entry)
    return None


class Guest:
    """One container, booted from `root` (a host directory), possibly several times."""

    def __init__(
        self, root: Path, name: str, workdir: Path, *, allow_fanotify: bool = True
    ) -> None:
        """`allow_fanotify=False`: nspawn's own system call filter stays as it is, refusing
        fanotify as a container on a Proxmox host or a plain systemd-nspawn does."""
        self.root = root
        self.allow_fanotify = allow_fanotify
        self.name = name
        self.workdir = workdir
        self.console = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self._console: IO[bytes] | None = None
        self.env = _guest_env()
        self.pip_cache = CACHE_ROOT / f"pip-{tree_key()}"

    # -- lifecycle ---------------------------------------------------------------------------

    def nspawn_argv(self) -> list[str]:
        argv = [
            "systemd-nspawn",
            "--boot",
            "--register=no",  # no machined on a host that is not booted with systemd
            "--keep-unit",  # nor a transient scope from the host's systemd
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--console=read-only",  # the boot messages go to console.log
        ]
        if self.allow_fanotify:
            # nspawn's seccomp filter refuses these with EPERM; rampiped needs them (fanotify,
            # and opening the directory handles its events carry).
            argv.append("--system-call-filter=fanotify_init fanotify_mark open_by_handle_at")
        bundle = _host_ca_bundle()
        if bundle:
            # The guest trusts what the host trusts (a proxy's CA, say), so pip works there.
            argv.append(f"--bind-ro={bundle}:{GUEST_CA_BUNDLE}")
        self.pip_cache.mkdir(parents=True, exist_ok=True)
        argv.append(f"--bind={self.pip_cache}:/root/.cache/pip")
        if Path("/run/systemd/system").is_dir():
            # On a host booted with systemd, run in a scope of our own that nspawn may manage
            # (it makes cgroups below it); --keep-unit then means that scope.
            argv = [
                "systemd-run",
                "--scope",
                "--quiet",
                "--property=Delegate=yes",
                f"--unit={self.name}",
                *argv,
            ]
        return argv

    def boot(self, timeout: float = 180) -> str:
        """Boot and wait until systemd has finished starting up; returns the state
        (`running`, or `degraded` when a unit failed)."""
        if self.proc is not None and self.proc.poll() is None:
            raise GuestError(f"{self.name} is already running")
        self._console = open(self.console, "ab")  # noqa: SIM115 (closed in _reap)
        argv = self.nspawn_argv()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a ^C meant for pytest must not reach the container
        )
        (self.workdir / "nspawn.pid").write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None:
                raise GuestError(
                    f"{shlex.join(argv)} exited with {self.proc.returncode} before booting:\n"
                    + self.console_tail()
                )
            if time.monotonic() > deadline:
                raise GuestError(f"no init in {self.name} after {timeout}s:\n{self.console_tail()}")
            # (`systemd-run --scope` executes nspawn in its own process: the pid is nspawn's.)
            self.leader = _container_init(self.proc.pid)
            time.sleep(0.05)
        state = ""
        while True:
            # Fails while systemd has not yet opened its private socket; retried.
            proc = self.run("systemctl is-system-running --wait", check=False, timeout=timeout)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return state
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise GuestError(
                    f"{self.name} did not finish booting (state {state!r}, "
                    f"{proc.stderr.strip()!r}):\n{self.console_tail()}"
                )
            time.sleep(0.2)

    def poweroff(self, timeout: float = 300) -> int:
        """`systemctl poweroff` inside, then wait for nspawn to exit; returns its exit status."""
        assert self.proc is not None
        self.run("systemctl poweroff", check=False, timeout=30)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(
                f"{self.name} still runs {timeout}s after `systemctl poweroff`:\n"
                + self.console_tail()
            ) from None
        return self._reap()

    def kill(self) -> None:
        """Kill the container at once (its init first: that ends its whole PID namespace)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            leader = self.leader or _container_init(self.proc.pid)
            if leader is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leader, signal.SIGKILL)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._reap()

    def _reap(self) -> int:
        assert self.proc is not None
        rc = self.proc.wait()
        self.leader = None
        if self._console is not None:
            self._console.close()
            self._console = None
        _forget_nspawn_state(self.root, self.name)
        return rc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def console_tail(self, chars: int = 4000) -> str:
        try:
            text = self.console.read_bytes().decode(errors="replace")
        except OSError:
            return "(no console output)"
        return re.sub(r"\x1b\[[0-9;]*m", "", text)[-chars:]

    # -- commands ----------------------------------------------------------------------------

    def run(
        self, command: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside, as root, in all the namespaces of the container's init
        and with a clean environment."""
        if self.leader is None:
            raise GuestError(f"{self.name} is not running: cannot run {command!r}")
        argv = [
            "nsenter",
            f"--target={self.leader}",
            "--all",
            "--root",
            "--wd",
            "--",
            "/usr/bin/env",
            "-i",
            *(f"{k}={v}" for k, v in self.env.items()),
            "/bin/sh",
            "-c",
            command,
        ]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, input=input
            )
        except subprocess.TimeoutExpired as e:
            raise GuestError(f"in {self.name}: {command!r} still ran after {timeout}s") from e
        if check and proc.returncode != 0:
            raise GuestError(
                f"in {self.name}: {command!r} exited with {proc.returncode}\n"
                f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
            )
        return proc

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside (through the guest's view, so mounts there count)."""
        self.run(
            f"mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)}.tmp && "
            f"chmod {mode:o} {shlex.quote(path)}.tmp && mv -f {shlex.quote(path)}.tmp "
            f"{shlex.quote(path)}",
            input=text,
        )

    def read(self, path: str) -> str:
        return self.run(f"cat {shlex.quote(path)}").stdout

    def host_path(self, guest_path: str) -> Path:
        """Where a guest path lies on the host's disk (what the guest's disk holds, below any
        mount the guest made)."""
        return self.root / guest_path.lstrip("/")


def _guest_env() -> dict[str, str]:
    env = {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "SYSTEMD_PAGER": "",
        "SYSTEMD_COLORS": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    if _host_ca_bundle():
        env["PIP_CERT"] = GUEST_CA_BUNDLE
    # A proxy or an index mirror that the host's pip uses applies to the guest's as well.
    for name in ("http_proxy", "https_proxy", "no_proxy", "PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def _host_ca_bundle() -> str | None:
    candidates = [os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().openssl_cafile]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return os.path.realpath(candidate)
    return None


def _forget_nspawn_state(root: Path, name: str) -> None:
    """nspawn leaves its bookkeeping in /run/systemd/nspawn when /run is not a tmpfs it may
    clear (it refuses to remove trees from a disk filesystem): remove ours."""
    with contextlib.suppress(OSError):
        shutil.rmtree(NSPAWN_STATE / "propagate" / name)
    with contextlib.suppress(OSError):
        st = os.stat(root)
        (NSPAWN_STATE / "locks" / f"inode-{st.st_dev}:{st.st_ino}").unlink()


# -- sessions --------------------------------------------------------------------------------


def runs_dir() -> Path:
    path = CACHE_ROOT / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def clean_stale_runs() -> list[str]:
    """Remove the copies (and kill the containers) of sessions that died without cleaning up.
    A session holds a lock on its directory for as long as it lives; a lock that can be taken
    belongs to a dead session."""
    removed = []
    for run in sorted(runs_dir().iterdir()):
        lock = run / "lock"
        try:
            f = open(lock, "a")  # noqa: SIM115 (closed below)
        except OSError:
            _remove_tree(run)
            continue
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live session
            _kill_stale_container(run)
            name = (run / "name").read_text().strip() if (run / "name").exists() else run.name
            _forget_nspawn_state(run / "root", name)
            _remove_tree(run)
            removed.append(str(run))
        finally:
            f.close()
    return removed


def _kill_stale_container(run: Path) -> None:
    try:
        pid = int((run / "nspawn.pid").read_text())
    except (OSError, ValueError):
        return
    # Only the process that still runs nspawn on this very directory (not a recycled pid).
    if not _alive(pid) or not any(str(run / "root") in arg for arg in _cmdline(pid)):
        return
    leader = _container_init(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(leader or pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def session_run() -> Iterator[Path]:
    """A directory for this session's copy, locked while the session lives and removed at
    the end."""
    run = runs_dir() / f"{os.getpid()}-{int(time.time())}"
    run.mkdir()
    with open(run / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield run
        finally:
            _remove_tree(run)


def copy_tree(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)], check=True)


def copy_checkout(repo: Path, dst: Path) -> None:
    """The files of the working tree (committed or not, minus what git ignores), as a source
    tree for `make install` in the guest."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    )
    for rel in sorted(set(proc.stdout.decode().split("\0")) - {""}):
        src = repo / rel
        if not src.is_file():  # deleted but not yet committed
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def journal(guest: Guest, *args: str) -> str:
    """The guest's journal, messages only (`journalctl -o cat ARGS`)."""
    argv = ["journalctl", "--no-pager", "-o", "cat", *args]
    return guest.run(shlex.join(argv), check=False).stdout


def pinned(guest: Guest, path: str) -> bool:
    """`rampipectl status` in the guest lists `path` as pinned (False while it cannot say)."""
    proc = guest.run("rampipectl status --json", check=False)
    if proc.returncode != 0:
        return False
    states = {p["path"]: p.get("state") for p in json.loads(proc.stdout)["pins"]}
    return bool(states.get(path) == "pinned")


def wait(
    guest: Guest,
    cond: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.25,
    state: Callable[[], str] | None = None,
) -> Any:
    """Poll `cond` until truthy; on timeout fail with the service's recent journal, after
    `state()` (more of the guest worth seeing) when given."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = journal(guest, "-u", "rampiped", "-n", "40")
            seen = state() if state is not None else ""
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; {seen}journal:\n{tail}"
            )
        time.sleep(interval)
