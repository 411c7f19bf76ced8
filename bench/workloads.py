"""The workloads, each timed on its own and reported as operations per second:

(a) logger: 4k writes, each followed by fsync (fio, so that the figure is the filesystem's and
    not the interpreter's);
(b) sqlite: a pmxcfs-like database (WAL, synchronous=NORMAL, ~300 rows, ~0.9 MB): each
    transaction replaces a row and bumps a version row; flat out, or paced (10/s for pmxcfs);
(c) small files: create, write 2 KiB, fsync, close (a cache), keeping the last 256;
(d) large sequential writes: 1 MiB writes into files of `file_mb`, fsync at the end of each.

Python workloads run in a child process (`python -m bench.workloads NAME DIR SECONDS`) so that
the benchmark's own threads never share an interpreter with them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.stick import fio

WORKLOADS = ("logger", "sqlite", "small_files", "large_seq")
LABELS = {
    "logger": "(a) 4k write + fsync",
    "sqlite": "(b) SQLite WAL tx",
    "small_files": "(c) small files + fsync",
    "large_seq": "(d) large sequential (MB/s)",
}
DB_NAME = "config.db"
DB_ROWS = 300
DB_BLOB = 3000  # bytes per row: 300 rows make ~0.9 MB, the size of a small pmxcfs database


def logger(directory: Path, seconds: float) -> dict[str, float]:
    """(a) fio: sequential 4k writes over a 4 MiB file, fsync after each (the file is reused
    from its start when full, like a rotated log)."""
    job = fio(
        directory,
        "--filename=logger.fio",
        "--rw=write",
        "--bs=4k",
        "--fsync=1",
        "--size=4m",
        "--invalidate=0",
        "--time_based",
        f"--runtime={max(1, round(seconds))}",
    )
    (directory / "logger.fio").unlink(missing_ok=True)
    return {"ops_per_s": float(job["write"]["iops"]), "ops": float(job["write"]["total_ios"])}


def seed_db(path: Path, rows: int = DB_ROWS, blob: int = DB_BLOB) -> None:
    """A pmxcfs-like database: a table of rows with blobs, and a version row."""
    rng = random.Random(1)
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS tree (inode INTEGER PRIMARY KEY, data BLOB)")
        con.execute("CREATE TABLE IF NOT EXISTS version (id INTEGER PRIMARY KEY, v INTEGER)")
        con.executemany(
            "INSERT OR REPLACE INTO tree VALUES (?, ?)",
            ((i, rng.randbytes(blob)) for i in range(rows)),
        )
        con.execute("INSERT OR REPLACE INTO version VALUES (0, 0)")
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


def _vm_config(rng: random.Random, vmid: int) -> str:
    mac = ":".join(f"{rng.randrange(256):02X}" for _ in range(3))
    return (
        f"boot: order=scsi0;ide2;net0\ncores: {rng.choice((1, 2, 4, 8))}\ncpu: x86-64-v2-AES\n"
        f"ide2: local:iso/debian-12.{rng.randrange(10)}.0-amd64-netinst.iso,media=cdrom,size=628M\n"
        f"memory: {rng.choice((1024, 2048, 4096, 8192))}\nmeta: creation-qemu=9.0.2,"
        f"ctime={1_700_000_000 + rng.randrange(10**7)}\nname: vm{vmid}\n"
        f"net0: virtio=BC:24:11:{mac},bridge=vmbr0,firewall=1\nnuma: 0\nostype: l26\n"
        f"scsi0: local-lvm:vm-{vmid}-disk-0,iothread=1,size={rng.choice((8, 16, 32, 64))}G\n"
        f"scsihw: virtio-scsi-single\nsmbios1: uuid={rng.getrandbits(128):032x}\n"
        f"sockets: 1\nvmgenid: {rng.getrandbits(128):032x}\n"
    )


def _status_json(rng: random.Random, node: str) -> str:
    return (
        f'{{"mode":"active","node":"{node}","results":{{}},"state":"active","timestamp":'
        f"{1_733_500_000 + rng.randrange(10**5)}}}"
    )


def seed_text_db(path: Path, vms: int = 2000) -> None:
    """A database holding what a Proxmox cluster's configuration database holds: text files
    (guest configurations, the cluster and storage configurations, users, status records, a
    certificate), one row each, in pmxcfs's table layout; about the size of seed_db's. For the
    RAM a compressed area takes for such data: seed_db's rows are random blobs."""
    rng = random.Random(5)
    nodes = ("pve1", "pve2", "pve3")
    files: list[tuple[str, str]] = [
        (
            "corosync.conf",
            "totem {\n  cluster_name: lab\n  config_version: 7\n  version: 2\n}\n"
            + "".join(
                f"node {{\n  name: {n}\n  nodeid: {i + 1}\n  quorum_votes: 1\n"
                f"  ring0_addr: 10.0.0.{i + 11}\n}}\n"
                for i, n in enumerate(nodes)
            ),
        ),
        (
            "storage.cfg",
            "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup\n\n"
            "lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n",
        ),
        (
            "user.cfg",
            "".join(
                f"user:user{i}@pve:1:0:First{i}:Last{i}:user{i}@example.com:::\n" for i in range(40)
            ),
        ),
        ("datacenter.cfg", "keyboard: en-us\nmigration: secure,network=10.0.0.0/24\n"),
        (
            "pve-root-ca.pem",
            "-----BEGIN CERTIFICATE-----\n"
            + "".join(rng.randbytes(48).hex()[:64] + "\n" for _ in range(28))
            + "-----END CERTIFICATE-----\n",
        ),
    ]
    for i in range(vms):
        files.append((f"nodes/{nodes[i % 3]}/qemu-server/{100 + i}.conf", _vm_config(rng, 100 + i)))
    for n in nodes:
        files.append((f"nodes/{n}/lrm_status", _status_json(rng, n)))
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(
            "CREATE TABLE IF NOT EXISTS tree (inode INTEGER PRIMARY KEY NOT NULL, parent INTEGER"
            " NOT NULL, version INTEGER NOT NULL, writer INTEGER NOT NULL, mtime INTEGER NOT NULL,"
            " type INTEGER NOT NULL, name TEXT NOT NULL, data BLOB)"
        )
        con.executemany(
            "INSERT OR REPLACE INTO tree VALUES (?, 0, ?, 1, ?, 8, ?, ?)",
            (
                (i + 1, i + 1, 1_733_500_000 + i, name, text.encode())
                for i, (name, text) in enumerate(files)
            ),
        )
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


