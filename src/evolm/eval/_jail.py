"""The child side of ``sandbox.py``: a supervisor that builds a cell, runs the program in it and
judges it. Run as a script (``python -I _jail.py``), so it imports nothing but the stdlib.

Two processes, because a program can read and write all of its own process (``ctypes``,
``gc.get_objects()``): whatever decides pass or fail must live in a process it cannot reach.

- the **supervisor** (this script's main process) reads its orders from stdin, builds the cell
  (namespaces, a private read-only filesystem), forks the program and afterwards reads the
  *tests* -- they never exist in the program's memory. It runs the tests itself, calling the
  program's functions over a socket that carries plain data only (numbers, strings, bytes and
  containers of them), so no object of the program's making ever reaches a test's ``==``.
- the **program** (the forked child) becomes pid 1 of a new PID namespace, gives up every way
  back to root (``setgroups([])``, a non-root real, effective and saved uid, an empty capability
  bounding set, locked securebits, no-new-privileges), takes its rlimits and runs the code. In
  the new PID namespace it cannot see or signal the supervisor; killing it kills every process it
  started, ``setsid`` or not.

The supervisor writes one JSON line to the result fd that only it holds; see ``sandbox.py`` for
the layout of that line and for the degraded modes (no namespaces, not root).
"""

import builtins
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

_libc = ctypes.CDLL(None, use_errno=True)
_NEWNS, _NEWIPC, _NEWUSER, _NEWPID, _NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
_RDONLY, _NOSUID, _NODEV, _NOEXEC, _REMOUNT, _BIND, _REC, _PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_SET_NO_NEW_PRIVS = 1, 24, 28, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# securebits: NOROOT, NO_SETUID_FIXUP_LOCKED, KEEP_CAPS_LOCKED, NO_CAP_AMBIENT_RAISE (+ locks)
_SECURE_BITS = 0x01 | 0x02 | 0x08 | 0x20 | 0x40 | 0x80
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
_MAX_MESSAGE = 64 << 20
# Modules a program may import, loaded before the uid drop where the cell has no private
# filesystem view (the interpreter may live in a folder only root can read, e.g. /root/.pyenv).
_PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
            "typing", "random", "copy", "statistics", "fractions", "decimal", "operator", "hashlib",
            "datetime", "cmath", "array", "textwrap", "unicodedata", "traceback")


def _sys(ret: int, what: str) -> int:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _mount(src, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _sys(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


# --- the cell: namespaces and a private filesystem view -------------------------------------

def _unshare(net: bool) -> str:
    """New mount, IPC, PID (and network) namespaces: 'root' when we hold the privileges,
    'userns' through an unprivileged user namespace, '' when the kernel refuses both."""
    flags = _NEWNS | _NEWIPC | _NEWPID | (_NEWNET if net else 0)
    if os.geteuid() == 0 and _libc.unshare(flags) == 0:
        return "root"
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(flags | _NEWUSER) != 0:
        return ""
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return "userns"


def _locked_flags(path: str) -> int:
    """Flags a bind mount must keep when remounted read-only (the kernel refuses to clear them
    inside a user namespace)."""
    f = os.statvfs(path).f_flag
    out = _NOEXEC if f & os.ST_NOEXEC else 0
    for st, ms in ((os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21)):
        out |= ms if f & st else 0
    return out


def _bind(src: str, root: str, writable: bool = False) -> None:
    dst = root + src
    if os.path.islink(src):  # /bin -> usr/bin on merged-/usr systems: the same link
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(os.readlink(src), dst)
        return
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "w").close()
    _mount(src, dst, None, _BIND)
    if not writable:
        _mount(None, dst, None, _REMOUNT | _BIND | _RDONLY | _NOSUID | _NODEV | _locked_flags(src))


def _system_paths() -> list[str]:
    """What the interpreter and the C libraries it loads need, read-only; nothing else of the host."""
    exe = os.path.realpath(sys.executable)
    paths = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
             os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), os.path.dirname(exe)]
    out: list[str] = []
    for p in sorted(set(paths), key=len):
        if os.path.lexists(p) and not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _pivot(root: str) -> None:
    nr = _PIVOT_ROOT.get(os.uname().machine)
    os.chdir(root)
    if nr is None or _libc.syscall(nr, b".", b".") != 0:
        raise OSError(ctypes.get_errno(), "pivot_root")
    _sys(_libc.umount2(b".", 2), "umount old root")  # MNT_DETACH: the host tree is gone from here
    os.chdir("/")


