"""The benchmark's outputs: summary.json (flat keys), report.md and PNG charts.

summary.json's keys are a contract (the README and later runs compare against them); every
figure with a target is listed in TARGETS with how it is judged. A figure that misses its target
is reported as it is, with the reason and what would close it (WHY_MISSED).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

CONFIG_LABELS = {
    "disk": "(1) plain stick",
    "overlay": "(2) rampiped adaptive (overlay)",
    "copy": "(3) rampiped static copy pin",
    "tmpfs_copy": "(4) tmpfs copy + rsync (log2ram style)",
    "kernel_overlay": "(6) the kernel's overlay alone (a pin's options, no daemon)",
    "tmpfs": "(5) plain tmpfs",
}
WORKLOAD_LABELS = {
    "logger": "(a) 4k write + fsync, ops/s",
    "sqlite": "(b) SQLite WAL transactions/s",
    "small_files": "(c) small files + fsync, files/s",
    "large_seq": "(d) large sequential, MB/s",
}

# key, comparison, target (None: reported, no target; a string: another key's value + 1 s),
# what it is
TARGETS: list[tuple[str, str | None, float | str | None, str]] = [
    ("overlay_vs_tmpfs_fsync_ratio", ">=", 0.85, "(2) once pinned over (5) on (a)"),
    (
        "kernel_overlay_vs_tmpfs_fsync_ratio",
        None,
        None,
        "(6) the kernel's overlay alone, same options, over (5) on (a): what (2) can reach",
    ),
    ("overlay_small_files_vs_tmpfs_ratio", ">=", 0.55, "(2) once pinned over (5) on (c)"),
    (
        "kernel_overlay_small_files_vs_tmpfs_ratio",
        None,
        None,
        "(6) over (5) on (c)",
    ),
    ("copy_vs_tmpfs_fsync_ratio", ">=", 0.95, "(3) over (5) on (a)"),
    ("pinned_vs_disk_fsync_ratio", None, None, "(2) over (1) on (a)"),
    (
        "sqlite_device_write_reduction",
        ">=",
        20.0,
        "stick bytes during (b): (1) over (3) with a 5-minute checkpoint interval",
    ),
    ("sqlite_device_write_reduction_1m", ">=", 20.0, "the same with a 1-minute interval"),
    (
        "sqlite_device_write_reduction_1m_bound",
        None,
        None,
        "the most it can be: (1) over the new content of the pages that changed, per checkpoint",
    ),
    (
        "writeback_bytes_vs_log2ram_style",
        "<=",
        1.0,
        "stick bytes of (2) and (3) over (4), same changes (the larger of the two)",
    ),
    (
        "logrotate_bytes_vs_log2ram_style",
        None,
        None,
        "a /var/log with real logrotate runs: stick bytes of (2) and (3) over (4) (the larger)",
    ),
    (
        "logrotate_bytes_vs_plain_stick",
        None,
        None,
        "the same over the plain stick with no RAM at all (the larger)",
    ),
    (
        "checkpoint_bytes_20k_one_change",
        "<=",
        float(1 << 20),
        "stick bytes of a checkpoint of one changed file in a pin of 20,000 (the larger mode)",
    ),
    (
        "checkpoint_s_20k_one_change",
        "<=",
        1.0,
        "seconds of that checkpoint (`rampipectl sync`, the larger mode)",
    ),
    (
        "checkpoint_bytes_1k_one_change",
        None,
        None,
        "the same for a pin of 1,000 files",
    ),
    (
        "checkpoint_bytes_20k_new_files",
        None,
        None,
        "stick bytes of the first checkpoint of 20,000 new files of 200 bytes (the larger)",
    ),
    (
        "checkpoint_s_20k_new_files",
        None,
        None,
        "seconds of that checkpoint",
    ),
    (
        "writeback_vs_disk_seq_ratio",
        ">=",
        0.8,
        "write-back of large files (unpin of (2)) over the stick's sequential rate",
    ),
    (
        "time_to_pin_s",
        "<=",
        ("hot_for_s", 1.0),
        "from the start of a burst to pinned (hot_for + 1 s)",
    ),
    ("time_to_unpin_s", None, None, "from the end of the burst to unpinned (written back)"),
    (
        "monitor_events_per_s_lossless",
        ">=",
        100_000.0,
        "events/s the daemon counted with none lost",
    ),
    ("monitored_workload_ratio", ">=", 0.9, "create-write-close ops/s, watched over unwatched"),
    ("daemon_cpu_pct_at_10k_events", None, None, "daemon CPU, % of one core, at 10k events/s"),
    ("daemon_rss_mb", "<=", 50.0, "daemon resident memory"),
    (
        "zram_ram_per_stored_byte",
        "<=",
        0.4,
        "ram.backend zram: RAM per stored byte, the larger of the log tree and the SQLite load",
    ),
    (
        "zram_ram_per_stored_byte_text",
        None,
        None,
        "the same for text without random tokens: access logs, a pmxcfs-like configuration"
        " database",
    ),
    (
        "zram_vs_tmpfs_logger_ratio",
        None,
        None,
        "ram.backend zram: (a) in a static copy pin over a plain tmpfs",
    ),
    ("zram_vs_tmpfs_sqlite_ratio", None, None, "the same for (b)"),
    ("zram_vs_tmpfs_small_files_ratio", None, None, "the same for (c)"),
    ("zram_vs_tmpfs_large_seq_ratio", None, None, "the same for (d)"),
    (
        "zram_kernel_cpu_s_per_gb_large_seq",
        None,
        None,
        "kernel CPU seconds per GB that (d) writes into the zram pin (compression included)",
    ),
    ("tmpfs_kernel_cpu_s_per_gb_large_seq", None, None, "the same on a plain tmpfs"),
    (
        "zram_daemon_cpu_pct",
        None,
        None,
        "daemon CPU, % of one core, while (a)-(d) ran in its zram pin",
    ),
    ("tmpfs_pin_daemon_cpu_pct", None, None, "the same for a copy pin on tmpfs"),
    (
        "daemon_rss_mb_100k_dirs",
        "<=",
        50.0,
        "daemon resident memory after a write in each of 100,000 new directories",
    ),
    (
        "ledger_read_mib_per_s",
        None,
        None,
        "content check of a write-back (ledger.py): RAM side read and digested, MiB/s",
    ),
    (
        "ledger_s_per_gib",
        None,
        None,
        "its time per GiB of pinned files, added to each checkpoint (bytes read = the pin)",
    ),
    (
        "busy_writer_pinned_within_hot_for_plus_2s",
        ">=",
        ("busy_writer_tries", 0.0),
        "of busy_writer_tries starts of an fsyncing logger, pinned within hot_for + 2 s",
    ),
    ("busy_writer_pin_s_max", None, None, "its longest time to pinned (hot_for is 1 s)"),
    ("busy_writer_refusals", None, None, "its pins refused (a file held at the check)"),
    (
        "switch_ms_64m",
        "<=",
        100.0,
        "unpin of a 64 MiB overlay pin: from its unmount until the disk holds all of it, ms",
    ),
    ("switch_ms_1g", "<=", 100.0, "the same for 1 GiB"),
    ("switch_ms_64m_writer", None, None, "64 MiB, with a logger appending through the unpin"),
    ("switch_ms_1g_writer", None, None, "1 GiB, with that logger"),
    (
        "switch_ms_64m_writer_behind",
        None,
        None,
        "64 MiB with that logger: the longest time a reader found its log shorter than before",
    ),
    ("switch_ms_1g_writer_behind", None, None, "the same for 1 GiB"),
    (
        "switch_ms_renamed_missing",
        None,
        None,
        "64 MiB with a directory renamed through the pin: the new name missing",
    ),
    (
        "ledger_s_per_10k_small_files",
        None,
        None,
        "its time per 10,000 files of 200 bytes (a tree of many small files)",
    ),
]

# Why a figure can miss, and what would close it; shown only for figures that missed.
# {key} placeholders take figures of the same run.
WHY_MISSED = {
    "overlay_vs_tmpfs_fsync_ratio": (
        "The RAM side of a pin is watched without FAN_MODIFY: measured in this run on a plain"
        " tmpfs with no daemon, such a mark leaves (a) at {fanotify_no_modify_mark_logger_ratio}"
        " of the unwatched rate (with FAN_MODIFY: {fanotify_full_mark_logger_ratio}), and the"
        " copy pin, a tmpfs bind with the same mark, reaches {copy_vs_tmpfs_fsync_ratio}. The"
        " overlay pin's remaining gap to the kernel's own overlay cost (0.88 of tmpfs, measured"
        " without rampiped on this machine class) is not explained by this run. What would tell:"
        " a kernel-only overlay over tmpfs measured in the same run, and a profile of the fio"
        " writer in the pinned directory."
    ),
    "copy_vs_tmpfs_fsync_ratio": (
        "A copy pin is a plain tmpfs bind: its loss is the fanotify mark on its RAM side"
        " ({fanotify_full_mark_logger_ratio} with the daemon's mark on a plain tmpfs,"
        " {fanotify_no_modify_mark_logger_ratio} without FAN_MODIFY, measured in this run). What"
        " would close it: the same as for the overlay, a mark without FAN_MODIFY."
    ),
    "pinned_vs_disk_fsync_ratio": "",
    "sqlite_device_write_reduction": (
        "Each checkpoint writes the pages that changed under a rollback journal (their old"
        " content, then the new), or the whole database when that costs less, plus ext4's"
        " journal; the plain stick's writes grow with the transactions. The load rewrites a"
        " random row of {sqlite_db_bytes} bytes of rows with fresh random bytes at each"
        " transaction, so the pages that changed between two checkpoints hold"
        " {sqlite_copy_300s_changed_bytes_per_checkpoint} bytes of new content at 5 minutes and"
        " {sqlite_copy_60s_changed_bytes_per_checkpoint} at 1 minute (counted in this run):"
        " whatever writes them, the reduction cannot pass {sqlite_device_write_reduction_bound}"
        " and {sqlite_device_write_reduction_1m_bound}."
    ),
    "sqlite_device_write_reduction_1m": (
        "The load rewrites a random row at each transaction with fresh random bytes: in a"
        " minute the pages that changed hold {sqlite_copy_60s_changed_bytes_per_checkpoint}"
        " bytes of new content, of a database of {sqlite_db_bytes} (counted in this run), and"
        " every checkpoint must put that much on the stick, whatever writes it. The plain stick"
        " over that much per checkpoint is {sqlite_device_write_reduction_1m_bound}: 20 cannot"
        " be reached with this load at a 1-minute interval. What is spent above it: the pages'"
        " old content in the rollback journal (or the whole file, when that is less), and"
        " ext4's journal commits."
    ),
    "writeback_bytes_vs_log2ram_style": (
        "Copy pin {writeback_bytes_copy_vs_log2ram_style}, overlay pin"
        " {writeback_bytes_overlay_vs_log2ram_style}. Appended logs are written as appends,"
        " rotations as renames, and a checkpoint's tails, renames and whole files are made"
        " durable together (few journal commits). On ext4 both modes make them durable by"
        " writing out their data and committing the journal once (an fsync), not by syncfs,"
        " which also writes every block of metadata the journal holds to its place at once"
        " (the kernel writes it later, merged over checkpoints): that brought the copy pin"
        " from 1.35 to about 0.8 and the overlay pin from 2.06 to about 1.7-1.9. What is left"
        " is the price of durable checkpoints: each checkpoint commits the journal (once, at"
        " its end, with its data written out before), and each appended tail rewrites the"
        " partial last block of its file; log2ram's rsync makes no commit and no fsync"
        " until its final sync, and its page cache merges the same blocks across syncs (a"
        " power cut can leave its copy torn). The overlay pin paid more: the first append to a"
        " log still on the disk copies it into RAM whole, as does a rotation of files still on"
        " the disk only; a checkpoint now takes such a file as the disk's own, linked into the"
        " journal with its tail appended (writeback/fromlower.py), which brought it from about"
        " 1.8 to 1.0. What is left for it beyond the copy pin is its unpin (each file of the"
        " layer put in place as the journal's inode, a link and a rename each) and the"
        " journal's generations (directories of links made and removed at each checkpoint)."
    ),
    "writeback_vs_disk_seq_ratio": (
        "Unpinning an overlay pin writes every byte twice: first the upper layer into the"
        " checkpoint journal (so that a power cut during the apply can be replayed), then the"
        " journal into the directory; the stick's device counters show about twice the payload"
        " (column 4). The copy pin's checkpoint (one copy) and rsync alone reach the stick's"
        " rate. What would close it: when the journal and the directory are on the same"
        " filesystem, move the journal's files into place (rename) instead of copying them a"
        " second time."
    ),
    "time_to_pin_s": (
        "The daemon decides every 0.5 s and checks for holders before it mounts; a writer that"
        " holds a file at that moment makes it wait for the next decision."
    ),
    "monitor_events_per_s_lossless": (
        "The kernel's queue overflowed or events were missing: the reader thread did not keep"
        " up (see the trials in the monitor section)."
    ),
    "monitored_workload_ratio": (
        "Every create, write, close and delete on the watched filesystem makes the kernel build"
        " an event with the directory's handle and the name, and on two cores the daemon's"
        " reader takes CPU from the writer. The monitor alone (in the benchmark's process, no"
        " daemon), measured in this run: {monitor_only_workload_ratio}. Each kind of event"
        " costs the writer about 4 % in the kernel (the monitor alone on 2026-12-07: 0.87 with"
        " every kind, 0.91 without close after write, 0.92 without modify); leaving one out"
        " would change what the rate counts, which the pin thresholds are set in."
    ),
    "daemon_rss_mb": "The interpreter and its modules (yaml, psutil) make most of it.",
    "zram_ram_per_stored_byte": (
        "RAM per stored byte with {zram_compression}: log tree {zram_ram_per_stored_byte_logs},"
        " SQLite database {zram_ram_per_stored_byte_sqlite}; access logs without random tokens"
        " {zram_ram_per_stored_byte_access_logs}, a database of configuration files in"
        " pmxcfs's layout {zram_ram_per_stored_byte_text_db}. The benchmark's SQLite rows are"
        " random blobs and its log lines carry 16 random hex digits each: what no compressor"
        " can shrink sets the figure, not the backend."
    ),
    "daemon_rss_mb_100k_dirs": (
        "At the start the daemon took {daemon_rss_mb_dirs_start} MiB, after 10,000 directories"
        " {daemon_rss_mb_10k_dirs_written}, after 50,000 {daemon_rss_mb_50k_dirs_written}, after"
        " all {daemon_rss_mb_all_dirs_written} (peak {daemon_peak_rss_mb_100k_dirs}). The"
        " handle cache (4096) and the attributor's cache (8192) are bounded; the rate table holds"
        " every candidate until its rate decays below 0.001 events/s (10 half-lives here); the"
        " reader reads into one buffer, and the heap's free pages are given back every 10 s."
        " What would lower it: a smaller rate-table entry (a list and two floats, about 250"
        " bytes with its key), or fewer dicts of every candidate made on each tick (snapshot)."
    ),
}


class _Figures(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "(not measured)"


def why_missed(key: str, results: dict[str, Any]) -> str:
    text = WHY_MISSED.get(key) or "No analysis recorded for this figure."
    return text.format_map(_Figures(results))


def _met(results: dict[str, Any], key: str, op: str | None, target: Any) -> tuple[Any, Any]:
    """(target value, met: True/False/None)."""
    if op is None or key not in results:
        return None, None
    if isinstance(target, tuple):  # another figure plus an offset: time_to_pin <= hot_for + 1
        other, offset = target
        target = float(results.get(other, 0.0)) + offset
    value = results[key]
    return target, (value >= target if op == ">=" else value <= target)


def judged(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, op, target, what in TARGETS:
        t, met = _met(results, key, op, target)
        rows.append(
            {
                "key": key,
                "value": results.get(key),
                "op": op,
                "target": t,
                "met": met,
                "what": what,
            }
        )
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def summary_text(results: dict[str, Any]) -> str:
    lines = [
        f"rampiped benchmark, {results.get('machine_date')}: {results.get('machine_cores')} cores,"
        f" {results.get('machine_ram_gib')} GiB, {results.get('machine_distro')},"
        f" Linux {results.get('machine_kernel')}; total {results.get('bench_total_s')} s"
    ]
    for row in judged(results):
        if row["value"] is None:
            continue
        mark = {True: "ok    ", False: "MISSED", None: "      "}[row["met"]]
        target = f"  (target {row['op']} {_fmt(row['target'])})" if row["op"] else ""
        lines.append(f"  {mark} {row['key']:<36} {_fmt(row['value']):>12}{target}")
    if "writeback_MBps" in results:
        lines.append(f"         write-back throughput: {results['writeback_MBps']} MB/s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- charts


def charts(out: Path, series: dict[str, Any]) -> list[str]:
    """The PNG charts that the series allow; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    timing = series.get("timing")
    if timing and timing["rates"]:
        fig, ax = plt.subplots(figsize=(11, 4.5))
        t = [x[0] for x in timing["rates"]]
        r = [x[1] for x in timing["rates"]]
        ax.plot(t, r, color="tab:blue", label="rate seen by the daemon (EMA)")
        ax.axhline(timing["pin_above"], color="tab:red", ls="--", lw=1, label="pin_above")
        ax.axhline(timing["unpin_below"], color="tab:green", ls="--", lw=1, label="unpin_below")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(0, max([*r, timing["pin_above"]]) * 3)
        marks = timing["marks"]
        styles = {
            "burst_start": ("burst starts", "black", ":"),
            "pinned": ("pinned", "tab:red", "-"),
            "burst_end": ("burst ends", "black", ":"),
            "released": ("unpinned (written back)", "tab:green", "-"),
        }
        for key, (label, color, ls) in styles.items():
            if key in marks:
                ax.axvline(marks[key], color=color, ls=ls, lw=1.2)
                ax.text(marks[key], ax.get_ylim()[1] * 0.97, " " + label, rotation=90, va="top")
        ax.set_xlabel("seconds")
        ax.set_ylabel("events/s")
        ax.set_title(f"Write rate of {Path(timing['path']).name} as the daemon sees it")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "rate_ema.png", dpi=110)
        plt.close(fig)
        made.append("rate_ema.png")
    ops = series.get("matrix_ops")
    if ops:
        wls = [w for w in WORKLOAD_LABELS if w in ops]
        fig, axes = plt.subplots(1, len(wls), figsize=(4 * len(wls), 4.5), squeeze=False)
        for ax, wl in zip(axes[0], wls, strict=True):
            cfgs = [c for c in CONFIG_LABELS if c in ops[wl]]
            vals = [statistics.median(ops[wl][c]) for c in cfgs]
            bars = ax.bar(range(len(cfgs)), vals, color="tab:blue")
            bars[0].set_color("tab:gray")
            ax.set_yscale("log")
            ax.set_xticks(range(len(cfgs)), [f"({i + 1})" for i in range(len(cfgs))])
            ax.set_title(WORKLOAD_LABELS[wl], fontsize=9)
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:,.0f}" if v >= 10 else f"{v:.2g}", ha="center", va="bottom")
        fig.suptitle(
            "Throughput per configuration: " + "; ".join(CONFIG_LABELS.values()), fontsize=8
        )
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        made.append("throughput.png")
    groups = [
        ("sqlite_device_mb", "SQLite (b) at 10 tx/s: bytes written to each stick"),
        ("writeback_device_mb", "Log directory: bytes written back to each stick"),
    ]
    present = [(k, title) for k, title in groups if series.get(k)]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(7 * len(present), 4.5), squeeze=False)
        for ax, (key, title) in zip(axes[0], present, strict=True):
            for name, pts in series[key].items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
            ax.set_xlabel("seconds")
            ax.set_ylabel("MB written to the stick")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "device_bytes.png", dpi=110)
        plt.close(fig)
        made.append("device_bytes.png")
    return made


