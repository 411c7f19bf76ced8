"""rampiped's own names inside a user's directory during a write-back."""

from __future__ import annotations

# Inside the target directory (its filesystem, so moving an origin there is a rename).
STASH_NAME = ".rampiped-apply"
# In the pin's journal instead, when the apply reaches it and the directory through one private
# copy of their mount (links.LinkRoute): no name of rampiped's shows in the directory then.
JOURNAL_STASH = "moving"


# --- rampiped's own names in a user's directory ----------------------------------------------
#
# rsync writes each file as a temporary `.NAME.XXXXXX` next to it and renames it into place; a
# crash (kill -9, power cut) in between leaves that temporary in the user's directory, where
# nothing tells it from a user's file. So every rsync that writes into a pinned directory on
# disk gets a scratch directory of its own at the directory's top (--temp-dir: same
# filesystem, so the rename stays atomic), which exists only while rsync runs, and the
# start-up recovery removes what a crash left of it and of rampiped's other temporary names.
SCRATCH_NAME = ".rampiped-tmp"
# An overlay pin's upper root holds a whiteout of that name from the moment it is made (before
# the mount), so that the scratch directory of a write-back into its lower layer while it is
# still mounted (an unpin writes back before it unmounts) never shows through the overlay.
# Layer scans and journal generations leave that whiteout out: it is not a user's deletion.


# Between the unmount of an overlay and the end of its write-back the path shows the disk, and
# a process that opens a file anew there (a logger's open-append-close) writes into the disk
# file that the write-back is about to replace with the RAM version. Before the unmount,
# `touched_entries` records those disk files (through the lower layer, which nothing writes
# while it is mounted); right after it, `HeldFiles.hold` keeps their inodes alive with hard
# links in HOLD_NAME inside the target (same filesystem) and records the snapshot there, so a
# start after a crash can finish the job. The apply then writes those files itself: the RAM
# version into a new file, what was appended to the disk file so far after it, a rename over
# the name, and what arrived in the meantime after that (so lines stay in the order they were
# written, up to the moment of the rename). After the apply, `merge` carries what still came
# in, and what was not a plain append is kept as NAME.rampiped-conflict.
HOLD_NAME = ".rampiped-held"


CONFLICT_SUFFIX = ".rampiped-conflict"  # the name rampiped.handover uses too