def _build_fs(root: str, work: str, owner: int, tmp_mb: int) -> None:
    """A tmpfs root holding read-only binds of the system folders, /dev/{null,zero,random,urandom}
    and a private /tmp (with the work dir) -- no /proc, /run, /home, /root or host /tmp, so no
    host file to read or write and no host Unix socket to connect to."""
    _mount(None, "/", None, _REC | _PRIVATE)
    _mount("tmpfs", root, "tmpfs", _NOSUID | _NODEV, "size=1m,mode=755")
    os.makedirs(root + "/tmp")  # first: an interpreter that lives under /tmp (a CI venv) is bound inside it
    _mount("tmpfs", root + "/tmp", "tmpfs", _NOSUID | _NODEV, f"size={tmp_mb}m,mode=1777")
    for p in _system_paths():
        _bind(p, root)
    for dev in ("null", "zero", "random", "urandom"):
        _bind("/dev/" + dev, root, writable=True)
    os.makedirs(root + work, mode=0o700)
    os.chown(root + work, owner, owner)
    _mount(None, root, None, _REMOUNT | _RDONLY | _NOSUID | _NODEV)
    _pivot(root)


# --- the program side ---------------------------------------------------------------------

def _drop_privileges(uid: int | None, cap_last: int) -> None:
    """No way back to root: empty bounding and ambient sets, locked securebits, non-root uids
    (real, effective, saved) and no groups, or -- in a user namespace where only one uid
    exists -- an empty capability set; then no-new-privileges so no exec can grant anything."""
    if uid is not None or os.geteuid() == 0:
        for cap in range(cap_last + 1):
            _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
        _libc.prctl(_PR_SET_SECUREBITS, _SECURE_BITS, 0, 0, 0)
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _sys(_libc.capset(hdr, (ctypes.c_uint32 * 6)()), "capset")
    _sys(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after the uid change, which clears it


def _limit(cfg: dict) -> None:
    for which, value in ((resource.RLIMIT_NPROC, cfg["nproc"]), (resource.RLIMIT_AS, cfg["memory_bytes"]),
                         (resource.RLIMIT_CPU, cfg["cpu_seconds"]), (resource.RLIMIT_FSIZE, cfg["file_bytes"]),
                         (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


def _guard() -> None:
    """Accident guards on top of the kernel's walls: careless code gets a clear error early."""
    def blocked(*a, **k):
        raise PermissionError("blocked by the evolm sandbox")
    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "setpgid", "putenv",
                 "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
                 "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                 "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir", "removedirs", "rename",
                 "renames", "truncate", "chmod", "fchmod", "chown", "fchown", "lchown", "chroot"):
        if hasattr(os, name):
            setattr(os, name, blocked)
    for name in ("Popen", "call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, blocked)
    shutil.rmtree = shutil.move = shutil.chown = blocked
    for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
        setattr(socket, name, blocked)
    # multiprocessing needs no patch of its own (its default start method calls os.fork), and
    # importing it here would cost every program ~5 ms


def _program(cfg: dict, cell: dict, chan: int) -> None:
    """The forked child: close everything but stdout/stderr and the channel, give up privileges,
    run the code, then answer the supervisor's calls. Never returns."""
    try:
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)  # the orders pipe still holds the tests: the program must never read it
        os.dup2(chan, 3)
        os.closerange(4, 1 << 16)
        os.chdir(cell["work"])
        _drop_privileges(cell["uid"], cfg["cap_last"])
        _limit(cfg)
        _guard()
    except BaseException as e:
        os.write(2, f"evolm sandbox: could not enter the cell: {e}\n".encode())
        os._exit(70)
    glb = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(cfg["code"], "<program>", "exec"), glb)
    except BaseException:  # SystemExit included: leaving early is not passing
        import traceback
        traceback.print_exc()
        _flush()
        os._exit(1)
    _flush()
    _send(3, {"ready": True, "names": [n for n in glb if isinstance(n, str)]})
    if cfg["serve"]:
        _serve(3, glb)
    os._exit(0)


def _flush() -> None:
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass


def _serve(fd: int, glb: dict) -> None:
    """Answer 'get NAME' and 'call NAME/REF with ARGS' until the supervisor hangs up. Objects
    that are not plain data travel as references the tests can only hand back."""
    refs: list = []
    while True:
        req = _recv(fd)
        if req is None:
            return
        try:
            if req["op"] == "get":
                value = glb[req["name"]]
                reply = {"callable": True} if callable(value) else {"value": _encode(value, refs)}
            else:
                fn = refs[req["ref"]] if "ref" in req else glb[req["name"]]
                args = _decode(req["args"], refs)
                value = fn(*args, **_decode(req["kwargs"], refs))
                reply = {"value": _encode(value, refs)}
        except KeyError as e:
            reply = {"raise": ["NameError", f"name {e} is not defined"]}
        except Exception as e:
            reply = {"raise": [type(e).__name__, str(e)[:1000]]}
        _flush()
        _send(fd, reply)


# --- plain data over the channel --------------------------------------------------------------

_LEAF = (type(None), bool, int, float, str)


def _encode(x, refs: list | None):
    """JSON with tags for what JSON lacks; only exact builtin types (their subclasses become the
    base type), everything else a reference in ``refs`` (program side) or an error (test side)."""
    if isinstance(x, _LEAF):
        return x if type(x) in _LEAF else (bool(x) if isinstance(x, bool) else
                                           int(x) if isinstance(x, int) else
                                           float(x) if isinstance(x, float) else str(x))
    if isinstance(x, list):
        return [_encode(v, refs) for v in x]
    if isinstance(x, tuple):
        return {"t": "tuple", "v": [_encode(v, refs) for v in x]}
    if isinstance(x, dict):
        return {"t": "dict", "v": [[_encode(k, refs), _encode(v, refs)] for k, v in x.items()]}
    if isinstance(x, (set, frozenset)):
        return {"t": type(x).__name__ if type(x) in (set, frozenset) else "set", "v": [_encode(v, refs) for v in x]}
    if isinstance(x, (bytes, bytearray)):
        return {"t": type(x).__name__ if type(x) in (bytes, bytearray) else "bytes", "v": bytes(x).decode("latin-1")}
    if isinstance(x, complex):
        return {"t": "complex", "v": [x.real, x.imag]}
    if isinstance(x, _Ref):
        return {"t": "ref", "v": x._id}
    if refs is None:
        raise TypeError(f"the sandbox passes only plain data to the program, not {type(x).__name__}")
    if hasattr(x, "__next__"):  # a generator or iterator: its items, as an iterator again
        return {"t": "iter", "v": [_encode(v, refs) for v in x]}
    refs.append(x)
    return {"t": "ref", "v": len(refs) - 1}


def _decode(x, refs: list | None):
    if isinstance(x, list):
        return [_decode(v, refs) for v in x]
    if not isinstance(x, dict):
        return x
    t, v = x["t"], x["v"]
    if t == "ref":
        return refs[v] if refs is not None else _Ref(v)
    if t == "bytes" or t == "bytearray":
        return (bytes if t == "bytes" else bytearray)(v.encode("latin-1"))
    if t == "complex":
        return complex(*v)
    if t == "dict":
        return {_decode(k, refs): _decode(w, refs) for k, w in v}
    items = [_decode(w, refs) for w in v]
    return {"tuple": tuple, "set": set, "frozenset": frozenset, "iter": iter}[t](items)


def _send(fd: int, obj) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv(fd: int):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > _MAX_MESSAGE:
        raise _Verdict("failed", f"a reply of {n} bytes from the program (limit {_MAX_MESSAGE})")
    data = _read_exact(fd, n)
    return None if data is None else json.loads(data)


# --- the supervisor side -------------------------------------------------------------------

class _Verdict(BaseException):
    """Ends the run with a status; a BaseException so no ``except Exception`` in a test hides it."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# exceptions that change control flow in the tests' loops and generators, not just fail them
_UNSAFE_RAISE = ("StopIteration", "StopAsyncIteration")


class RemoteError(Exception):
    """An exception raised inside the program whose type is not a builtin one."""


class _Ref:
    """A program object that is not plain data: the tests can hand it back, nothing else."""

    def __init__(self, ref: int):
        self._id = ref

    def __call__(self, *args, **kwargs):
        return _call({"op": "call", "ref": self._id}, args, kwargs)

    def __repr__(self):
        return f"<program object #{self._id}>"


class _Function:
    """A test's handle on a function of the program: calling it runs the call in the program."""

    def __init__(self, name: str):
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        return _call({"op": "call", "name": self.__name__}, args, kwargs)

    def __repr__(self):
        return f"<program function {self.__name__}>"


_CHAN = -1


def _call(req: dict, args, kwargs):
    req["args"], req["kwargs"] = _encode(list(args), None), _encode(dict(kwargs), None)
    return _answer(req)


def _answer(req: dict):
    """One round trip. A reply that is not well formed ends the run as failed, so the program
    cannot steer which exception a test sees other than by raising it."""
    _send(_CHAN, req)
    try:
        reply = _recv(_CHAN)
        if reply is None:
            raise _Verdict("failed", "the program exited while the tests called it")
        if "raise" in reply:
            name, msg = (str(x)[:1000] for x in reply["raise"])
        elif reply.get("callable"):
            return _Function(req["name"])
        else:
            return _decode(reply["value"], None)
    except _Verdict:
        raise
    except Exception as e:
        raise _Verdict("failed", f"bad reply from the program: {type(e).__name__}") from None
    cls = getattr(builtins, name, None)
    try:
        if not (isinstance(cls, type) and issubclass(cls, Exception)) or name in _UNSAFE_RAISE:
            raise TypeError
        err = cls(msg)
    except Exception:
        err = RemoteError(f"{name}: {msg}")
    raise err


class _Namespace(dict):
    """The tests' globals: a name the tests do not define is the program's if the program
    defines it (its function, or a copy of its data), else a builtin -- Python's own order."""

    def __init__(self, program_names, **kw):
        super().__init__(**kw)
        self._program = frozenset(program_names)

    def __missing__(self, name):
        if name in self._program:
            value = _answer({"op": "get", "name": name})
        elif hasattr(builtins, name):
            value = getattr(builtins, name)
        else:
            raise KeyError(name)
        self[name] = value
        return value


def _run_tests(tests: str, program_names) -> None:
    ns = _Namespace(program_names, __name__="__main__", __builtins__=builtins)
    try:
        exec(compile(tests, "<tests>", "exec"), ns)
    except _Verdict:
        raise
    except RecursionError:
        raise _Verdict("failed", "RecursionError in the tests")
    except BaseException as e:
        raise _Verdict("failed", f"{type(e).__name__}: {e}"[:500]) from None


def _on_alarm(signum, frame):
    raise _Verdict("timeout", "")


def _supervise(pid: int, cfg: dict, tests: str | None) -> tuple[str, str]:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, cfg["deadline"] - time.monotonic()))
    try:
        first = _recv(_CHAN)
        if not isinstance(first, dict):
            return "failed", ""
        if tests is not None:
            names = first.get("names")
            _run_tests(tests, [n for n in names if isinstance(n, str)] if isinstance(names, list) else [])
        return "passed", ""
    except _Verdict as v:
        return v.status, v.detail
    except Exception as e:  # a garbled channel (bad JSON, too deep, wrong shape) is a failure
        return "failed", f"bad message from the program: {type(e).__name__}: {e}"[:300]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _reap(pid: int, cell: dict) -> int:
    """Kill the program and everything it started. In a PID namespace its pid 1 takes all the
    rest down with it; otherwise every process of the cell's own uid, round after round until
    none is left (a fork between two rounds is caught by the next); failing both, ``sandbox.py``
    kills our process group, which the program's children share unless they left it."""
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    for _ in range(1000) if not cell["pidns"] and cell["uid"] is not None else ():
        if not _kill_uid(cell["uid"]):
            break
        time.sleep(0.002)
    return os.waitstatus_to_exitcode(status)