def _image(path: Path) -> bytes:
    """The database at `path` as SQLite would write it whole (backup into memory)."""
    src = sqlite3.connect(path)
    mem = sqlite3.connect(":memory:")
    try:
        src.backup(mem)
        return mem.serialize()
    finally:
        src.close()
        mem.close()


def changed_bytes(workdir: Path, transactions: int, page: int = 4096) -> tuple[int, int]:
    """(bytes of the pages that differ, bytes of the database) after `transactions` of (b)'s
    transactions on a fresh seed_db database in `workdir`: what any write-back must put on
    the disk at a checkpoint after that many (the new content of every changed page), however
    it writes it. Run flat out; the pages changed do not depend on the pace."""
    path = workdir / "changed-pages.db"
    seed_db(path)
    before = _image(path)
    sqlite_tx(path, 3600.0, max_tx=transactions)
    after = _image(path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    size = max(len(before), len(after))
    differ = sum(
        1 for at in range(0, size, page) if before[at : at + page] != after[at : at + page]
    )
    return differ * page, len(after)


def sqlite_tx(
    path: Path,
    seconds: float,
    rate: float = 0.0,
    stop_file: Path | None = None,
    rows: int = DB_ROWS,
    blob: int = DB_BLOB,
    max_tx: int = 0,
) -> dict[str, float]:
    """(b) transactions on the database at `path`: flat out (rate 0) or paced at `rate` per
    second, for `seconds` or until `stop_file` exists (or `max_tx` are done)."""
    rng = random.Random(os.getpid())
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    try:
        while True:
            con.execute("BEGIN")
            con.execute(
                "INSERT OR REPLACE INTO tree VALUES (?, ?)",
                (rng.randrange(rows), rng.randbytes(blob)),
            )
            con.execute("UPDATE version SET v = v + 1 WHERE id = 0")
            con.execute("COMMIT")
            n += 1
            now = time.perf_counter()
            if now >= end or n == max_tx:
                break
            if rate:
                if stop_file is not None and stop_file.exists():
                    break
                ahead = t0 + n / rate - now
                if ahead > 0:
                    time.sleep(min(ahead, end - now))
    finally:
        con.close()
    elapsed = time.perf_counter() - t0
    return {"ops_per_s": n / elapsed, "ops": float(n), "seconds": elapsed}


def small_files(directory: Path, seconds: float, size: int = 2048) -> dict[str, float]:
    """(c) create, write, fsync, close; the file made 256 steps earlier is deleted."""
    data = b"c" * size
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    keep = 256
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        fd = os.open(directory / f"c{n}", flags, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        if n >= keep:
            os.unlink(directory / f"c{n - keep}")
        n += 1
        if n % 8 == 0 and time.perf_counter() >= end:
            break
    elapsed = time.perf_counter() - t0
    for i in range(max(0, n - keep), n):
        os.unlink(directory / f"c{i}")
    return {"ops_per_s": n / elapsed, "ops": float(n), "seconds": elapsed}


def large_seq(directory: Path, seconds: float, file_mb: int = 32) -> dict[str, float]:
    """(d) 1 MiB writes into files of `file_mb` MiB with an fsync at the end of each, until
    `seconds` have passed (at least one whole file); MB/s over the whole time."""
    chunk = os.urandom(1024 * 1024)
    total = 0
    files = 0
    t0 = time.perf_counter()
    while True:
        path = directory / f"large{files % 2}"
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        try:
            for _ in range(file_mb):
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        total += file_mb * 1024 * 1024
        files += 1
        if time.perf_counter() - t0 >= seconds:
            break
    elapsed = time.perf_counter() - t0
    for i in range(2):
        (directory / f"large{i}").unlink(missing_ok=True)
    return {"ops_per_s": total / elapsed / 1e6, "bytes": float(total), "seconds": elapsed}


LOG_NAMES = ("app", "syslog", "daemon")


def _lines(rng: random.Random, size: int, tag: str) -> bytes:
    out = bytearray()
    n = 0
    while len(out) < size:
        out += f"{n:08d} {tag} {rng.getrandbits(64):016x} request served in {n % 97} ms\n".encode()
        n += 1
    return bytes(out)


def seed_logs(root: Path) -> None:
    """A log directory as a system keeps it: for each of three logs four rotated files
    (never touched again; sizes and times differ, as they do after daily rotations) and the
    active one; a cache of small files; a state file. The same bytes every time."""
    rng = random.Random(7)
    root.mkdir(parents=True, exist_ok=True)
    day = 86400
    for name in LOG_NAMES:
        for k in range(1, 5):
            path = root / f"{name}.log.{k}"
            path.write_bytes(_lines(rng, 150_000 + 30_000 * k, f"{name}.{k}"))
            then = time.time() - k * day  # rotated daily: each older by a day
            os.utime(path, (then, then))
        (root / f"{name}.log").write_bytes(_lines(rng, 100_000, name))
    (root / "cache").mkdir(exist_ok=True)
    for i in range(20):
        (root / "cache" / f"c{i}").write_bytes(rng.randbytes(4096))
    (root / "state.json").write_bytes(rng.randbytes(4096).hex().encode())


def seed_access_logs(root: Path, files: int = 6, lines: int = 60_000) -> None:
    """Web server access logs as they are written (client, time, request, status, size,
    agent), with no random tokens: the text that a log directory mostly holds."""
    rng = random.Random(3)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(root / f"access{f}.log", "w") as out:
            for n in range(lines):
                ip = f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}"
                out.write(
                    f"{ip} - - [06/Dec/2026:21:{n // 1000 % 60:02d}:{n % 60:02d} +0000]"
                    f' "GET /api/v1/items/{rng.randrange(5000)} HTTP/1.1"'
                    f" {rng.choice((200, 200, 200, 304, 404))} {rng.randrange(100, 9000)}"
                    ' "-" "Mozilla/5.0 (X11; Linux x86_64)"\n'
                )


def log_day(dirs: list[Path], seconds: float, tick: float = 0.1) -> dict[str, float]:
    """The same changes in every directory of `dirs`, every `tick`: a line appended to each
    active log; every 2 s the state file rewritten (temporary file and rename); every 5 s a
    cache file added and the oldest removed; once, half-way, app.log rotated (renames and a
    delete). Directories made by seed_logs."""
    steps = max(1, int(seconds / tick))
    rotate_at = steps // 2
    t0 = time.perf_counter()
    for n in range(steps):
        for root in dirs:
            for name in LOG_NAMES:
                with open(root / f"{name}.log", "a") as f:
                    f.write(f"{n:08d} {name} tick {n} " + "x" * 80 + "\n")
            if n % 20 == 0:
                tmp = root / ".state.json.tmp"
                tmp.write_bytes(random.Random(n).randbytes(2048).hex().encode())
                os.rename(tmp, root / "state.json")
            if n % 50 == 0:
                (root / "cache" / f"c{20 + n // 50}").write_bytes(random.Random(n).randbytes(4096))
                (root / "cache" / f"c{n // 50}").unlink()
            if n == rotate_at:
                (root / "app.log.4").unlink()
                for k in (3, 2, 1):
                    os.rename(root / f"app.log.{k}", root / f"app.log.{k + 1}")
                os.rename(root / "app.log", root / "app.log.1")
                (root / "app.log").write_bytes(b"")
        ahead = t0 + (n + 1) * tick - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    return {"steps": float(steps), "seconds": time.perf_counter() - t0}


# A /var/log-like tree for real logrotate runs: (log, rotation style); "nginx/..." in a subdir
VARLOG = (
    ("syslog", "create"),
    ("auth.log", "create"),
    ("daemon.log", "compress"),
    ("nginx/access.log", "copytruncate"),
    ("nginx/error.log", "copytruncate"),
)


def seed_varlog(root: Path) -> None:
    """The tree of VARLOG with a day of each log and three older rotations, and a small SQLite
    state database (a service's). The same bytes every time."""
    rng = random.Random(11)
    for name, style in VARLOG:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_syslog_lines(rng, 120_000, name))
        for k in (1, 2, 3):
            rotated = path.with_name(f"{path.name}.{k}" + (".gz" if style == "compress" else ""))
            data = _syslog_lines(rng, 100_000 + 20_000 * k, f"{name}.{k}")
            rotated.write_bytes(gzip.compress(data, mtime=0) if style == "compress" else data)
    state = root / "app" / "state.db"
    state.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(state)
    try:
        con.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
        con.executemany("INSERT INTO kv VALUES (?, ?)", ((i, "x" * 200) for i in range(200)))
        con.commit()
    finally:
        con.close()


