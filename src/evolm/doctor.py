"""``evolm doctor``: is this machine ready for evolm, and if not, which command makes it so.

Why: a failing ``make test`` on a fresh machine can mean a missing compiler, an old Python, a
registry that stopped serving a pinned file, or a data set never installed, and each shows up far
from its cause. The doctor looks at all of them in seconds and prints one table, one row per
check: its status (ok / missing / warn / fail), what it found, and the exact command that fixes it.

Only the standard library is needed (``python3 scripts/doctor.py`` runs it before the virtual
environment exists); torch is imported lazily and reported missing when absent, and ``rich`` draws
the table when importable. Exit status 1 when a row fails (a required asset the registry no longer
serves, or serves changed), else 0.

    evolm doctor [--offline] [--json]
    python3 scripts/doctor.py [--offline] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

STATUSES = ("ok", "missing", "warn", "fail")
TESTED_PYTHON = (3, 11)  # tomllib is standard from 3.11, and 3.11 is what the tests run on
TORCH_PIN = "2.13.0"  # the Makefile's pin (CPU wheel)
# evolm.data.corpora.BUILTIN, as (name, optional): that module imports the package, hence torch
# (tests/test_doctor.py checks the two agree)
CORPORA = (("shakespeare", False), ("kjv", False), ("python_stdlib", False), ("python_docs", True))
# asset groups are named after the make targets that fetch them, except these
GROUP_TARGETS = {"reference": "setup", "bench": "bench-deps"}
MIN_FREE_MEMORY = 4 << 30  # `make test` runs two workers, each loading real models
DISK_MARGIN = 1 << 30  # free space to keep beyond the files still to fetch


@dataclass(frozen=True)
class Row:
    """One line of the report: a check, its status, what was found, and the command that fixes it."""

    check: str
    status: str
    detail: str
    fix: str = ""


# ---------------------------------------------------------------------------------------------
# where things are
# ---------------------------------------------------------------------------------------------
def repo_root() -> Path | None:
    """The source checkout this file lives in (None when evolm runs as an installed package)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "Makefile").is_file() else None


