"""rampipectl: asks the running daemon over its control socket, or checks a configuration."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import psutil

from rampiped import __version__, config, control, explain, top
from rampiped.engine import format_bytes, format_duration
from rampiped.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    InvalidConfig,
    RampipeError,
    UsageError,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rampipectl", description="Control and inspect rampiped.")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default {config.DEFAULT_PATH});"
        " its runtime_dir locates the control socket",
    )
    where.add_argument(
        "--socket", metavar="PATH", help="control socket path (instead of --config's)"
    )
    p.add_argument("--version", action="version", version=f"rampipectl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("status", help="what is pinned, RAM used, data not yet on disk")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s = sub.add_parser("sync", help="checkpoint every pin, or DIR, to disk now")
    s.add_argument(
        "dir", nargs="?", metavar="DIR", help="the pinned directory (default: every pin)"
    )
    s.add_argument(
        "--timeout",
        type=_duration,
        default=control.SYNC_WAIT,
        metavar="DURATION",
        help="how long to wait for an operation already running on a pin (a checkpoint, an"
        " unpin) before its checkpoint: 30s, 5m, ... (default"
        f" {format_duration(control.SYNC_WAIT)}); past it, exit 1",
    )
    s = sub.add_parser("pin", help="pin DIR now")
    s.add_argument("dir", metavar="DIR", help="the directory to pin")
    s.add_argument(
        "--mode",
        choices=["overlay", "copy"],
        default="overlay",
        metavar="MODE",
        help="how to pin DIR, one of %(choices)s: overlay puts a RAM layer over it (only files"
        " that change take RAM), copy copies it into RAM and mounts the copy over it"
        " (default %(default)s)",
    )
    s = sub.add_parser("unpin", help="write DIR back to disk and unpin it")
    s.add_argument("dir", metavar="DIR", help="the pinned directory")
    sub.add_parser("reload", help="reload the configuration (fails if it is invalid)")
    sub.add_parser(
        "handover",
        help="checkpoint every pin, then make the daemon exit leaving them mounted, for the"
        " next daemon to adopt (a package upgrade's restart)",
    )
    s = sub.add_parser("check-config", help="validate a configuration file")
    s.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help=f"the file to check (default: --config's, or {config.DEFAULT_PATH})",
    )
    s = sub.add_parser("explain", help="why DIR is or is not pinned")
    s.add_argument("dir", metavar="DIR", help="the directory, pinned or not")
    s.add_argument("--json", action="store_true", help="the daemon's raw facts")
    s = sub.add_parser("top", help="the hottest directories, live (q quits)")
    s.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between updates (default 1)",
    )
    return p


def _duration(text: str) -> float:
    try:
        return config.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    path = args.config or config.DEFAULT_PATH
    try:
        return config.load(path).control_socket
    except config.ConfigError:
        # a broken file must not stop us from reaching the daemon (that is how `reload`
        # reports what is wrong): take its runtime_dir if it can be read at all
        return config.Config(runtime_dir=_raw_runtime_dir(path)).control_socket


def _raw_runtime_dir(path: str) -> str:
    import yaml

    default = config.Config().runtime_dir
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return default
    value = doc.get("runtime_dir") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and value.startswith("/") else default


def _abs(path: str) -> str:
    return os.path.abspath(path)


def _request(
    args: argparse.Namespace,
    cmd: str,
    body: dict[str, Any] | None = None,
    timeout: float = control.ANSWER_WAIT,
) -> Any:
    response = control.call(_socket_path(args), cmd, body, timeout=timeout)
    if not response.get("ok"):
        code = response.get("code", EXIT_FAILURE)
        err = RampipeError(str(response.get("error", "failed")))
        err.exit_code = code if isinstance(code, int) else EXIT_FAILURE
        raise err
    return response.get("result")


def print_status(st: dict[str, Any]) -> None:
    ram = st.get("ram", {})
    print(
        f"rampiped {st.get('version')} (pid {st.get('pid')})"
        + ("  DRY RUN" if st.get("dry_run") else "")
        + ("  STOPPING" if st.get("stopping") else "")
    )
    print(
        f"RAM used by pins: {format_bytes(ram.get('used_bytes', 0))} of"
        f" {format_bytes(ram.get('max_bytes', 0))}"
    )
    zram = [p for p in st.get("pins", []) if p.get("ram_backend") == "zram"]
    if zram:
        stored, used = sum(p["stored_bytes"] for p in zram), sum(p["ram_bytes"] for p in zram)
        print(
            f"compressed (zram): {format_bytes(stored)} stored in {format_bytes(used)} of RAM"
            f" ({used / max(1, stored):.2f} RAM per byte)"
        )
    adaptive = st.get("adaptive_pinning")
    if isinstance(adaptive, dict) and not adaptive.get("on", True):
        print(f"adaptive pinning: off ({adaptive.get('reason')})")
    pins = st.get("pins", [])
    if pins:
        print()
        print(
            f"{'PATH':<36} {'MODE':<8} {'STATE':<9} {'RATE/s':>8} {'RAM':>10} {'DIRTY':>10}"
            "  LAST SYNC"
        )
        for p in pins:
            last = p.get("last_sync")
            sync_text = (
                "never"
                if not last
                else (f"{last['time']} {'ok' if last['ok'] else 'FAILED'} {last['seconds']:.1f}s")
            )
            kind = "static" if p.get("static") else "adaptive"
            print(
                f"{p['path']:<36} {p['mode']:<8} {p['state']:<9} {p['rate']:>8.1f}"
                f" {format_bytes(p['ram_bytes']):>10} {format_bytes(p['dirty_bytes']):>10}"
                f"  {sync_text}  ({kind})"
            )
            whole = p.get("whole_file_bytes", 0)
            if whole:
                written = p.get("written_bytes", 0)
                print(
                    f"    checkpoints wrote {format_bytes(written)} where whole files would"
                    f" have been {format_bytes(whole)} ({1 - written / whole:.0%} spared)"
                )
            if p.get("error"):
                print(f"    {p['error']}")
    else:
        print("nothing pinned")
    for s in st.get("stranded", []):
        print()
        print(
            f"NOT WRITTEN BACK: {s['path']} lacks {format_bytes(s['bytes'])} that are only in"
            f" {s['where']} (since {s['since']}, {s['attempts']} attempts, next in"
            f" {s['next_retry_s']:.0f}s)"
        )
        print(f"    {s['error']}")
    cands = [c for c in st.get("candidates", []) if not c.get("pinned")]
    if cands:
        print()
        print("hottest candidates:")
        for c in cands:
            why = f"  ({c['blocked']})" if c.get("blocked") else ""
            print(f"  {c['path']:<36} {c['rate']:>8.1f}/s{why}")


def run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        raise UsageError(parser.format_usage().strip() + "\nrampipectl: a COMMAND is required")
    if args.command == "check-config":
        path = args.path or args.config or config.DEFAULT_PATH
        try:
            config.load(path, memory_total=psutil.virtual_memory().total)
        except config.ConfigError as exc:
            raise InvalidConfig(str(exc)) from exc
        print(f"{path}: valid")
        return EXIT_OK
    if args.command == "status":
        st = _request(args, "status")
        if args.json:
            json.dump(st, sys.stdout, indent=2, sort_keys=True)
            print()
        else:
            print_status(st)
    elif args.command == "sync":
        start = time.monotonic()
        body: dict[str, Any] = {"wait": args.timeout}
        if args.dir:
            body["path"] = _abs(args.dir)
        # the daemon answers after waiting (at most --timeout) and checkpointing
        res = _request(args, "sync", body, timeout=args.timeout + control.ANSWER_WAIT)
        print(f"synced {len(res['synced'])} pins in {time.monotonic() - start:.1f} s")
    elif args.command == "pin":
        _request(args, "pin", {"path": _abs(args.dir), "mode": args.mode})
        print(f"pinned {_abs(args.dir)} ({args.mode})")
    elif args.command == "unpin":
        res = _request(args, "unpin", {"path": _abs(args.dir)})
        print(
            f"unpinned {res['unpinned']}: wrote {res['files']} files,"
            f" {format_bytes(res['bytes'])} in {res['seconds']:.1f} s"
        )
    elif args.command == "reload":
        _request(args, "reload")
        print("reloaded")
    elif args.command == "handover":
        # the daemon answers after its checkpoints (bounded like a sync's), then exits
        res = _request(args, "handover", timeout=control.SYNC_WAIT + control.ANSWER_WAIT)
        print(f"handed over {len(res['pins'])} pins, left mounted: {' '.join(res['pins'])}")
        for path in res["checkpoint_failed"]:
            print(f"checkpoint of {path} failed: its data stays in RAM", file=sys.stderr)
    elif args.command == "explain":
        res = _request(args, "explain", {"path": _abs(args.dir)})
        if args.json:
            json.dump(res, sys.stdout, indent=2, sort_keys=True)
            print()
        else:
            for line in explain.sentences(res):
                print(line)
    elif args.command == "top":
        if args.interval <= 0:
            raise UsageError("rampipectl top: --interval must be above 0")
        return top.run(lambda: _request(args, "status"), interval=args.interval)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """The one place where errors become messages and exit statuses."""
    try:
        return run(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    except InvalidConfig as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except config.ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except RampipeError as exc:
        print(f"rampipectl: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except OSError as exc:
        print(f"rampipectl: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
