"""The code sandbox holds against a program that tries to get out (issue 34's escapes, each as a
failing case) and still passes correct programs. Escapes use the raw ``posix`` / ``_socket``
modules, past the Python-level guards, so it is the kernel's walls that are tested.

What each test can demand depends on what the kernel gave the cell (``ExecResult.cell``): tests
of a wall the kernel refused skip and say so."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from evolm.eval import data as D
from evolm.eval import sandbox
from evolm.eval.generative import GEN_TASKS
from evolm.eval.sandbox import run_program

ROOT = os.geteuid() == 0


def _run(code: str, **kw):
    return run_program(code, timeout=kw.pop("timeout", 4.0), **kw)


def _needs(r, *walls: str) -> None:
    missing = [w for w in walls if not r.cell.get(w)]
    if missing:
        pytest.skip(f"the kernel refused {missing} here ({r.cell}); this wall is not available")


def _open_dir() -> str:
    """A host folder anybody may write: only the cell's filesystem view can keep a program out."""
    d = tempfile.mkdtemp(prefix="evolm-escape-", dir="/tmp")
    os.chmod(d, 0o777)
    return d


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


def _pids_with_arg(marker: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read().split(b"\0") and _alive(int(entry)):
                    out.append(int(entry))
        except (OSError, ValueError):
            pass
    return out


def _marker() -> str:
    return f"1000.{secrets.randbelow(10**9)}"  # a `sleep` argument no other process has


def _reap_leftovers(marker: str) -> list[int]:
    """The processes a broken sandbox let survive (killed here, so a failure leaves nothing)."""
    deadline, left = time.time() + 5, _pids_with_arg(marker)
    while left and time.time() < deadline:
        time.sleep(0.05)
        left = _pids_with_arg(marker)
    for pid in left:
        os.kill(pid, 9)
    return left


# --- escapes: each must fail to reach the host ------------------------------------------------

def test_cannot_write_outside_its_work_dir():
    d = _open_dir()
    targets = [os.path.join(d, "planted"), f"/tmp/evolm-planted-{secrets.token_hex(4)}",
               f"/dev/shm/evolm-planted-{secrets.token_hex(4)}", f"/var/tmp/evolm-planted-{secrets.token_hex(4)}"]
    code = "import posix\nfor p in %r:\n    try:\n        posix.close(posix.open(p, posix.O_WRONLY | posix.O_CREAT, 0o666))\n" \
           "        print('wrote', p)\n    except OSError as e:\n        print('refused', p, e)\n" % targets
    r = _run(code)
    planted = [p for p in targets if os.path.exists(p)]
    for p in planted:
        os.remove(p)
    os.rmdir(d)
    assert r.passed, r
    _needs(r, "fs")
    assert planted == []


def test_cannot_read_etc_shadow_or_a_host_file():
    d = _open_dir()
    secret = os.path.join(d, "secret")
    with open(secret, "w") as f:
        f.write("the-host-secret")
    os.chmod(secret, 0o644)
    code = "for p in ('/etc/shadow', %r):\n    try:\n        print(open(p).read())\n" \
           "    except OSError as e:\n        print('refused', p, e.strerror)\n" % secret
    r = _run(code)
    os.remove(secret)
    os.rmdir(d)
    assert r.passed, r
    if os.path.exists("/etc/shadow") and ROOT:
        assert "refused /etc/shadow" in r.stdout and "root:" not in r.stdout
    _needs(r, "fs")
    assert "the-host-secret" not in r.stdout


def test_cannot_unlink_a_host_file():
    d = _open_dir()
    victim = os.path.join(d, "victim")
    open(victim, "w").close()
    os.chmod(victim, 0o666)
    r = _run(f"import posix\ntry:\n    posix.unlink({victim!r})\nexcept OSError as e:\n    print('refused', e)\n")
    survived = os.path.exists(victim)
    if survived:
        os.remove(victim)
    os.rmdir(d)
    assert r.passed, r
    _needs(r, "fs")
    assert survived


def test_cannot_signal_another_process():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        # kill(-1) only as pid 1 of a PID namespace: anywhere else a broken sandbox would let it
        # kill every process of the machine (or of our uid)
        r = _run(f"import posix\nfor pid in ({victim.pid}, -1):\n    if pid == -1 and posix.getpid() != 1:\n"
                 "        continue\n    try:\n        posix.kill(pid, 9)\n"
                 "    except OSError as e:\n        print('refused', pid, e)\n")
        time.sleep(0.1)
        if not ROOT and not r.cell.get("pidns"):
            pytest.skip("not root and no PID namespace: the program runs as our own uid")
        assert victim.poll() is None, r
    finally:
        victim.kill()
        victim.wait()


def test_cannot_connect_to_a_host_unix_socket():
    d = _open_dir()
    path = os.path.join(d, "s")
    abstract = f"\0evolm-test-{secrets.token_hex(4)}"
    servers = []
    for addr in (path, abstract):
        s = socket.socket(socket.AF_UNIX)
        s.bind(addr)
        s.listen(4)
        s.setblocking(False)
        servers.append(s)
    os.chmod(path, 0o777)
    code = ("import _socket\nfor a in %r:\n    s = _socket.socket(_socket.AF_UNIX)\n    try:\n"
            "        s.connect(a)\n        print('connected', repr(a))\n"
            "    except OSError as e:\n        print('refused', repr(a), e)\n" % [path, abstract])
    r = _run(code)
    accepted = []
    for s in servers:
        try:
            accepted.append(s.accept())
        except BlockingIOError:
            pass
        s.close()
    os.remove(path)
    os.rmdir(d)
    assert r.passed, r
    _needs(r, "fs", "net")
    assert accepted == [] and "connected" not in r.stdout, r.stdout


def test_cannot_regain_root_or_any_capability():
    code = """
import ctypes, os, posix
libc = ctypes.CDLL(None, use_errno=True)
for name, call in (("setresuid", lambda: posix.setresuid(0, 0, 0)), ("setuid", lambda: posix.setuid(0)),
                   ("setgroups", lambda: posix.setgroups([0]))):
    try:
        call()
        print("regained", name)
    except OSError as e:
        print("refused", name, e.errno)
hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
caps = (ctypes.c_uint32 * 6)()
libc.capget(hdr, caps)
bounding = [c for c in range(41) if libc.prctl(23, c, 0, 0, 0) == 1]  # PR_CAPBSET_READ
print("uids", *posix.getresuid(), "caps", *caps, "bounding", bounding, "nnp", libc.prctl(39, 0, 0, 0, 0))
"""
    r = _run(code)
    assert r.passed, r
    assert "regained" not in r.stdout, r.stdout
    info = r.stdout.split("uids")[1].split()
    assert info[4:10] == ["0"] * 6, r.stdout  # effective, permitted, inheritable: empty
    assert r.stdout.strip().endswith("nnp 1"), r.stdout
    if ROOT or r.cell.get("mode"):  # emptying the bounding set takes CAP_SETPCAP
        assert "bounding []" in r.stdout, r.stdout
    if ROOT and r.cell.get("mode") != "userns":
        assert all(int(u) != 0 for u in info[:3]), r.stdout  # real, effective, saved


def test_fork_bomb_is_bounded_and_every_process_dies_after_a_setresuid_try():
    marker = _marker()
    code = f"""
import posix
try:
    posix.setresuid(0, 0, 0)
except OSError:
    pass
n = 0
while n < 200:
    try:
        pid = posix.fork()
    except OSError:
        break
    if pid == 0:
        posix.execv("/bin/sleep", ["sleep", "{marker}"])
    n += 1
print("forked", n, flush=True)
"""
    r = _run(code, nproc=16, timeout=6.0)
    assert r.passed, r
    if not ROOT and not r.cell.get("mode"):
        pytest.skip("not root and no user namespace: RLIMIT_NPROC counts all of our own processes")
    left = _reap_leftovers(marker)
    assert 0 < int(r.stdout.split()[1]) < 16, r.stdout
    assert left == []


def test_a_setsid_grandchild_is_killed_with_the_program():
    marker = _marker()
    code = f"""
import posix, time
if posix.fork() == 0:
    posix.setsid()
    if posix.fork() == 0:
        posix.execv("/bin/sleep", ["sleep", "{marker}"])
    posix._exit(0)
time.sleep(1.5)
"""
    box = []
    t = threading.Thread(target=lambda: box.append(_run(code)))
    t.start()
    pids, deadline = [], time.time() + 3
    while not pids and time.time() < deadline:
        pids = _pids_with_arg(marker)
        time.sleep(0.02)
    t.join()
    left = _reap_leftovers(marker)
    assert box[0].passed, box[0]
    if not box[0].cell.get("pidns") and not (ROOT and box[0].cell.get("mode") == ""):
        pytest.skip("no PID namespace and not root: a setsid child can leave the process group")
    assert pids, "the grandchild never started"
    assert left == [] and not [p for p in pids if _alive(p)]


FORGERIES = {
    "token from __main__ to every fd": """
import __main__, posix, json, struct
for name in ('token', 'cfg', 'tests'):
    print(name, repr(getattr(__main__, name, None))[:80])
msg = json.dumps({"ready": True, "names": ["f", "check"], "value": True, "status": "passed"}).encode()
for fd in range(3, 64):
    for data in (b"passed " + str(getattr(__main__, "token", "")).encode() + b"\\n", struct.pack(">I", len(msg)) + msg):
        try:
            posix.write(fd, data)
        except OSError:
            pass
posix._exit(0)
""",
    "always-equal result": """
class Yes:
    def __eq__(self, other):
        return True
    __ne__ = lambda self, other: False
    __bool__ = lambda self: True
def f(x):
    return Yes()
""",
    "StopIteration out of the function": "def f(x):\n    raise StopIteration\n",
    "patched builtins": "import builtins\nbuiltins.AssertionError = type('Never', (BaseException,), {})\n"
                        "def f(x):\n    return 0\n",
    "sys.exit(0) at import": "import sys\nsys.exit(0)\n",
}
TESTS = "assert f(1) == 2, 'evolm-test-marker'\nassert all(map(lambda x: f(x) == x + 1, [1, 2]))\n"


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_forged_pass_still_fails(name):
    r = _run(FORGERIES[name], tests=TESTS)
    assert r.status == "failed", (name, r)


@pytest.mark.skipif(not (D.default_data_dir() / ".done").is_file(),
                    reason="missing asset benchmark data (required; install: make eval-data)")
def test_humaneval_scoring_is_not_fooled_by_forging_completions():
    """The issue's attack, end to end: wrong completions that forge the verdict score pass@1 = 0."""
    import dataclasses

    task = dataclasses.replace(GEN_TASKS["humaneval"], ks=(1,))
    docs = D.load("humaneval", "test")[:2]
    forged = ["    return Yes()\n" + FORGERIES["always-equal result"].replace("def f(x):\n    return Yes()\n", ""),
              "    return None\n" + FORGERIES["token from __main__ to every fd"]]
    m = task.score(task, docs, [forged for _ in docs], workers=2)
    assert m["pass@1"] == 0.0, m["_details"]


def test_the_tests_never_exist_in_the_programs_memory():
    """Else a program could read the expected answers. Every string reachable from a tracked
    container (module globals included) and fd 0 are searched for a marker the tests hold."""
    code = """
import gc, posix
marker = 'evolm-test-' + 'marker'  # built here, so this source does not hold it
def strings():
    for o in gc.get_objects():
        if isinstance(o, dict):
            yield from (x for kv in o.items() for x in kv)
        elif isinstance(o, (list, tuple, set, frozenset)):
            yield from o
        elif callable(o) and hasattr(o, '__code__'):
            yield from o.__code__.co_consts
seen = any(isinstance(x, str) and x is not marker and marker in x for x in strings())
try:
    seen = seen or marker.encode() in posix.read(0, 1 << 20)
except OSError:
    pass
print('seen' if seen else 'unseen', flush=True)
def f(x):
    return x + 1
"""
    r = _run(code, tests=TESTS)
    assert r.passed and r.stdout.strip() == "unseen", r


# --- what must keep working -------------------------------------------------------------------

def test_correct_programs_pass_and_wrong_ones_fail_against_separate_tests():
    code = """
import math, re, collections, itertools, functools, heapq, random, decimal, fractions, statistics
class Pair:
    def __init__(self, a, b):
        self.a, self.b = a, b
def chain(pairs):
    return sum(p.b - p.a for p in pairs)
def evens(n):
    return (i for i in range(n) if i % 2 == 0)
def stats(xs, *, scale=1):
    return {"mean": statistics.mean(xs) * scale, "set": {1, 2}, "t": (1.5, b"x", None, complex(1, 2))}
def check_positive(x):
    if x < 0:
        raise ValueError("negative")
    return math.sqrt(x)
"""
    tests = """
import math
assert chain([Pair(1, 3), Pair(2, 7)]) == 7
assert list(evens(7)) == [0, 2, 4, 6]
assert stats([1, 2, 3], scale=2) == {"mean": 4, "set": {1, 2}, "t": (1.5, b"x", None, 1 + 2j)}
try:
    check_positive(-1)
    assert False
except ValueError:
    pass
assert math.isclose(check_positive(2.0), 2 ** 0.5)
"""
    assert _run(code, tests=tests).passed
    r = _run(code.replace("p.b - p.a", "p.a - p.b"), tests=tests)
    assert r.status == "failed" and "AssertionError" in r.detail, r


def test_a_program_that_breaks_at_import_or_hangs_in_a_call_fails():
    assert _run("raise ValueError('boom')", tests="assert True").detail.endswith("ValueError: boom")
    r = _run("def f():\n    while True:\n        pass\n", tests="f()", timeout=1.0)
    assert r.status == "timeout"


def test_without_namespaces_root_still_drops_to_a_uid_that_owns_nothing(monkeypatch):
    """The degraded mode a container without CAP_SYS_ADMIN gets: checked here by switching it on."""
    if not ROOT:
        pytest.skip("the uid-only mode is the root fallback")
    monkeypatch.setattr(sandbox, "_NAMESPACES", False)
    victim = subprocess.Popen(["sleep", "30"])
    marker = _marker()
    try:
        with pytest.warns(RuntimeWarning, match="without pidns, fs, net"):
            sandbox._warned.clear()
            r = _run(f"import posix, math\nprint(posix.getresuid())\ntry:\n    posix.kill({victim.pid}, 9)\n"
                     "except OSError as e:\n    print('refused', e)\nif posix.fork() == 0:\n    posix.setsid()\n"
                     f"    posix.execv('/bin/sleep', ['sleep', '{marker}'])\n")
        assert r.passed and "refused" in r.stdout and "(0," not in r.stdout, r
        assert victim.poll() is None
        assert _run("def f(x):\n    return x * 2\n", tests="assert f(2) == 4").passed
        assert _reap_leftovers(marker) == []
    finally:
        victim.kill()
        victim.wait()
