"""Run model-written Python in a cell it cannot leave: the execution half of HumanEval / MBPP.

Generated programs may loop forever, exhaust memory, fork, delete files, open connections
(Chen et al. 2021, "Evaluating Large Language Models Trained on Code", sec. 2.3) -- or, when a
model is trained against the evaluator, go looking for a way to be scored as passing. Each
program runs under a supervisor process (``_jail.py``) that, where the kernel allows it, builds:

- **its own namespaces**: mount, PID, IPC and network (as root directly, otherwise through an
  unprivileged user namespace). The network namespace is empty (no interface up; abstract Unix
  sockets are per namespace);
- **a private filesystem view**: a tmpfs root holding read-only binds of /usr, /lib*, the
  interpreter's prefix and /dev/{null,zero,random,urandom}, a private size-capped /tmp with the
  work dir, then ``pivot_root`` -- no host /tmp, /run, /home, /root, /etc or /proc, so no host
  file to read, write or unlink and no host Unix socket to connect to;
- **a user that cannot become root again**: as root, a fresh random uid for real, effective and
  saved uid, no groups, an empty capability bounding set, locked securebits; always, an empty
  capability set and ``PR_SET_NO_NEW_PRIVS``; so **RLIMIT_NPROC binds** (with RLIMIT_AS, CPU,
  FSIZE and CORE);
- **the whole tree killed**: the program is pid 1 of its PID namespace; killing it kills every
  process in it, ``setsid`` or double-forked;
- **a verdict it cannot forge**: with ``tests=``, the program (``code``) runs alone and then only
  answers calls; the supervisor, a process it cannot see, reads the tests *after* the fork (they
  never exist in the program's memory), runs them itself and calls the program's functions over a
  socket that carries plain data (numbers, strings, bytes, containers; other objects only as
  handles to hand back). An always-equal object, a forged message or an early ``exit(0)`` cannot
  make an assert pass. Without ``tests=``, "passed" means the program reported reaching its end:
  its own claim, fine for trusted snippets, not for scoring untrusted ones.

Python-level guards (``os.fork``/``system``/``exec*``/``kill``, ``subprocess``, the socket
constructors raise) remain on top, so careless code fails early with a clear error.

Degraded modes, each reported once as a warning and in ``ExecResult.cell``: as root where
namespaces are refused (a container without CAP_SYS_ADMIN), the uid drop, capabilities,
no-new-privileges, NPROC and kill-by-uid still hold, but the host filesystem is visible (the
random uid owns nothing, yet world-writable /tmp and /dev/shm stay writable) and so are host
Unix sockets and the network; not root and without user namespaces, only rlimits, the
Python-level guards and a process-group kill remain -- run untrusted code in a VM or container
there. See docs/security.md.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

_SUPERVISOR = str(Path(__file__).with_name("_jail.py"))
_NAMESPACES = True  # tests switch it off to check the degraded mode (root, namespaces refused)
_GRACE = 5.0  # seconds past the program's timeout before the supervisor itself is killed
_warned: set[str] = set()


@dataclass
class ExecResult:
    """Outcome of one program: ``status`` is 'passed', 'failed' or 'timeout'; ``cell`` says
    which walls held (``mode`` 'root' / 'userns' / '' for no namespaces, ``fs``, ``net``, ``pidns``)."""

    status: str
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    detail: str = ""
    cell: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _sandbox_uid() -> int:
    """A uid no account uses, fresh per run: the cell owns no host file, and two cells never
    share a process count or can signal each other."""
    return 1_500_000_000 + secrets.randbelow(500_000_000)


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _frame(obj) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack(">I", len(data)) + data


def _warn_degraded(cell: dict) -> None:
    """Say once per process which walls are missing, and why (the kernel refused)."""
    missing = [name for name in ("pidns", "fs", "net") if not cell.get(name)]
    if not missing or not cell:
        return
    key = ",".join(missing)
    if key in _warned:
        return
    _warned.add(key)
    why = cell.get("fs_error") or ("namespaces refused (not root and no unprivileged user namespaces, "
                                   "or a container without CAP_SYS_ADMIN)" if not cell.get("mode") else "")
    warnings.warn(f"evolm sandbox: running without {', '.join(missing)}: {why}; see docs/security.md",
                  RuntimeWarning, stacklevel=3)


def _detail(status: str, rc: int | None, stderr: str, timeout: float) -> str:
    if status == "timeout":
        return f"no result within {timeout} s"
    if rc is not None and rc < 0:
        return f"killed by signal {signal.Signals(-rc).name}"
    if rc == 0:
        return "exited before the program finished"
    return (stderr.strip().splitlines() or [f"exit code {rc}"])[-1]


def run_program(code: str, timeout: float = 3.0, memory_mb: int = 1024, max_output_bytes: int = 1 << 20,
                nproc: int = 32, isolate_network: bool = True, tail_bytes: int = 4096,
                tests: str | None = None) -> ExecResult:
    """Run ``code`` in a fresh cell (see module docstring); never raises for anything the code
    does. With ``tests``, ``code`` is the untrusted part and ``tests`` (asserts, or
    ``check(entry_point)``) run in the supervisor against the program's functions: the verdict
    the program cannot forge. Without it, passing means the code reported reaching its end."""
    tmp = tempfile.mkdtemp(prefix="evolm-exec-")
    out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    work, root = os.path.join(tmp, "cwd"), os.path.join(tmp, "root")
    os.mkdir(work)
    os.mkdir(root)
    r_fd, w_fd = os.pipe()
    cfg = {"code": code, "result_fd": w_fd, "uid": _sandbox_uid(), "namespaces": _NAMESPACES,
           "isolate_network": bool(isolate_network), "root": root, "work": work, "tmp_mb": 64,
           "nproc": int(nproc), "memory_bytes": int(memory_mb) << 20, "cpu_seconds": int(timeout) + 1,
           "file_bytes": int(max_output_bytes), "timeout": float(timeout), "serve": tests is not None}
    t0 = time.monotonic()
    proc = None
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", _SUPERVISOR], stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, cwd=work, env={}, pass_fds=(w_fd,), start_new_session=True)
        os.close(w_fd)
        w_fd = -1
        try:  # the tests go second: the supervisor reads them only after the program is forked
            proc.stdin.write(_frame(cfg) + (_frame(tests) if tests is not None else b""))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        line = _read_verdict(r_fd, t0 + timeout + _GRACE)
        _kill_group(proc)
        seconds = time.monotonic() - t0
        stdout, stderr = _tail(out_path, tail_bytes), _tail(err_path, tail_bytes)
        try:
            report = json.loads(line)
        except ValueError:
            rc = proc.returncode
            return ExecResult("timeout" if rc == -signal.SIGKILL else "failed", rc, seconds, stdout, stderr,
                              f"the sandbox supervisor ended without a verdict (exit {rc})")
        _warn_degraded(report["cell"])
        status, rc = report["status"], report["returncode"]
        detail = report["detail"] or ("" if status == "passed" else _detail(status, rc, stderr, timeout))
        return ExecResult(status, None if status == "timeout" else rc, seconds, stdout, stderr, detail,
                          report["cell"])
    finally:
        for fd in (w_fd, r_fd):
            if fd >= 0:
                os.close(fd)
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _read_verdict(fd: int, deadline: float) -> str:
    """The supervisor's one line, read as soon as it is written (no polling of the process)."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < 1 << 16:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 1 << 16) if ready else b""
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen) -> None:
    """The supervisor's group (start_new_session: its id is the supervisor's pid): a backstop
    only, the supervisor kills the program itself."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_programs(codes: list[str | tuple[str, str]], timeout: float = 3.0, workers: int = 4,
                 **kwargs) -> list[ExecResult]:
    """``run_program`` over many programs, ``workers`` at a time (threads that wait on processes);
    an item ``(code, tests)`` is run with ``tests=``."""
    if not codes:
        return []

    def one(item):
        code, tests = (item, None) if isinstance(item, str) else item
        return run_program(code, timeout=timeout, tests=tests, **kwargs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, codes))
