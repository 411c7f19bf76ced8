"""Requests on the control socket (control.py carries them): status, explain, reload, sync,
pin, unpin and handover. A request that takes time is answered when its work is done."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from rampiped import control, engine, pins
from rampiped.daemon.reload import Reload
from rampiped.daemon.sleep import SleepCheckpoints
from rampiped.daemon.worker import SyncWait
from rampiped.errors import EXIT_CONFIG, EXIT_OK, EXIT_USAGE

log = logging.getLogger("rampiped")


class Requests(Reload, SleepCheckpoints):
    def _on_command(self, cmd: str, args: dict[str, Any], reply: control.Reply) -> None:
        now = time.monotonic()
        if cmd == "status":
            reply(control.ok(self.status(now)))
        elif cmd == "explain":
            reply(control.ok(self.explain(_arg_path(args), now)))
        elif cmd == "reload":
            problem = self.reload()
            reply(
                control.ok("reloaded") if problem is None else control.error(problem, EXIT_CONFIG)
            )
        elif self.stopping:
            reply(control.error("rampiped is stopping"))
        elif self.handover is not None:
            reply(control.error("rampiped is handing its pins over to the next rampiped"))
        elif cmd == "handover":
            self._cmd_handover(reply)
        elif cmd == "sync":
            self._cmd_sync(args, reply)
        elif cmd == "pin":
            self._cmd_pin(args, reply)
        elif cmd == "unpin":
            self._cmd_unpin(args, reply)
        else:
            reply(control.error(f"unknown command {cmd!r}", EXIT_USAGE))

    def _cmd_handover(self, reply: control.Reply) -> None:
        """Checkpoint every pin, wait for the worker to finish, answer, and exit leaving every
        pin mounted: the next rampiped adopts them as after a crash, with nothing written back
        or unmounted in between (the package's postinst asks for this before restarting the
        service on an upgrade)."""
        self.handover = reply
        self.handover_checkpointed = None
        log.info(
            "handing over: checkpointing %d pins, then exiting with them mounted for the next"
            " rampiped to adopt",
            len(self.pinmgr.pins),
        )

        def checkpointed(failed: set[str]) -> None:
            self.handover_checkpointed = failed

        self._checkpoint_all("handover", done=checkpointed)

    def _handover_step(self) -> None:
        """Exit once the handover's checkpoints are done and no job is queued or running."""
        if self.handover_checkpointed is None or self.worker.pending or self.running:
            return
        failed = sorted(self.handover_checkpointed)
        left = sorted(self.pinmgr.pins)
        for path in failed:
            log.warning(
                "handover: the checkpoint of %s failed; its data stays in RAM, mounted, for the"
                " next rampiped",
                path,
            )
        log.info("handed over %d pins, left mounted: %s", len(left), ", ".join(left) or "none")
        assert self.handover is not None
        self.handover(control.ok({"pins": left, "checkpoint_failed": failed}))
        self.handover = None
        self.exit_code = EXIT_OK
        self.abort = True

    def _cmd_sync(self, args: dict[str, Any], reply: control.Reply) -> None:
        """Checkpoint one pin or all. A pin busy with another operation (a checkpoint, an
        unpin) is checkpointed when that ends, if it ends within `wait` seconds; the answer
        comes once every checkpoint is done (the loop goes on meanwhile)."""
        wait = args.get("wait", control.SYNC_WAIT)
        number = isinstance(wait, (int, float)) and not isinstance(wait, bool)
        if not number or not 0 <= wait < float("inf"):  # NaN fails the comparison too
            reply(control.error(f"'wait' must be a number of seconds, not {wait!r}", EXIT_USAGE))
            return
        path = args.get("path")
        for st in list(self.pinmgr.stranded.values()):
            if not path or st.path == _arg_path(args):
                with self.pinmgr.lock:
                    st.retry_at = 0.0  # a stranded write-back is tried again at the next tick
        if path:
            path = _arg_path(args)
            if path in self.pinmgr.stranded:
                st = self.pinmgr.stranded[path]
                reply(
                    control.error(
                        f"{path} is not pinned: its earlier write-back has not completed"
                        f" ({engine.format_bytes(st.bytes)} in {st.where}: {st.error});"
                        " trying it again now (see the log)"
                    )
                )
                return
            if path not in self.pinmgr.pins:
                reply(control.error(f"{path} is not pinned"))
                return
            targets = [self.pinmgr.pins[path]]
        else:
            targets = list(self.pinmgr.pins.values())
        if not targets:
            reply(control.ok({"synced": [], "failed": []}))
            return
        results: dict[str, str | None] = {}

        def one(p: pins.Pin) -> Callable[[Any, BaseException | None], None]:
            def done(result: Any, exc: BaseException | None) -> None:
                if exc is None and result is not None and not result.ok:
                    results[p.path] = result.error
                else:
                    results[p.path] = str(exc) if exc else None
                if len(results) == len(targets):
                    failed = {k: v for k, v in results.items() if v}
                    body = {
                        "synced": sorted(k for k, v in results.items() if not v),
                        "failed": failed,
                    }
                    reply(
                        control.ok(body)
                        if not failed
                        else control.error(
                            "; ".join(f"{k}: {v}" for k, v in sorted(failed.items()))
                        )
                    )

            return done

        now = time.monotonic()
        for pin in targets:
            if pin.busy:
                kind = self.running.get(pin.path, "operation")
                log.debug(
                    "sync of %s waits for the running %s (at most %s)",
                    pin.path,
                    kind,
                    engine.format_duration(wait),
                )
                self.sync_waits.setdefault(pin.path, []).append(
                    SyncWait(now + wait, float(wait), one(pin))
                )
            else:
                self._submit_checkpoint(pin, "asked by rampipectl", reply=one(pin))

    def _cmd_pin(self, args: dict[str, Any], reply: control.Reply) -> None:
        path = _arg_path(args)
        mode = args.get("mode") or "overlay"
        if mode not in ("overlay", "copy"):
            reply(control.error(f"mode must be overlay or copy, not {mode!r}", EXIT_USAGE))
            return
        if path in self.pinmgr.pins or path in self.pending:
            reply(control.error(f"{path} is already pinned"))
            return
        refusal = self.engine.never_pin_reason(path)
        if refusal:
            reply(control.error(f"cannot pin {path}: {refusal}"))
            return

        def done(result: Any, exc: BaseException | None) -> None:
            reply(
                control.ok({"pinned": path, "mode": mode})
                if exc is None
                else control.error(str(exc))
            )

        self._submit_pin(
            path, mode, "manual", "asked by rampipectl", reopen=self._reopen_for(path), reply=done
        )

    def _cmd_unpin(self, args: dict[str, Any], reply: control.Reply) -> None:
        path = _arg_path(args)
        pin = self.pinmgr.pins.get(path)
        if pin is None:
            reply(control.error(f"{path} is not pinned"))
            return

        def done(result: Any, exc: BaseException | None) -> None:
            if exc is None:
                reply(
                    control.ok(
                        {
                            "unpinned": path,
                            "files": result.files,
                            "bytes": result.bytes,
                            "seconds": round(result.seconds, 3),
                        }
                    )
                )
            else:
                with self.pinmgr.lock:
                    pin.unpin_requested = True  # keep trying in the background
                reply(control.error(f"{exc} (rampiped keeps trying)"))

        if self.stopping:
            reply(control.error("rampiped is stopping: it writes every pin back to disk"))
        elif pin.busy or self.pending.get(path) == "pin" or path in self.unpin_waits:
            # a checkpoint (or the pin itself) is running: the unpin follows when it ends
            kind = self.running.get(path, "operation")
            log.debug("unpin of %s waits for the running %s", path, kind)
            self.unpin_waits.setdefault(path, []).append(done)
        else:
            self._submit_unpin(pin, "asked by rampipectl", reply=done)


def _arg_path(args: dict[str, Any]) -> str:
    path = args.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("a command's path must be absolute")
    return os.path.normpath(path)
