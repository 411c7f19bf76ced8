"""Copy mode's write-back: checkpoints of a pin's RAM copy into the private bind of its
original directory, the final sync, SQLite databases through the online backup API, and the
write-back after the unmount (rampiped.copymode describes the pin and what is guaranteed).

The package, from the bottom up (each module imports only those before it): `snapshot`
(stamps of a tree), `results` (what its operations return and raise), `sides` (the RAM and
disk side of a pin, checked before anything is written), `atomic` (files written whole),
`databases`, `checkpoint` (checkpoints and the final sync), `window` (the disk as it was
before the unmount) and `window_write` (the write-back after it). Below it, imported by it
and importing nothing above: `rampiped.writeback`, `rampiped.ledger`, `rampiped.mounts`,
`rampiped.osutil`, `rampiped.tree`. `rampiped.copymode` (the copy into RAM) is above it.
"""