def _kill_uid(uid: int) -> int:
    """SIGKILL every live process of ``uid`` (zombies excluded); how many there were."""
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
            if "zombie" in fields["State"] or int(fields["Uid"].split()[0]) != uid:
                continue
            os.kill(int(entry), signal.SIGKILL)
            n += 1
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return n


def _make_cell(cfg: dict) -> dict:
    """Every wall the kernel grants, and a record of which ones it did (reported back)."""
    cell = {"uid": cfg["uid"] if os.geteuid() == 0 else None, "pidns": False, "fs": False, "net": False,
            "mode": _unshare(cfg["isolate_network"]) if cfg["namespaces"] else "", "work": cfg["work"]}
    if cell["mode"] == "userns":
        cell["uid"] = None  # only our own uid exists in there (as 0): drop capabilities instead
    if cell["mode"]:
        cell["pidns"], cell["net"] = True, cfg["isolate_network"]
        inside = "/tmp/" + os.path.basename(os.path.dirname(cfg["work"])) + "/cwd"
        try:
            _build_fs(cfg["root"], inside, cell["uid"] if cell["uid"] is not None else 0, cfg["tmp_mb"])
            cell["fs"], cell["work"] = True, inside
        except OSError as e:
            cell["fs_error"] = str(e)
    if not cell["fs"] and cell["uid"] is not None:  # the host tree, seen as a uid that owns nothing
        os.chown(cfg["work"], cell["uid"], cell["uid"])
        os.chmod(os.path.dirname(cfg["work"]), 0o711)
        for name in _PRELOAD:
            try:
                __import__(name)
            except ImportError:
                pass
    return cell