def logrotate_conf(root: Path) -> str:
    """A logrotate configuration for the tree of `root` (create, copytruncate, compress)."""
    out = []
    for name, style in VARLOG:
        how = {"create": "create 0640 root root", "copytruncate": "copytruncate"}.get(
            style, "create 0640 root root\n  compress"
        )
        out.append(f"{root / name} {{\n  rotate 3\n  missingok\n  {how}\n}}\n")
    return "".join(out)


def _syslog_lines(rng: random.Random, size: int, tag: str) -> bytes:
    out = bytearray()
    n = 0
    while len(out) < size:
        out += (
            f"Dec  7 01:{n // 60 % 60:02d}:{n % 60:02d} host {tag}[{rng.randrange(1, 9999)}]:"
            f" session {n} for user{n % 17} from 10.0.{n % 255}.{rng.randrange(255)} ok\n"
        ).encode()
        n += 1
    return bytes(out)


def varlog_day(
    dirs: list[Path], seconds: float, rotate_every: float, state_dir: Path, tick: float = 0.1
) -> dict[str, float]:
    """The same changes in every directory of `dirs` (each seeded by seed_varlog), every
    `tick`: a syslog-style line appended to each log; every second a row of the state
    database updated (its own transaction, journal_mode DELETE); every `rotate_every` seconds
    a real logrotate run (-f) over each tree, its state file in `state_dir`."""
    steps = max(1, int(seconds / tick))
    every = max(1, int(rotate_every / tick))
    t0 = time.perf_counter()
    rotations = 0
    for n in range(steps):
        for root in dirs:
            for name, _style in VARLOG:
                with open(root / name, "a") as f:
                    f.write(
                        f"Dec  7 02:00:{n % 60:02d} host {name}[{(n * 7919) % 9999}]: "
                        f"tick {n} {'ok' if n % 7 else 'warning: slow request'}\n"
                    )
            if n % 10 == 0:
                con = sqlite3.connect(root / "app" / "state.db", isolation_level=None)
                try:
                    con.execute("UPDATE kv SET v = ? WHERE k = ?", (f"{n}" * 20, n % 200))
                finally:
                    con.close()
        if n and n % every == 0:
            for i, root in enumerate(dirs):
                conf = state_dir / f"logrotate-{i}.conf"
                conf.write_text(logrotate_conf(root))
                subprocess.run(
                    ["logrotate", "-f", "-s", str(state_dir / f"logrotate-{i}.state"), str(conf)],
                    check=True,
                    capture_output=True,
                )
            rotations += 1
        ahead = t0 + (n + 1) * tick - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    return {
        "steps": float(steps),
        "rotations": float(rotations),
        "seconds": time.perf_counter() - t0,
    }