# --------------------------------------------------------------------------- report.md


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(out)


def markdown(
    results: dict[str, Any], facts: dict[str, Any], plan: dict[str, Any], images: list[str]
) -> str:
    r = results
    md: list[str] = []
    md.append("# rampiped benchmark\n")
    md.append(
        f"{r.get('machine_date')}, {r.get('machine_cores')} cores, {r.get('machine_ram_gib')}"
        f" GiB, {r.get('machine_distro')}, Linux {r.get('machine_kernel')}, Python"
        f" {r.get('machine_python')}. Plan: {r.get('bench_plan')}. Total run time"
        f" {r.get('bench_total_s')} s.\n"
    )
    md.append(
        "Every comparison ran side by side in this one run and is given as a ratio: absolute"
        " figures from different runs on these machines do not compare.\n"
    )
    md.append("## Headline figures\n")
    rows = []
    for row in judged(r):
        status = {True: "met", False: "**missed**", None: "reported"}[row["met"]]
        target = f"{row['op']} {_fmt(row['target'])}" if row["op"] else "-"
        rows.append([row["key"], row["value"], target, status, row["what"]])
    md.append(_table(["figure", "value", "target", "", "what"], rows) + "\n")
    missed = [row for row in judged(r) if row["met"] is False]
    if missed:
        md.append("### Missed targets: why, and what would close them\n")
        for row in missed:
            why = why_missed(row["key"], r)
            md.append(f"- **{row['key']}** = {_fmt(row['value'])}: {why}")
        md.append("")
    md.append("## The simulated stick\n")
    md.append(
        f"A {_fmt(plan.get('stick_mb'))} MiB ext4 image on a tmpfs, attached to a loop device"
        " (`mount -o loop`), whose"
        " I/O the root blkio cgroup throttles"
        f" ({facts.get('stick_model', 'see bench/stick.py')}). Chosen over a FUSE pass-through"
        " that delays each request because it needs nothing but the kernel (no FUSE library,"
        " no server process taking CPU from the two cores) and its averages are exact. Its"
        " limits: I/O is released in 100 ms slices, so the latency percentiles below are not a"
        " real stick's; and every request costs the same, sequential or random, so fsync-heavy"
        " work (each fsync is a data write plus journal writes) runs slower than on a stick"
        " whose sequential writes are cheap (a delaying pass-through measured 71 fsyncs/s). The"
        " rules sit in the root cgroup because a child cgroup misses writeback and journal"
        " commits. Each configuration has a stick of its own; bytes written are the loop"
        " device's own counters (/sys/block/loopN/stat), journal and metadata included.\n"
    )
    md.append(
        _table(
            ["measure (fio)", "value"],
            [
                ["4k random write, O_DIRECT: IOPS", r.get("stick_rand4k_direct_iops")],
                ["  latency p50 / p99, ms", _pair(r, "stick_rand4k_direct_p50_ms", "p99")],
                ["4k random write + fsync: per s", r.get("stick_rand4k_fsync_per_s")],
                ["  fsync latency p50 / p99, ms", _pair(r, "stick_fsync_p50_ms", "p99")],
                ["sequential write (1 MiB, end fsync): MB/s", r.get("stick_seq_write_MBps")],
                [
                    "small files (create, write, fsync, close): per s",
                    r.get("stick_small_files_fsync_per_s"),
                ],
            ],
        )
        + "\n"
    )
    if "ops_logger_tmpfs" in r:
        md.append("## Throughput: workloads x configurations\n")
        md.append(
            f"Median of {r.get('matrix_rounds')} interleaved rounds of"
            f" {r.get('matrix_seconds_per_run')} s each (the order of the configurations rotates"
            " each round). (2) was pinned by the daemon itself after a write burst"
            f" ({r.get('matrix_adaptive_pin_s')} s); (3) is a static copy pin; (2), (3) and (4)"
            " write back every 5 minutes (the default interval). (a) is fio; (b)-(d) are Python"
            " (bench/workloads.py).\n"
        )
        header = ["workload", *[CONFIG_LABELS[c] for c in CONFIG_LABELS]]
        rows = []
        for wl, label in WORKLOAD_LABELS.items():
            if f"ops_{wl}_tmpfs" not in r:
                continue
            rows.append([label, *[r.get(f"ops_{wl}_{c}") for c in CONFIG_LABELS]])
            rows.append(
                [
                    "  over (5)",
                    *[r.get(f"ratio_{wl}_{c}_vs_tmpfs") for c in list(CONFIG_LABELS)[:-1]],
                    1.0,
                ]
            )
        md.append(_table(header, rows) + "\n")
        md.append(
            "Largest max/min across rounds of one cell, per workload (noise): "
            + ", ".join(f"{w} {r[f'spread_{w}']}" for w in WORKLOAD_LABELS if f"spread_{w}" in r)
            + ".\n"
        )
        if "fanotify_full_mark_logger_ratio" in r:
            md.append(
                "What watching costs, measured alongside: (a) on a plain tmpfs with a fanotify"
                " mark like the daemon's (no daemon, the events read and dropped) runs at"
                f" {r['fanotify_full_mark_logger_ratio']} of the unwatched rate; with the same"
                " mark less FAN_MODIFY at"
                f" {r.get('fanotify_no_modify_mark_logger_ratio')}. The daemon marks the RAM"
                " side of every pin without FAN_MODIFY.\n"
            )
    if "sqlite_device_write_reduction" in r:
        md.append("## SQLite: bytes written to the stick\n")
        md.append(
            f"(b) paced at {_fmt(plan.get('sqlite_rate'))} transactions/s for"
            f" {_fmt(r.get('sqlite_seconds'))} s, on three sticks at the same time: the plain"
            " stick, and copy pins checkpointed every"
            f" {' and every '.join(f'{x:g} s' for x in plan.get('sqlite_intervals', []))}."
            " The window's dirty pages were flushed (syncfs) before the count; the final"
            " write-back at unpin comes after the window and is listed apart.\n"
        )
        rows = []
        for name in ["plain"] + [f"copy_{x:g}s" for x in plan.get("sqlite_intervals", [])]:
            rows.append(
                [
                    name,
                    r.get(f"sqlite_{name}_transactions"),
                    _mb(r.get(f"sqlite_{name}_device_bytes")),
                    r.get(f"sqlite_{name}_checkpoints", "-"),
                    _mb(r.get(f"sqlite_{name}_final_writeback_device_bytes")),
                ]
            )
        md.append(
            _table(
                ["stick", "transactions", "MB written", "checkpoints", "final write-back MB"],
                rows,
            )
            + "\n"
        )
    if "writeback_bytes_vs_log2ram_style" in r:
        md.append("## Bytes written back: rampiped against a log2ram-style copy\n")
        md.append(
            f"The same changes to a log directory (3.1 MB: rotated logs, three active logs"
            f" appended every 0.1 s, a state file rewritten every 2 s, cache files added and"
            f" removed, one rotation) for {_fmt(r.get('wb_seconds'))} s, write-back every"
            f" {_fmt(r.get('wb_interval_s'))} s, then the final write-back (unpin; log2ram's stop)."
            " Each on its own stick; bytes from the device counters. All three trees on disk"
            f" identical afterwards: {_fmt(r.get('wb_trees_identical'))}.\n"
        )
        md.append(
            _table(
                ["configuration", "MB written to the stick", "over (4)"],
                [
                    [
                        CONFIG_LABELS["overlay"] + ", static overlay pin",
                        _mb(r.get("wb_overlay_device_bytes")),
                        r.get("writeback_bytes_overlay_vs_log2ram_style"),
                    ],
                    [
                        CONFIG_LABELS["copy"],
                        _mb(r.get("wb_copy_device_bytes")),
                        r.get("writeback_bytes_copy_vs_log2ram_style"),
                    ],
                    [
                        CONFIG_LABELS["tmpfs_copy"],
                        _mb(r.get("wb_tmpfs_copy_device_bytes")),
                        1.0,
                    ],
                ],
            )
            + "\n"
        )
        for line in facts.get("wb_differences", []):
            md.append(f"- differs from what the writer saw: {line}")
        if facts.get("wb_log"):
            md.append("The daemons' checkpoints (file bytes, not device bytes):\n")
            for line in facts["wb_log"]:
                md.append(f"    {line}")
        md.append("")
    if "logrotate_bytes_vs_log2ram_style" in r:
        md.append("## A /var/log with real logrotate runs\n")
        md.append(
            "Syslog-style lines appended to five logs every 0.1 s, a row of a small SQLite"
            f" database updated every second, and a real `logrotate -f` every"
            f" {_fmt(r.get('lr_rotate_s'))} s (create, copytruncate, compress), for"
            f" {_fmt(r.get('lr_seconds'))} s; checkpoints (and the log2ram-style syncs) every"
            f" {_fmt(r.get('lr_interval_s'))} s, then the final write-back. The same changes on"
            " each stick; bytes from the device counters. All trees identical afterwards:"
            f" {_fmt(r.get('lr_trees_identical'))}.\n"
        )
        md.append(
            _table(
                ["configuration", "MB written", "over (4)", "over the plain stick"],
                [
                    [
                        CONFIG_LABELS["overlay"] + ", static overlay pin",
                        _mb(r.get("lr_overlay_device_bytes")),
                        r.get("logrotate_bytes_overlay_vs_log2ram_style"),
                        r.get("logrotate_bytes_overlay_vs_plain_stick"),
                    ],
                    [
                        CONFIG_LABELS["copy"],
                        _mb(r.get("lr_copy_device_bytes")),
                        r.get("logrotate_bytes_copy_vs_log2ram_style"),
                        r.get("logrotate_bytes_copy_vs_plain_stick"),
                    ],
                    [
                        CONFIG_LABELS["tmpfs_copy"],
                        _mb(r.get("lr_tmpfs_copy_device_bytes")),
                        1.0,
                        "",
                    ],
                    ["the plain stick, no RAM", _mb(r.get("lr_plain_device_bytes")), "", 1.0],
                ],
            )
            + "\n"
        )
        for mode in ("overlay", "copy"):
            md.append(
                f"- ({mode}) its checkpoints wrote {_mb(r.get(f'lr_{mode}_written_bytes'))} MB of"
                f" files where writing each changed file whole would have been"
                f" {_mb(r.get(f'lr_{mode}_whole_file_bytes'))} MB"
            )
        for line in facts.get("lr_differences", []):
            md.append(f"- differs from the plain stick: {line}")
        if facts.get("lr_log"):
            md.append("\nThe daemons' checkpoints (file bytes, not device bytes):\n")
            for line in facts["lr_log"]:
                md.append(f"    {line}")
        md.append("")
    if "writeback_vs_disk_seq_ratio" in r:
        md.append("## Write-back throughput\n")
        md.append(
            f"{plan.get('writeback_files')} files of {plan.get('writeback_file_mb')} MiB written"
            " into a pin, then written back; bytes per second of wall time over the stick's"
            f" sequential rate ({r.get('stick_seq_write_MBps')} MB/s, fio above).\n"
        )
        md.append(
            _table(
                ["write-back", "MB/s", "over the stick's rate", "stick MB written / file MB"],
                [
                    [
                        "(2) overlay: unpin",
                        _mbps(r.get("writeback_overlay_bytes_per_s")),
                        r.get("writeback_vs_disk_seq_ratio"),
                        _over(r, "writeback_overlay_device_bytes", "writeback_overlay_file_bytes"),
                    ],
                    [
                        "(3) copy: checkpoint",
                        _mbps(r.get("writeback_copy_bytes_per_s")),
                        r.get("writeback_copy_vs_disk_seq_ratio"),
                        _over(r, "writeback_copy_device_bytes", "writeback_copy_file_bytes"),
                    ],
                    [
                        "rsync -a --fsync alone, tmpfs to stick",
                        _mbps(r.get("writeback_rsync_bytes_per_s")),
                        r.get("writeback_rsync_vs_disk_seq_ratio"),
                        "-",
                    ],
                ],
            )
            + "\n"
        )
    if "time_to_pin_s" in r:
        md.append("## Adaptive pinning in time\n")
        md.append(
            f"A cold directory, then {_fmt(r.get('burst_seconds'))} s of appends"
            f" ({_fmt(r.get('burst_writes_per_s'))} writes/s, peak rate seen"
            f" {_fmt(r.get('burst_peak_rate_events_per_s'))} events/s). Configuration:"
            f" half_life {_fmt(r.get('half_life_s'))} s, pin_above"
            f" {_fmt(r.get('pin_above_events_per_s'))}/s for hot_for {_fmt(r.get('hot_for_s'))} s,"
            f" unpin_below {_fmt(r.get('unpin_below_events_per_s'))}/s for cool_for"
            f" {_fmt(r.get('cool_for_s'))} s. From the start of the burst to pinned:"
            f" **{r.get('time_to_pin_s')} s** (target <= hot_for + 1 s). From its end to"
            f" unpinned and written back: **{r.get('time_to_unpin_s')} s** (the overlay was"
            f" unmounted after {r.get('time_to_unmount_s')} s); the rate must first decay below"
            " unpin_below (log2(peak / unpin_below) half-lives), then stay there for cool_for.\n"
        )
        for line in facts.get("timing_log", []):
            md.append(f"    {line}")
        md.append("")
    if "monitor_events_per_s_lossless" in r:
        md.append("## The monitor\n")
        md.append(
            "Writers create a one-byte file, write it, close it and delete an older one (4"
            " events a step), each name used once, so the count is exact.\n"
        )
        rows = [
            ["the daemon, 1 writer at full speed", _ev(r, "daemon_full_1w")],
            ["the daemon, 2 writers", _ev(r, "daemon_full_2w")],
            ["the daemon, 4 writers (more than cores)", _ev(r, "daemon_full_4w")],
            [
                "the monitor alone (bench/monitor_capacity.py), best lossless",
                _fmt(r.get("monitor_only_events_per_s_lossless")),
            ],
        ]
        md.append(_table(["events/s, lost, missing", "value"], rows) + "\n")
        md.append(
            f"Writer speed with the daemon watching over without (median of"
            f" {plan.get('ratio_rounds')} alternating rounds): {r.get('monitored_workload_ratio')}"
            f" (min {r.get('monitored_workload_ratio_min')}, max"
            f" {r.get('monitored_workload_ratio_max')}); with the monitor alone in the"
            f" benchmark's process instead of the daemon:"
            f" {_fmt(r.get('monitor_only_workload_ratio'))}; the daemon used"
            f" {_fmt(r.get('daemon_cpu_pct_while_watched_writer_runs'))} % of a core while the"
            " watched writer ran. Daemon CPU at"
            f" {_fmt(r.get('daemon_cpu_test_events_per_s'))} events/s:"
            f" {r.get('daemon_cpu_pct_at_10k_events')} % of one core"
            f" ({r.get('daemon_cpu_test_lost')} lost). Daemon memory: {r.get('daemon_rss_mb')}"
            f" MiB resident (peak {r.get('daemon_peak_rss_mb')} MiB).\n"
        )
    if "zram_ram_per_stored_byte" in r or "zram_not_measured" in r:
        md.append(zram_section(r, facts))
    if images:
        md.append("## Charts\n")
        for name in images:
            md.append(f"![{name}]({name})\n")
    return "\n".join(md)