def _read_frame(fd: int):
    return json.loads(_read_exact(fd, struct.unpack(">I", _read_exact(fd, 4))[0]))


def main() -> None:
    """Orders (one frame) -> cell -> fork the program -> tests (a second frame, read only now)
    -> verdict -> kill the cell -> one JSON line on the result fd."""
    global _CHAN
    t0 = time.monotonic()
    cfg = _read_frame(0)
    cfg["deadline"] = t0 + cfg["timeout"]
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            cfg["cap_last"] = int(f.read())
    except OSError:
        cfg["cap_last"] = 63  # dropping a capability the kernel lacks is a harmless EINVAL
    cell = _make_cell(cfg)
    sup, prog = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        os.close(cfg["result_fd"])
        sup.close()
        _program(cfg, cell, prog.fileno())
    prog.close()
    _CHAN = sup.fileno()
    status, detail = "failed", "the supervisor failed"
    try:
        tests = _read_frame(0) if cfg["serve"] else None
        os.close(0)
        status, detail = _supervise(pid, cfg, tests)
    finally:
        rc = _reap(pid, cell)
        rc = 0 if status == "passed" else rc  # a passed program may still be winding down when killed
        del cell["uid"], cell["work"]
        line = json.dumps({"status": status, "returncode": rc, "detail": detail, "cell": cell}) + "\n"
        os.write(cfg["result_fd"], line.encode())


if __name__ == "__main__":
    main()
