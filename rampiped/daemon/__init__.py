"""The daemon: its command line and `main`, the one place that turns a start-up failure into
a message and an exit status. The daemon itself is built in layers, one concern a module, each
importing only those below it:

* `worker` (the thread that runs slow jobs) and `notify` (systemd notifications);
* `state`: the daemon's collaborators and state, built in one place, and the facts every
  concern reads (the RAM budget, what fanotify watches, a candidate's filesystem facts);
* `jobs`: submitting pins, unpins and checkpoints to the worker and taking their results in;
* `status` (the STATUS line, `status --json`, `explain`), `reload` (signals, reload, watch
  roots and static pins), `sleep` (checkpoints before sleep and at a session's end) and
  `stop` (the final write-back of every pin);
* `requests`: the control socket's requests;
* `loop`: the `Daemon` itself, its start-up and its loop.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os

import psutil

from rampiped import __version__, config, ramarea
from rampiped import log as logsetup
from rampiped.daemon.loop import Daemon
from rampiped.errors import EXIT_CONFIG, EXIT_FAILURE

__all__ = ["Daemon", "build_parser", "main", "parse_args"]

log = logging.getLogger("rampiped")


def build_parser() -> argparse.ArgumentParser:
    """The daemon's command line (its manual page is generated from it too)."""
    p = argparse.ArgumentParser(
        prog="rampiped",
        description="Keeps write-hot directories in RAM and writes them back to disk, safely.",
    )
    p.add_argument(
        "--config",
        default=config.DEFAULT_PATH,
        metavar="PATH",
        help="configuration file (default %(default)s)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="watch and log every decision; mount nothing"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        metavar="LEVEL",
        help="the least important messages logged, one of %(choices)s; debug adds"
        " checkpoints and per-decision detail (default %(default)s)",
    )
    p.add_argument("--version", action="version", version=f"rampiped {__version__}")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logsetup.setup(args.log_level)
    if os.path.exists(args.config) or args.config != config.DEFAULT_PATH:
        try:
            cfg = config.load(args.config, memory_total=psutil.virtual_memory().total)
        except config.ConfigError as exc:
            for line in str(exc).splitlines():
                log.error("%s", line)
            log.error("not starting: %s is invalid", args.config)
            return EXIT_CONFIG
    else:
        log.info("%s does not exist: running with the built-in defaults", args.config)
        cfg = config.Config(source=args.config)
    if os.geteuid() != 0:
        log.error("rampiped needs root (fanotify, mounts)")
        return EXIT_FAILURE
    unusable = None if args.dry_run else ramarea.check(ramarea.backend_of(cfg.ram))
    if unusable is not None:
        log.error("not starting: %s", unusable)
        return EXIT_CONFIG
    try:
        daemon = Daemon(cfg, dry_run=args.dry_run)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    try:
        daemon.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        if exc.errno in (errno.EPERM, errno.EACCES):
            log.error("rampiped needs root with CAP_SYS_ADMIN (fanotify, mounts)")
        daemon.shutdown()
        return EXIT_FAILURE
    return daemon.run()