ZRAM_LABELS = {  # bench/zram.py's configurations
    "tmpfs": "plain tmpfs",
    "tmpfs_pin": "tmpfs copy pin",
    "zram_area": "zram area alone",
    "zram": "zram copy pin",
}


def zram_section(r: dict[str, Any], facts: dict[str, Any]) -> str:
    md = ["## Compressed RAM (zram)\n"]
    if "zram_not_measured" in r:
        md.append(f"Not measured: {r['zram_not_measured']}\n")
        return "\n".join(md)
    md.append(
        f"RAM per stored byte of a pin's area with `ram.backend: zram`, {r.get('zram_compression')}"
        f" (ext4 on the device, made the way the daemon makes it): the log tree"
        f" {_fmt(r.get('zram_ram_per_stored_byte_logs'))}, the SQLite database"
        f" {_fmt(r.get('zram_ram_per_stored_byte_sqlite'))}, access logs without random tokens"
        f" {_fmt(r.get('zram_ram_per_stored_byte_access_logs'))}, a database of configuration"
        f" files in pmxcfs's layout {_fmt(r.get('zram_ram_per_stored_byte_text_db'))}.\n"
    )
    if "zram_ops_logger" not in r:
        return "\n".join(md)
    md.append(
        "Throughput: (a)-(d) in a static copy pin of the real daemon with `ram.backend: zram`"
        f" ({facts.get('zram_pin_mount', 'checked in /proc/self/mountinfo')}); in a copy pin"
        " of a second daemon on the default tmpfs backend; in a zram area alone, made the way"
        " the daemon makes one but with no daemon (what the backend costs without rampiped);"
        " and in a plain tmpfs. Median of"
        f" {r.get('zram_bench_rounds')} interleaved rounds of"
        f" {_fmt(r.get('zram_bench_seconds_per_run'))} s each (the order rotates each round;"
        f" largest max/min of a cell across rounds: {_fmt(r.get('zram_throughput_spread'))})."
        " What reaches the compressor: (a) fio's buffers and (b), (d) random bytes (they do not"
        " compress), (c) 2 KiB of one repeated byte (it does). On tmpfs an fsync writes"
        " nothing; on a zram area it writes the file's pages (and its inode) through ext4 to"
        " the device, which compresses them then: fsync-heavy work pays for every fsync.\n"
    )
    rows = []
    for wl, label in WORKLOAD_LABELS.items():
        if f"zram_ops_{wl}" not in r:
            continue
        rows.append(
            [
                label,
                *[r.get(f"{c}_ops_{wl}") for c in ZRAM_LABELS],
                r.get(f"zram_vs_tmpfs_{wl}_ratio"),
                r.get(f"zram_vs_tmpfs_pin_{wl}_ratio"),
                r.get(f"zram_area_vs_tmpfs_{wl}_ratio"),
                " / ".join(_fmt(r.get(f"{c}_kernel_cpu_us_per_op_{wl}")) for c in ZRAM_LABELS),
                " / ".join(_fmt(r.get(f"{c}_daemon_cpu_pct_{wl}")) for c in ("tmpfs_pin", "zram")),
                r.get(f"zram_device_mb_per_run_{wl}"),
            ]
        )
    md.append(
        _table(
            [
                "workload",
                *ZRAM_LABELS.values(),
                "zram pin over tmpfs",
                "zram pin over the tmpfs pin",
                "zram area alone over tmpfs",
                "kernel CPU, µs per op (per MB for (d)), in the order of the columns",
                "daemon CPU, % of a core: tmpfs pin / zram pin",
                "MB into the zram pin's device per run",
            ],
            rows,
        )
        + "\n"
    )
    per_run = "; ".join(
        f"{label} {_fmt(r.get(f'{c}_kernel_cpu_s_logger'))} s counted,"
        f" {_fmt(r.get(f'{c}_machine_kernel_cpu_s_logger'))} s on the machine"
        for c, label in ZRAM_LABELS.items()
    )
    md.append(
        "How the CPU is counted, for each run (the workload, then a syncfs of its filesystem,"
        " so that what it left dirty is compressed in its own window): the kernel's CPU is the"
        " workload process's system time (getrusage of the waited child), the CPU of every"
        " kernel thread (children of kthreadd: kworkers, flushers; /proc/PID/stat) and the"
        " benchmark's own system time (the syncfs). zram compresses in the task that submits a"
        " write to the device: of the zram pin's kernel CPU, the writer's own system time was"
        f" {_pct(r.get('zram_kernel_cpu_writer_share'))} and kernel threads"
        f" {_pct(r.get('zram_kernel_cpu_kthread_share'))}. The figure includes everything the"
        " writer's system calls cost, which plain tmpfs pays too, and on zram also ext4 and the"
        " block layer, not compression alone: the columns side by side show what zram adds."
        " Cross-check against the machine's system + irq + softirq time over the same windows"
        f" (/proc/stat; it includes whatever else ran), (a) per run: {per_run}. The daemon's"
        " CPU is its process's user + system time (its children's included) over the wall"
        " time of the runs in its own pin, read with psutil in ticks of 10 ms; it compresses"
        " nothing, it reads the pin's fanotify events. Over all runs: zram pin"
        f" {_fmt(r.get('zram_daemon_cpu_pct'))} %, tmpfs pin"
        f" {_fmt(r.get('tmpfs_pin_daemon_cpu_pct'))} % of a core. Kernel CPU per GB that (d)"
        f" writes: plain tmpfs {_fmt(r.get('tmpfs_kernel_cpu_s_per_gb_large_seq'))} s, tmpfs"
        f" pin {_fmt(r.get('tmpfs_pin_kernel_cpu_s_per_gb_large_seq'))} s, zram area alone"
        f" {_fmt(r.get('zram_area_kernel_cpu_s_per_gb_large_seq'))} s, zram pin"
        f" {_fmt(r.get('zram_kernel_cpu_s_per_gb_large_seq'))} s.\n"
    )
    return "\n".join(md)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def _pair(r: dict[str, Any], key: str, other: str) -> str:
    return f"{_fmt(r.get(key))} / {_fmt(r.get(key.replace('p50', other)))}"