def run(name: str, directory: Path, seconds: float, **kw: Any) -> dict[str, float]:
    """Run workload `name` in `directory`: fio in place, the others in a child process."""
    if name == "logger":
        return logger(directory, seconds)
    argv = [sys.executable, "-m", "bench.workloads", name, str(directory), str(seconds)]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(
            f"workload `{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()}"
        )
    out: dict[str, float] = json.loads(proc.stdout)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="run one workload and print its figures as JSON")
    p.add_argument(
        "name", choices=[*[w for w in WORKLOADS if w != "logger"], "log_day", "varlog_day"]
    )
    p.add_argument("directory", type=Path)
    p.add_argument("seconds", type=float)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--stop-file", type=Path)
    p.add_argument("--file-mb", type=int, default=32)
    p.add_argument("--more-dirs", type=Path, nargs="*", default=[])
    p.add_argument("--rotate-every", type=float, default=60.0)
    p.add_argument("--state-dir", type=Path)
    args = p.parse_args(argv)
    if args.name == "varlog_day":
        result = varlog_day(
            [args.directory, *args.more_dirs], args.seconds, args.rotate_every, args.state_dir
        )
    elif args.name == "log_day":
        result = log_day([args.directory, *args.more_dirs], args.seconds)
    elif args.name == "sqlite":
        result = sqlite_tx(args.directory / DB_NAME, args.seconds, args.rate, args.stop_file)
    elif args.name == "small_files":
        result = small_files(args.directory, args.seconds)
    else:
        result = large_seq(args.directory, args.seconds, args.file_mb)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
