"""Writing a RAM layer back to disk: overlay upper layers, checkpoint journals, rsync.

An overlay upper layer is not a plain tree. Whiteouts (character devices 0:0) stand for deleted
names, `trusted.overlay.opaque` marks directories that replaced the disk's, and
`trusted.overlay.redirect` marks directories that were renamed (their disk content lives under
another path). `apply_upper` turns such a layer into plain changes of the directory on disk so
that the directory then holds what the merged view showed:

1. scan the layer and refuse (before touching anything) what it cannot apply faithfully: real
   device nodes, metacopy files, whiteouts in xattr form, malformed redirects;
2. move every redirect origin into a stash directory inside the target (same filesystem, so a
   rename; in the pin's journal when the apply reaches both through one copy of their mount),
   deepest first, then move each one to the place its directory was renamed to. A plan
   file in the stash records the progress, so an apply that was cut short (power loss) resumes
   instead of moving directories twice;
3. delete what whiteouts, opaque directories and type changes removed, fd-relative and without
   following symlinks;
4. copy everything else with rsync (no --delete anywhere: an empty layer deletes nothing);
5. make it durable (syncfs, or one journal commit where that takes every change before it:
   durable.fsync_commits_all), then verify that the disk shows every entry of the layer.

A real device node in a pinned tree is not supported: the layer is refused.

Checkpoints copy the upper layer of a mounted overlay, whiteouts and overlay xattrs included,
into a journal of generations on disk (`checkpoint`); after a crash the last complete generation
is applied with the same rules (`apply_journal`).

The package, from the bottom up (each module imports only those before it): `names`
(rampiped's own names in a directory), `layer` (reading a layer), `origins` (a layer with
its renamed directories where the disk holds them below the overlay), `scratch` (rsync's
temporary names), `moves` (renamed directories), `stamps` and `held` (the write-back
window), `verify`, `links` (a generation linked into place), `apply`, `carry` (a generation made
of the last one with what changed replaced), `fromlower` (a generation's files that are the
disk's own below the overlay, with their tails appended), `space` (whether a checkpoint and
its apply fit on the disk), `journal`. Below it,
imported by it and importing nothing above: `rampiped.commands`, `rampiped.fsops`,
`rampiped.osutil`, `rampiped.pause`.
"""

from __future__ import annotations

from rampiped.commands import (
    HUNG_EXIT,
    RSYNC_COPY,
    CommandResult,
    Runner,
    SyncError,
    communicate_watched,
    describe_exit,
    exclude_file,
    run_command,
    run_pass,
    source_churn_only,
)
from rampiped.pause import PAUSE_ENV, PAUSE_FILE_ENV, pause_point
from rampiped.writeback.apply import ApplyResult, apply_layer, apply_upper
from rampiped.writeback.fromlower import Below, reached
from rampiped.writeback.held import HeldFiles
from rampiped.writeback.holdplace import JOURNAL_HOLD, HoldPlace
from rampiped.writeback.journal import (
    CheckpointResult,
    apply_journal,
    checkpoint,
    discard_journal,
    latest_generation,
    rsync_stat,
)
from rampiped.writeback.layer import OVERLAY_FEATURES, renamed_dirs, scan_layer
from rampiped.writeback.links import LinkRoute
from rampiped.writeback.moves import holds_stashed
from rampiped.writeback.names import (
    CONFLICT_SUFFIX,
    HOLD_NAME,
    JOURNAL_STASH,
    SCRATCH_NAME,
    STASH_NAME,
)
from rampiped.writeback.origins import AtOrigins, at_origins
from rampiped.writeback.scratch import scratch_dir, scrub_leftovers
from rampiped.writeback.space import NoSpace, SpaceNeed, check_space, space_need
from rampiped.writeback.stamps import (
    CLOCK_SLACK_NS,
    Stamp,
    is_prefix,
    shared_stamp,
    stamp_of,
    touched_entries,
)
from rampiped.writeback.verify import verify_applied

__all__ = [
    "CLOCK_SLACK_NS",
    "CONFLICT_SUFFIX",
    "HOLD_NAME",
    "HUNG_EXIT",
    "JOURNAL_HOLD",
    "JOURNAL_STASH",
    "OVERLAY_FEATURES",
    "PAUSE_ENV",
    "PAUSE_FILE_ENV",
    "RSYNC_COPY",
    "SCRATCH_NAME",
    "STASH_NAME",
    "ApplyResult",
    "AtOrigins",
    "Below",
    "CheckpointResult",
    "CommandResult",
    "HeldFiles",
    "HoldPlace",
    "LinkRoute",
    "NoSpace",
    "Runner",
    "SpaceNeed",
    "Stamp",
    "SyncError",
    "apply_journal",
    "apply_layer",
    "apply_upper",
    "at_origins",
    "check_space",
    "checkpoint",
    "communicate_watched",
    "describe_exit",
    "discard_journal",
    "exclude_file",
    "holds_stashed",
    "is_prefix",
    "latest_generation",
    "pause_point",
    "reached",
    "renamed_dirs",
    "rsync_stat",
    "run_command",
    "run_pass",
    "scan_layer",
    "scratch_dir",
    "scrub_leftovers",
    "shared_stamp",
    "source_churn_only",
    "space_need",
    "stamp_of",
    "touched_entries",
    "verify_applied",
]