def _mb(v: Any) -> Any:
    return None if v is None else round(v / 1e6, 2)


def _mbps(v: Any) -> Any:
    return None if v is None else round(v / 1e6, 2)


def _over(r: dict[str, Any], a: str, b: str) -> Any:
    if not r.get(b):
        return None
    return round(r.get(a, 0) / r[b], 2)


def _ev(r: dict[str, Any], label: str) -> str:
    return (
        f"{_fmt(r.get(label + '_events_per_s'))}, {_fmt(r.get(label + '_lost'))},"
        f" {_fmt(r.get(label + '_missing_events'))}"
    )


def write(
    out: Path,
    results: dict[str, Any],
    series: dict[str, Any],
    facts: dict[str, Any],
    plan: dict[str, Any],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        images = charts(out, series)
    except ImportError:  # matplotlib is the `bench` extra: `make bench` installs it
        images = []
        facts = {**facts, "charts": "matplotlib is not installed: no charts"}
    flat = {k: v for k, v in sorted(results.items()) if isinstance(v, str | int | float | bool)}
    (out / "summary.json").write_text(json.dumps(flat, indent=2) + "\n")
    (out / "series.json").write_text(json.dumps(series) + "\n")
    (out / "report.md").write_text(markdown(results, facts, plan, images))