def load_assets_module() -> ModuleType:
    """``evolm/assets.py``: the package's own module when the doctor runs inside evolm; else loaded
    by file path next to this file, because importing the package imports torch (not there yet)."""
    if __package__ == "evolm":
        from evolm import assets

        return assets
    if "evolm_assets" in sys.modules:  # scripts/assets.py's name for the same file
        return sys.modules["evolm_assets"]
    spec = importlib.util.spec_from_file_location("evolm_assets", Path(__file__).with_name("assets.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["evolm_assets"] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["evolm_assets"]
        raise
    return module


def make(target: str) -> str:
    return f"make {target}"


def fix_for_groups(asset_name: str, groups: tuple[str, ...]) -> str:
    """The make target(s) that fetch an asset; an asset in no group is fetched by name."""
    if not groups:
        return f"python3 scripts/assets.py fetch --name {asset_name}"
    return "; ".join(make(GROUP_TARGETS.get(g, g)) for g in groups)


def _run_quiet(cmd: list[str], timeout: float = 10) -> str | None:
    """First line of a command's output, or None when it cannot run."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0].strip() if p.returncode == 0 and lines else None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


# ---------------------------------------------------------------------------------------------
# the interpreter, the virtual environment, torch, the GPU
# ---------------------------------------------------------------------------------------------
def check_python() -> Row:
    """The running interpreter: the manifest reader needs tomllib (3.11+); 3.11 is what is tested."""
    v = sys.version_info
    found = f"{platform.python_version()} ({sys.executable})"
    if v[:2] < TESTED_PYTHON:
        return Row("python", "fail", f"{found}: need >= 3.11 (tomllib)",
                   "apt-get install -y python3.11 python3.11-venv && make setup PY=python3.11")
    note = "" if v[:2] == TESTED_PYTHON else " (tested on 3.11)"
    return Row("python", "ok", found + note)


def _venv_python_version(venv: Path) -> str:
    """The venv's Python version, from pyvenv.cfg (no need to start it)."""
    try:
        text = (venv / "pyvenv.cfg").read_text()
    except OSError:
        return "?"
    m = re.search(r"^version(?:_info)?\s*=\s*(\S+)", text, re.M)
    return m.group(1) if m else "?"


def check_venv(repo: Path | None) -> Row:
    """``.venv`` of the checkout: every make target but ``browser`` runs through it."""
    if repo is None:
        return Row("venv", "ok", "not a source checkout (evolm runs as an installed package)")
    venv = repo / ".venv"
    if not (venv / "bin" / "python").exists():
        return Row("venv", "missing", f"no {venv}/bin/python", make("setup"))
    if not (venv / ".installed").exists():
        return Row("venv", "warn", f"{venv} exists but `make setup` did not finish (no .installed stamp)",
                   make("setup"))
    return Row("venv", "ok", f"{venv} (Python {_venv_python_version(venv)})")


def import_torch() -> ModuleType | None:
    """torch if this interpreter has it (imported only now: the doctor runs without it)."""
    try:
        return importlib.import_module("torch")
    except Exception:  # ImportError, or a broken install (OSError loading its libraries)
        return None


def venv_distribution_version(repo: Path | None, package: str) -> str | None:
    """The version of ``package`` installed in the checkout's venv (read from its dist-info folder,
    so a doctor run by the system Python still sees what the venv has)."""
    if repo is None:
        return None
    norm = re.sub(r"[-_.]+", "_", package).lower()
    for info in (repo / ".venv" / "lib").glob("python*/site-packages/*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].partition("-")
        if re.sub(r"[-_.]+", "_", name).lower() == norm:
            return version
    return None


def check_torch(repo: Path | None) -> Row:
    """torch's version against the pin, its build (CPU or CUDA) and its thread count."""
    torch = import_torch()
    if torch is None:
        in_venv = venv_distribution_version(repo, "torch")
        if in_venv:
            return Row("torch", "ok", f"{in_venv} in .venv (this interpreter has none; "
                                      "`.venv/bin/evolm doctor` shows its build and threads)")
        return Row("torch", "missing", f"not importable by {sys.executable}", make("setup"))
    version = torch.__version__
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    found = f"{version}, {build} build, {torch.get_num_threads()} threads"
    if version.split("+")[0] != TORCH_PIN:
        return Row("torch", "warn", f"{found}; pinned {TORCH_PIN} (CPU wheel)",
                   f"{sys.executable} -m pip install torch=={TORCH_PIN}")
    return Row("torch", "ok", found)


def check_gpu() -> Row:
    """A CUDA GPU is optional: without one the CUDA tests skip, so absence is not a problem."""
    torch = import_torch()
    if torch is None:
        seen = _run_quiet(["nvidia-smi", "-L"])
        if seen:
            return Row("gpu", "ok", f"{seen} (nvidia-smi; no torch here to check CUDA)")
        return Row("gpu", "ok", "none (CUDA tests skip)")
    if not torch.cuda.is_available():
        return Row("gpu", "ok", "none (CUDA tests skip)")
    n = torch.cuda.device_count()
    return Row("gpu", "ok", f"{torch.cuda.get_device_name(0)}" + (f" (+{n - 1} more)" if n > 1 else ""))


# ---------------------------------------------------------------------------------------------
# the CPU, the compiler, chromium, disk and memory
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    logical: int
    physical: int | None  # cores (None: /proc/cpuinfo does not say)


def read_cpuinfo(path: str | os.PathLike = "/proc/cpuinfo") -> CpuInfo | None:
    """Model name, ISA flags and core counts from /proc/cpuinfo (None where there is none)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    model, flags, cores, logical = "", frozenset(), set(), 0
    for block in text.split("\n\n"):
        fields = dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in block.splitlines()))
        if "processor" not in fields:
            continue
        logical += 1
        model = model or fields.get("model name", "") or fields.get("Hardware", "")
        flags = flags or frozenset((fields.get("flags") or fields.get("Features") or "").split())
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return CpuInfo(model or platform.processor() or "unknown", flags, logical or os.cpu_count() or 1,
                   len(cores) or None)


def float_kernel_width(flags: frozenset[str] | set[str]) -> str:
    """The vector width of evolm's float kernels (simd.h: V16 needs AVX-512F, V8 AVX2 + FMA)."""
    if "avx512f" in flags:
        return "AVX-512 + BF16" if "avx512_bf16" in flags else "AVX-512"
    if {"avx2", "fma"} <= set(flags):
        return "AVX2"
    return "scalar"


def quant_kernel_width(flags: frozenset[str] | set[str]) -> str:
    """The quantized GEMV's path (qgemv.cpp: VNNI needs AVX512-VNNI + VL, else AVX2, else scalar)."""
    if {"avx512_vnni", "avx512vl"} <= set(flags):
        return "AVX512-VNNI"
    return "AVX2" if "avx2" in flags else "scalar"


def check_cpu(info: CpuInfo | None) -> Row:
    """Model and core counts, which size the thread count and what to expect from the benchmarks."""
    if info is None:
        return Row("cpu", "ok", f"{platform.machine()}, {os.cpu_count()} logical CPUs (no /proc/cpuinfo)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else info.logical
    cores = f"{info.physical} cores, " if info.physical else ""
    return Row("cpu", "ok", f"{info.model}: {cores}{info.logical} logical CPUs ({usable} usable here)")


def check_isa(info: CpuInfo | None) -> Row:
    """Which code path the C++ kernels (built with -march=native) will take on this CPU."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return Row("kernel isa", "ok", f"{platform.machine()}: evolm's C++ kernels are x86-64 only; "
                                       "PyTorch's kernels are used")
    if info is None:
        return Row("kernel isa", "warn", "cannot read /proc/cpuinfo: the kernels' path is unknown")
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
             if f in info.flags]
    width = float_kernel_width(info.flags)
    detail = (f"float kernels {width}, quantized {quant_kernel_width(info.flags)} "
              f"(flags: {' '.join(shown) or 'none of avx2/fma/avx512'})")
    if width == "scalar":
        return Row("kernel isa", "warn", detail + "; scalar loops are slow, decoding falls back to PyTorch's")
    return Row("kernel isa", "ok", detail)


def check_compiler() -> Row:
    """The C++ compiler torch's extension loader calls ($CXX, else c++) to build the kernels at first
    use; torch.compile's CPU backend needs it too."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        other = shutil.which("g++")
        hint = f" (g++ is at {other}: export CXX=g++)" if other else ""
        return Row("c++ compiler", "warn", f"no {cxx} on PATH{hint}; the kernels fall back to PyTorch's",
                   "apt-get install -y g++")
    return Row("c++ compiler", "ok", f"{path}: {_run_quiet([path, '--version']) or 'version unknown'}")


def check_chromium() -> Row:
    """Debian's chromium for tests/test_serve_browser.py ($EVOLM_CHROMIUM, else chromium on PATH)."""
    env = os.environ.get("EVOLM_CHROMIUM")
    path = env if env and os.access(env, os.X_OK) else (None if env else shutil.which("chromium"))
    if path is None:
        where = f"$EVOLM_CHROMIUM={env} is not an executable" if env else "no chromium on PATH"
        return Row("chromium", "warn", f"{where}; tests/test_serve_browser.py skips", make("browser"))
    version = _run_quiet([path, "--version"])
    note = ("" if env or Path(path).resolve() == Path("/usr/bin/chromium").resolve()
            else f"; the browser test looks at /usr/bin/chromium: export EVOLM_CHROMIUM={path}")
    return Row("chromium", "ok", f"{path}: {version or 'version unknown'}{note}")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(cache: Path, bytes_to_fetch: int) -> Row:
    """Free space where the assets land: enough for what is still to fetch, plus a margin."""
    free = shutil.disk_usage(_existing_parent(cache)).free
    detail = f"{_gib(free)} free at {cache} ({_mb(bytes_to_fetch)} still to fetch)"
    if free < bytes_to_fetch + DISK_MARGIN:
        return Row("disk", "warn", detail, "export EVOLM_CACHE=/path/on/a/bigger/disk")
    return Row("disk", "ok", detail)


def read_meminfo(path: str | os.PathLike = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for ln in lines:
        key, _, rest = ln.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def check_memory(meminfo: dict[str, int]) -> Row:
    """Available memory: `make test` runs two pytest workers, each loading real models."""
    if "MemTotal" not in meminfo:
        return Row("memory", "ok", "unknown (no /proc/meminfo)")
    available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    detail = f"{_gib(available)} available of {_gib(meminfo['MemTotal'])}"
    if available < MIN_FREE_MEMORY:
        return Row("memory", "warn", f"{detail}; `make test` wants ~{_gib(MIN_FREE_MEMORY)}",
                   ".venv/bin/python -m pytest tests  # one worker")
    return Row("memory", "ok", detail)


# ---------------------------------------------------------------------------------------------
# the pinned assets and the model files built from them
# ---------------------------------------------------------------------------------------------
def asset_summary(a) -> str:
    return f"{a.spec}, {_mb(a.size)}, {'required' if a.required else 'optional'}"


def present_asset_row(a, cache: Path, assets: ModuleType) -> Row:
    where = "installed (apt)" if a.use == "apt" else f"present ({assets.local_path(a, cache)})"
    return Row(f"asset {a.name}", "ok", f"{asset_summary(a)}: {where}")


def pip_asset_in_venv_row(a, repo: Path | None) -> Row | None:
    """A ``use = "pip"`` asset already installed in the venv at its pinned version needs no fetch."""
    if a.use != "pip" or venv_distribution_version(repo, a.package) != a.version:
        return None
    return Row(f"asset {a.name}", "ok", f"{asset_summary(a)}: installed in .venv (not cached)")


@dataclass(frozen=True)
class RegistryAnswer:
    """What probing an asset gave: ``asked`` False when the probe could not be made (then ``problem``
    says why, and it is no verdict on the asset), else ``problem`` is None when it is served unchanged."""

    asked: bool
    problem: str | None = None


def absent_asset_row(a, answer: RegistryAnswer | None) -> Row:
    """Not in the cache: what the registry said (None: not asked, offline), and the command to run."""
    fix = fix_for_groups(a.name, a.groups)
    name, what = f"asset {a.name}", asset_summary(a)
    if not a.groups and not a.required and (answer is None or answer.problem is None):
        # no make target fetches it: what needs it fetches it, and only then (needed_by says when)
        return Row(name, "ok", f"{what}: not in the cache, fetched on demand: {a.needed_by}", fix)
    if answer is None:
        return Row(name, "missing", f"{what}: not in the cache", fix)
    if not answer.asked:
        return Row(name, "warn", f"{what}: not in the cache; {answer.problem}", fix)
    if answer.problem is None:
        return Row(name, "ok", f"{what}: not in the cache, served ({_mb(a.size)} to fetch)", fix)
    if not a.required:
        return Row(name, "warn", f"{what}: {answer.problem}", fix)
    return Row(name, "fail", f"{what}: {answer.problem}",
               f"python3 scripts/assets.py pin {a.registry} {a.package} NEW_VERSION  # re-pin in src/evolm/assets.toml")


def probe_registries(absent: list, assets: ModuleType) -> dict[str, RegistryAnswer]:
    """Ask the registries about every absent asset (assets.probe_all: seconds, no download). PyPI is
    asked through this interpreter's pip, so without pip there is no answer rather than a wrong one;
    a probe that breaks is reported on its rows, not raised."""
    no_pip = not assets.has_pip()
    unaskable = [a for a in absent if no_pip and a.registry == "pypi"]
    askable = [a for a in absent if a not in unaskable]
    out = {a.name: RegistryAnswer(False, f"cannot ask PyPI: {sys.executable} has no pip") for a in unaskable}
    try:
        out.update({name: RegistryAnswer(True, problem) for name, problem in assets.probe_all(askable).items()})
    except Exception as e:  # the probe itself broke
        out.update({a.name: RegistryAnswer(False, f"cannot ask {a.registry}: {type(e).__name__}: {e}")
                    for a in askable})
    return out


def asset_rows(manifest, cache: Path, online: bool, repo: Path | None, assets: ModuleType) -> list[Row]:
    """One row per [[asset]]: present, or (online) still served unchanged, or what is wrong."""
    rows: dict[str, Row] = {}
    absent = []
    for a in manifest.assets.values():
        if assets.is_present(a, cache):
            rows[a.name] = present_asset_row(a, cache, assets)
        elif row := pip_asset_in_venv_row(a, repo):
            rows[a.name] = row
        else:
            absent.append(a)
    answers = probe_registries(absent, assets) if online and absent else {}
    for a in absent:
        answer = answers.get(a.name, RegistryAnswer(False, "the probe gave no answer")) if online else None
        rows[a.name] = absent_asset_row(a, answer)
    return [rows[name] for name in manifest.assets]


def model_rows(manifest, cache: Path, assets: ModuleType) -> list[Row]:
    """One row per [[model]]: the file built from cached archives, present with its pinned size or not."""
    rows = []
    for mf in manifest.models.values():
        path = assets.model_path(mf.name, manifest, cache)
        if path.is_file() and path.stat().st_size == mf.size:
            rows.append(Row(f"model {mf.name}", "ok", f"{path} ({_mb(mf.size)})"))
        else:
            rows.append(Row(f"model {mf.name}", "missing", f"{path} not built ({_mb(mf.size)})", make("models")))
    return rows


def bytes_still_to_fetch(manifest, cache: Path, assets: ModuleType) -> int:
    """What ``make test`` would still download into the cache (apt packages land elsewhere)."""
    todo = sum(a.size for a in manifest.assets.values() if a.use != "apt" and not assets.is_present(a, cache))
    for mf in manifest.models.values():
        path = assets.model_path(mf.name, manifest, cache)
        todo += 0 if path.is_file() and path.stat().st_size == mf.size else mf.size
    return todo


# ---------------------------------------------------------------------------------------------
# the data folders the installers write
# ---------------------------------------------------------------------------------------------
def data_dir(env: str, repo: Path | None, sub: str) -> Path:
    """``$env``, else ``data/<sub>`` of the checkout (of the working folder outside one)."""
    value = os.environ.get(env)
    return Path(value) if value else (repo or Path.cwd()) / "data" / sub


def corpus_rows(folder: Path) -> list[Row]:
    """Each built-in corpus is ``NAME.jsonl`` plus ``NAME.json`` (its counts) in data/corpora."""
    rows = []
    for name, optional in CORPORA:
        meta, docs = folder / f"{name}.json", folder / f"{name}.jsonl"
        if not (meta.is_file() and docs.is_file()):
            what = "optional, " if optional else ""
            rows.append(Row(f"corpus {name}", "missing", f"{what}no {meta.name} + {docs.name} in {folder}",
                            make("data")))
            continue
        try:
            info = json.loads(meta.read_text())
            counts = f"{info.get('docs', '?')} docs, {_mb(int(info.get('bytes', 0)))}"
        except (OSError, ValueError):
            rows.append(Row(f"corpus {name}", "warn", f"{meta} is unreadable", f"{make('data')}  # rebuilds it"))
            continue
        rows.append(Row(f"corpus {name}", "ok", f"{counts} ({folder})"))
    return rows


def eval_data_row(folder: Path) -> Row:
    """The benchmark splits: ``.done`` is written last, so without it the install did not finish."""
    if (folder / ".done").is_file():
        return Row("eval data", "ok", f"{folder} (.done)")
    return Row("eval data", "missing", f"no {folder}/.done", make("eval-data"))


def post_data_row(folder: Path) -> Row:
    """The post-training sets: install_post_data writes one ``.<source>.done`` stamp per source it
    installed (their names follow the sources, so any stamp counts)."""
    found = sorted(p.name for p in folder.glob(".*.done")) if folder.is_dir() else []
    if not found:
        return Row("post data", "missing", f"no .<source>.done stamp in {folder}", make("post-data"))
    return Row("post data", "ok", f"{folder} ({' '.join(found)})")


# ---------------------------------------------------------------------------------------------
# all checks, the report, the command
# ---------------------------------------------------------------------------------------------
def manifest_rows(online: bool, manifest_path: str | os.PathLike | None, repo: Path | None,
                  cache: Path) -> tuple[list[Row], int]:
    """Asset and model rows, and the bytes still to fetch; a manifest that cannot be read is one row."""
    try:
        assets = load_assets_module()
        manifest = assets.load_manifest(manifest_path)
    except Exception as e:  # no tomllib (Python < 3.11), a bad manifest, ...
        fix = "apt-get install -y python3.11 && make setup PY=python3.11" if isinstance(e, ImportError) else ""
        return [Row("asset manifest", "fail", f"{type(e).__name__}: {e}", fix)], 0
    rows = asset_rows(manifest, cache, online, repo, assets) + model_rows(manifest, cache, assets)
    return rows, bytes_still_to_fetch(manifest, cache, assets)


def run_checks(online: bool = True, manifest_path: str | os.PathLike | None = None) -> list[Row]:
    """Every check, in the order a fresh machine needs them fixed. ``online``: ask the registries
    whether each asset not yet in the cache is still served unchanged (seconds, no download)."""
    repo = repo_root()
    cache = load_assets_module().cache_dir()
    cpu = read_cpuinfo()
    asset_part, to_fetch = manifest_rows(online, manifest_path, repo, cache)
    return [
        check_python(), check_venv(repo), check_torch(repo), check_gpu(),
        check_cpu(cpu), check_isa(cpu), check_compiler(), check_chromium(),
        check_disk(cache, to_fetch), check_memory(read_meminfo()),
        *asset_part,
        *corpus_rows(data_dir("EVOLM_DATA", repo, "corpora")),
        eval_data_row(data_dir("EVOLM_EVAL_DATA", repo, "eval")),
        post_data_row(data_dir("EVOLM_POST_DATA", repo, "post")),
    ]


def exit_code(rows: list[Row]) -> int:
    """1 when anything failed (what cannot be had), else 0: missing things are one command away."""
    return 1 if any(r.status == "fail" for r in rows) else 0


def summary(rows: list[Row]) -> str:
    counts = ", ".join(f"{sum(r.status == s for r in rows)} {s}" for s in STATUSES)
    fixes = list(dict.fromkeys(r.fix for r in rows if r.fix and r.status != "ok"))
    return counts + ("\nto fix, run: " + "\n             ".join(fixes) if fixes else "")


def render_plain(rows: list[Row]) -> str:
    """The table as aligned text (no rich: the system Python before `make setup`)."""
    head = Row("check", "status", "detail", "fix")
    w_check = max(len(r.check) for r in [head, *rows])
    w_status = max(len(r.status) for r in [head, *rows])
    w_detail = max(len(r.detail) for r in [head, *rows])
    lines = [f"{r.check:<{w_check}}  {r.status:<{w_status}}  {r.detail:<{w_detail}}  {r.fix}".rstrip()
             for r in [head, *rows]]
    lines.insert(1, "-" * min(max(map(len, lines)), 200))
    return "\n".join(lines)


def print_rich(rows: list[Row]) -> bool:
    """Print the table with rich when it is importable; False when it is not."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return False
    colour = {"ok": "green", "missing": "yellow", "warn": "yellow", "fail": "bold red"}
    table = Table(title="evolm doctor", title_justify="left")
    for name in ("check", "status", "detail", "fix"):
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(r.check, f"[{colour[r.status]}]{r.status}[/]", r.detail, r.fix)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return True


def add_doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--online", dest="online", action="store_true", default=True,
                   help="ask the registries whether assets not yet cached are still served (default)")
    p.add_argument("--offline", dest="online", action="store_false",
                   help="do not ask the registries: assets not in the cache are reported missing")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def run_doctor(args: argparse.Namespace) -> int:
    """Run every check, print the table (or JSON) and return the exit status."""
    rows = run_checks(online=args.online)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        if not print_rich(rows):
            print(render_plain(rows))
        print(summary(rows))
    return exit_code(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="evolm doctor", description=__doc__.splitlines()[0])
    add_doctor_args(p)
    return run_doctor(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
