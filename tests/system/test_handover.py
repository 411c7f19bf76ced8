"""`rampipectl handover`, what the Debian package runs before it restarts the service on an
upgrade: the daemon checkpoints every pin and exits leaving them mounted; the next daemon adopts
them, and what was written in between (through a file held open all along) is in RAM and, after
the next stop, on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system import safety
from tests.system.daemon_harness import Daemon, make_env, running

pytestmark = pytest.mark.system


def test_handover_leaves_the_pins_mounted_for_the_next_daemon(tmp_path: Path) -> None:
    with make_env(tmp_path) as env:
        app, db = env.data / "app", env.data / "db"
        app.mkdir()
        db.mkdir()
        (app / "old.txt").write_text("disk\n")
        (db / "config.db").write_text("0\n")
        first = Daemon(env)
        try:
            first.wait_ready()
            env.ctl("pin", str(app), check=True)
            env.ctl("pin", str(db), "--mode", "copy", check=True)
            (app / "new.txt").write_text("ram\n")
            with open(db / "config.db", "a") as holder:  # held open across both daemons
                holder.write("1\n")
                holder.flush()
                out = env.ctl("handover", check=True).stdout
                assert out.strip() == f"handed over 2 pins, left mounted: {app} {db}"
                assert first.proc.wait(30) == 0
                again = env.ctl("handover")  # nobody answers now
                assert again.returncode == 3, again
                assert "checkpoint of" in first.log_text()
                assert env.overlay_at(app), "the overlay pin was unmounted"
                assert env.mounted_at(db) is not None, "the copy pin was unmounted"
                holder.write("2\n")  # no daemon runs: into RAM, as before
                holder.flush()
                with running(env) as second:
                    for path, mode in ((app, "overlay"), (db, "copy")):
                        second.wait_log(rf"adopted {path} \({mode}, manual\)")
                    pins = {p["path"]: p["state"] for p in env.status()["pins"]}
                    assert pins == {str(app): "pinned", str(db): "pinned"}
                    holder.write("3\n")
                    holder.flush()
                    holder.close()
                    assert second.stop() == 0
            assert env.mounted_at(app) is None and env.mounted_at(db) is None
            assert safety.no_leftover_mounts(env.runtime) == []
            assert (app / "new.txt").read_text() == "ram\n"
            assert (app / "old.txt").read_text() == "disk\n"
            assert (db / "config.db").read_text() == "0\n1\n2\n3\n"
        finally:
            first.kill()
