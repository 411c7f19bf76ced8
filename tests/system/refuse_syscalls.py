"""Run a command with some system calls refused, as a container's seccomp filter refuses them.

    python refuse_syscalls.py [--errno NAME] CALL[,CALL...] -- COMMAND [ARG...]

Installs a seccomp filter that makes each named call fail with NAME (EPERM by default, what
systemd-nspawn's and LXC's filters return) and lets every other call through, then execs
COMMAND. The filter is inherited by COMMAND and its children and cannot be removed. It needs
no privilege (no_new_privs is set first). Calls are known by name for x86_64 and aarch64."""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import struct
import sys

# (AUDIT_ARCH_*, {name: number}) for the native ABI of each machine
ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {"fanotify_init": 300, "fanotify_mark": 301, "open_by_handle_at": 304}),
    "aarch64": (0xC00000B7, {"fanotify_init": 262, "fanotify_mark": 263, "open_by_handle_at": 265}),
}

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_KILL_PROCESS = 0x80000000
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
X32_SYSCALL_BIT = 0x40000000


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(arch: int, numbers: list[int], err: int) -> bytes:
    """seccomp_data: nr at offset 0, arch at 4. Another architecture (or the x32 ABI, whose
    numbers differ) is killed rather than let through unfiltered."""
    out = [
        _insn(BPF_LD_W_ABS, 0, 0, 4),
        _insn(BPF_JEQ_K, 1, 0, arch),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, 0, 0, 0),
    ]
    for nr in numbers:
        out.append(_insn(BPF_JEQ_K, 0, 1, nr))
        out.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | err))
    out.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(out)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install(calls: list[str], err: int) -> None:
    machine = platform.machine()
    if machine not in ARCHES:
        raise SystemExit(f"refuse_syscalls: {machine} is not known (only {', '.join(ARCHES)})")
    arch, table = ARCHES[machine]
    unknown = [c for c in calls if c not in table]
    if unknown:
        raise SystemExit(f"refuse_syscalls: unknown system call {', '.join(unknown)}")
    code = program(arch, [table[c] for c in calls], err)
    libc = ctypes.CDLL(None, use_errno=True)
    ulong = ctypes.c_ulong
    libc.prctl.argtypes = [ctypes.c_int, ulong, ulong, ulong, ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    prog = _Fprog(len(code) // 8, code)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--errno", default="EPERM", help="what the calls fail with (default EPERM)")
    p.add_argument("calls", help="comma-separated system call names")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("a COMMAND is required")
    err = getattr(errno, args.errno, None)
    if not isinstance(err, int):
        p.error(f"unknown errno name {args.errno}")
    install(args.calls.split(","), err)
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
