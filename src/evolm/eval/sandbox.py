"""Run model-written Python in a separate, limited process: the execution half of HumanEval / MBPP.

Why a process and these limits (Chen et al. 2021, "Evaluating Large Language Models Trained on
Code", sec. 2.3 and appendix: generated programs may loop forever, exhaust memory, fork, delete
files or open connections; the evaluator must survive all of that and score them as failures):

- **own process, own session** (``start_new_session``): on a timeout, or after any run, the whole
  process group is killed with SIGKILL, so children it spawned go too;
- **wall-clock timeout** in the parent, **RLIMIT_CPU** in the child (a busy loop dies even if
  the parent were slow to notice);
- **RLIMIT_AS** (address space): a huge allocation raises ``MemoryError`` in the child instead of
  swapping the machine; **RLIMIT_FSIZE** caps every file it writes, including its stdout/stderr
  (files in its temp dir; the parent reads back only their last few KB), so a print loop cannot
  fill the disk or the evaluator's memory; **RLIMIT_CORE** = 0;
- **no processes**: ``os.fork``/``system``/``exec*``/``spawn*``/``kill``, ``subprocess.Popen`` and
  friends are replaced by a function that raises, and **RLIMIT_NPROC** bounds what a raw
  ``posix.fork`` loop can do: as root (where the kernel ignores that limit) the child first takes
  the real uid of ``nobody`` and drops CAP_SYS_ADMIN / CAP_SYS_RESOURCE for good;
- **no network**: when we are root, the child first moves into a new, empty network namespace
  (``unshare(CLONE_NEWNET)``: no interface is up, nothing is reachable); always, ``socket.socket``
  and the other socket constructors raise;
- **clean slate**: empty environment, ``python -I`` (no user site, no PYTHON* variables), a fresh
  temp dir as cwd (removed afterwards), stdin from /dev/null;
- **passed means finished**: the program is ``exec``'d by a small bootstrap; only when it returns
  normally does the bootstrap write a per-run random token to a private pipe. ``sys.exit(0)`` or
  ``os._exit(0)`` halfway through therefore counts as a failure, not a pass.

This guards the evaluator against accidents and careless code, as human-eval's
``reliability_guard`` does, plus kernel limits; it is not a security boundary against a
determined attacker (run untrusted code from the internet in a VM or container).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The child's first code: limits, isolation, then the program. Kept free of f-string braces
# (it is a plain string); configuration arrives as JSON on stdin.
_BOOTSTRAP = r'''
import json, os, sys, resource
cfg = json.loads(sys.stdin.read())
sys.stdin.close()
token, code, result_fd = cfg["token"], cfg["code"], cfg["result_fd"]
def _lim(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass
if cfg["netns"]:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "unshare")
        cfg["isolated_net"] = True
    except Exception:
        pass
if cfg["drop_to"] is not None and os.geteuid() == 0:
    # RLIMIT_NPROC is not enforced for a real uid of root nor with CAP_SYS_ADMIN/CAP_SYS_RESOURCE:
    # give the process another real uid and drop those two capabilities for good (bounding set
    # too, so no exec regains them). The effective uid stays root so the interpreter's files
    # (which may sit in a root-only folder) remain readable.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (21, 24):  # CAP_SYS_ADMIN, CAP_SYS_RESOURCE
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    os.setresuid(cfg["drop_to"][0], 0, 0)
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(hdr, data) == 0:
        keep = ~((1 << 21) | (1 << 24)) & 0xFFFFFFFF
        data[0] &= keep  # effective (caps 0-31)
        data[1] &= keep  # permitted
        libc.capset(hdr, data)
_lim(resource.RLIMIT_NPROC, cfg["nproc"])
_lim(resource.RLIMIT_AS, cfg["memory_bytes"])
_lim(resource.RLIMIT_CPU, cfg["cpu_seconds"])
_lim(resource.RLIMIT_FSIZE, cfg["file_bytes"])
_lim(resource.RLIMIT_CORE, 0)
os.write(result_fd, b"started\n")

import builtins, socket, subprocess, shutil
def _blocked(*a, **k):
    raise PermissionError("blocked by the evolm sandbox")
for _name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "setpgid", "putenv",
              "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
              "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
              "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir", "removedirs", "rename",
              "renames", "truncate", "chmod", "fchmod", "chown", "fchown", "lchown", "chroot"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
for _name in ("Popen", "call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _blocked)
shutil.rmtree = shutil.move = shutil.chown = _blocked
for _name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
    setattr(socket, _name, _blocked)
try:
    import multiprocessing
    multiprocessing.Process = _blocked
except Exception:
    pass
del cfg
glb = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(code, "<program>", "exec"), glb)
except BaseException as e:  # SystemExit included: leaving early is not passing
    import traceback
    traceback.print_exc()
    os._exit(1)
sys.stdout.flush()
sys.stderr.flush()
os.write(result_fd, ("passed " + token + "\n").encode())
os._exit(0)
'''


@dataclass
class ExecResult:
    """Outcome of one program: ``status`` is 'passed', 'failed' or 'timeout'."""

    status: str
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _nobody() -> tuple[int, int] | None:
    try:
        import pwd

        p = pwd.getpwnam("nobody")
        return p.pw_uid, p.pw_gid
    except (KeyError, ImportError):
        return None


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def run_program(code: str, timeout: float = 3.0, memory_mb: int = 1024, max_output_bytes: int = 1 << 20,
                nproc: int = 32, isolate_network: bool = True, tail_bytes: int = 4096) -> ExecResult:
    """Run ``code`` in a fresh limited Python process (see module docstring); never raises for
    anything the code does."""
    root = os.geteuid() == 0
    drop = _nobody() if root else None
    tmp = tempfile.mkdtemp(prefix="evolm-exec-")
    out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    work = os.path.join(tmp, "cwd")
    os.mkdir(work)
    token = secrets.token_hex(16)
    r_fd, w_fd = os.pipe()
    cfg = {"token": token, "code": code, "result_fd": w_fd, "netns": bool(isolate_network and root),
           "drop_to": drop, "nproc": int(nproc), "memory_bytes": int(memory_mb) << 20,
           "cpu_seconds": int(timeout) + 1, "file_bytes": int(max_output_bytes)}
    t0 = time.monotonic()
    proc = None
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, cwd=work, env={}, pass_fds=(w_fd,),
                                    start_new_session=True, close_fds=True)
        os.close(w_fd)
        w_fd = -1
        try:
            proc.stdin.write(json.dumps(cfg).encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)  # leftovers too (background children), whatever happened
        proc.wait()
        seconds = time.monotonic() - t0
        os.set_blocking(r_fd, False)
        try:
            signal_text = os.read(r_fd, 4096).decode("utf-8", "replace")
        except (BlockingIOError, OSError):
            signal_text = ""
        stdout, stderr = _tail(out_path, tail_bytes), _tail(err_path, tail_bytes)
        if timed_out:
            return ExecResult("timeout", None, seconds, stdout, stderr, f"no result within {timeout} s")
        if proc.returncode == 0 and f"passed {token}" in signal_text:
            return ExecResult("passed", 0, seconds, stdout, stderr)
        rc = proc.returncode
        if rc is not None and rc < 0:
            detail = f"killed by signal {signal.Signals(-rc).name}"
        elif "started" not in signal_text:
            detail = "the sandbox did not start"
        elif rc == 0:
            detail = "exited before the program finished"
        else:
            detail = (stderr.strip().splitlines() or [f"exit code {rc}"])[-1]
        return ExecResult("failed", rc, seconds, stdout, stderr, detail)
    finally:
        if w_fd >= 0:
            os.close(w_fd)
        os.close(r_fd)
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def run_programs(codes: list[str], timeout: float = 3.0, workers: int = 4, **kwargs) -> list[ExecResult]:
    """``run_program`` over many programs, ``workers`` at a time (threads that wait on processes)."""
    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda c: run_program(c, timeout=timeout, **kwargs), codes))
