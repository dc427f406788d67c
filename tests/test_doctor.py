"""`evolm doctor`: every manifest asset gets a row, cache state maps to ok / missing, registry answers
to ok / warn / fail, the CPU row agrees with /proc/cpuinfo, and the stdlib-only launcher works
without torch. No network: the doctor runs offline, or with the registry probe replaced."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from evolm import assets, doctor

ROOT = Path(__file__).resolve().parents[1]
SHA = "ab" * 32


def asset_toml(name: str, registry: str, file: str, size: int, required: bool, groups: list[str]) -> str:
    return "\n".join([
        "[[asset]]", f'name = "{name}"', f'registry = "{registry}"', f'package = "{name}"', 'version = "1.0"',
        f'file = "{file}"', f'sha256 = "{SHA}"', f"size = {size}", f"required = {str(required).lower()}",
        f"groups = {json.dumps(groups)}", 'needed_by = "tests/test_doctor.py"', ""])


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An empty asset cache in tmp_path (``$EVOLM_CACHE``)."""
    monkeypatch.setenv("EVOLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def by_check(rows: list[doctor.Row]) -> dict[str, doctor.Row]:
    return {r.check: r for r in rows}


def test_rows_cover_every_manifest_asset_and_model():
    m = assets.load_manifest()
    rows = by_check(doctor.run_checks(online=False))
    for name in m.assets:
        assert f"asset {name}" in rows
    for name in m.models:
        assert f"model {name}" in rows
    assert all(r.status in doctor.STATUSES for r in rows.values())
    assert all(r.fix for r in rows.values() if r.status in ("missing", "fail"))


def test_fake_manifest_present_is_ok_absent_is_missing(tmp_path, fake_cache):
    manifest = tmp_path / "assets.toml"
    manifest.write_text(asset_toml("here", "pypi", "here-1.0-py3-none-any.whl", 10, True, ["models"])
                        + asset_toml("gone", "debian", "gone_1.0_all.deb", 20, False, ["eval-data"]))
    cached = fake_cache / "downloads" / "pypi" / "here-1.0-py3-none-any.whl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x" * 10)  # the pinned size is what "present" means
    rows = by_check(doctor.run_checks(online=False, manifest_path=manifest))
    assert rows["asset here"].status == "ok" and str(cached) in rows["asset here"].detail
    assert rows["asset gone"].status == "missing"
    assert rows["asset gone"].fix == "make eval-data"
    assert not [r for r in rows if r.startswith("asset ") and r not in ("asset here", "asset gone")]


def test_wrong_size_in_cache_is_missing(tmp_path, fake_cache):
    manifest = tmp_path / "assets.toml"
    manifest.write_text(asset_toml("short", "pypi", "short-1.0-py3-none-any.whl", 10, True, ["data"]))
    cached = fake_cache / "downloads" / "pypi" / "short-1.0-py3-none-any.whl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x" * 9)  # a half-written file is not present
    rows = by_check(doctor.run_checks(online=False, manifest_path=manifest))
    assert rows["asset short"].status == "missing" and rows["asset short"].fix == "make data"


def test_registry_answers_map_to_ok_warn_fail(tmp_path, fake_cache, monkeypatch):
    manifest = tmp_path / "assets.toml"
    manifest.write_text(asset_toml("served", "debian", "served_1.0_all.deb", 2_000_000, True, ["data"])
                        + asset_toml("vanished", "debian", "vanished_1.0_all.deb", 1, True, ["post-data"])
                        + asset_toml("changed", "debian", "changed_1.0_all.deb", 1, False, ["bench"]))
    answers = {"served": None, "vanished": "Debian does not serve vanished=1.0", "changed": "a different file"}
    asked = []

    def fake_probe_all(todo, workers=8):
        asked.extend(a.name for a in todo)
        return {a.name: answers[a.name] for a in todo}

    monkeypatch.setattr(assets, "probe_all", fake_probe_all)
    rows = doctor.run_checks(online=True, manifest_path=manifest)
    got = by_check(rows)
    assert sorted(asked) == sorted(answers)
    assert got["asset served"].status == "ok" and "2.0 MB to fetch" in got["asset served"].detail
    assert got["asset vanished"].status == "fail" and "does not serve" in got["asset vanished"].detail
    assert got["asset changed"].status == "warn" and got["asset changed"].fix == "make bench-deps"
    assert doctor.exit_code(rows) == 1


def test_a_broken_probe_is_a_warning_not_a_crash(tmp_path, fake_cache, monkeypatch):
    manifest = tmp_path / "assets.toml"
    manifest.write_text(asset_toml("any", "debian", "any_1.0_all.deb", 1, True, ["data"]))

    def broken(todo, workers=8):
        raise OSError("no network tools")

    monkeypatch.setattr(assets, "probe_all", broken)
    rows = doctor.run_checks(online=True, manifest_path=manifest)
    assert by_check(rows)["asset any"].status == "warn"
    assert doctor.exit_code(rows) == 0


def test_fix_names_the_make_target_of_each_group():
    assert doctor.fix_for_groups("x", ("models",)) == "make models"
    assert doctor.fix_for_groups("x", ("reference",)) == "make setup"
    assert doctor.fix_for_groups("x", ("bench",)) == "make bench-deps"
    assert doctor.fix_for_groups("x", ()) == "python3 scripts/assets.py fetch --name x"
    for group in assets.GROUPS:  # every group maps to a target the Makefile has
        target = doctor.fix_for_groups("x", (group,)).removeprefix("make ")
        assert f"\n{target}:" in (ROOT / "Makefile").read_text()


def test_torch_pin_matches_the_makefile():
    assert f"torch=={doctor.TORCH_PIN}" in (ROOT / "Makefile").read_text()


def test_corpora_list_matches_the_builtin_corpora():
    from evolm.data.corpora import BUILTIN

    assert doctor.CORPORA == tuple((c.name, c.optional) for c in BUILTIN.values())


def test_cpu_rows_agree_with_proc_cpuinfo():
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo on this machine")
    text = info.read_text()
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith(("flags", "Features"))), []))
    rows = by_check(doctor.run_checks(online=False))
    logical = sum(ln.startswith("processor") for ln in text.splitlines())
    assert f"{logical} logical CPUs" in rows["cpu"].detail
    isa = rows["kernel isa"].detail
    if platform.machine() not in ("x86_64", "AMD64"):
        assert "x86-64 only" in isa
    elif "avx512f" in flags:
        assert isa.startswith("float kernels AVX-512" + (" + BF16" if "avx512_bf16" in flags else ","))
    elif {"avx2", "fma"} <= flags:
        assert isa.startswith("float kernels AVX2,")
    else:
        assert isa.startswith("float kernels scalar") and rows["kernel isa"].status == "warn"


def test_read_cpuinfo_of_an_avx2_machine(tmp_path):
    block = ("processor\t: {i}\nmodel name\t: Test CPU\nphysical id\t: 0\ncore id\t\t: {core}\n"
             "flags\t\t: fpu sse avx avx2 fma\n")
    path = tmp_path / "cpuinfo"
    path.write_text("\n".join(block.format(i=i, core=i // 2) for i in range(4)))  # 2 cores, 2 threads each
    info = doctor.read_cpuinfo(path)
    assert (info.model, info.logical, info.physical) == ("Test CPU", 4, 2)
    assert doctor.float_kernel_width(info.flags) == "AVX2" and doctor.quant_kernel_width(info.flags) == "AVX2"
    assert doctor.float_kernel_width({"avx2"}) == "scalar"  # V8 needs FMA too
    assert doctor.float_kernel_width({"avx512f", "avx512_bf16"}) == "AVX-512 + BF16"
    assert doctor.quant_kernel_width({"avx512_vnni", "avx512vl", "avx2"}) == "AVX512-VNNI"


def test_json_output_parses_and_offline_exit_is_zero(capsys):
    assert doctor.main(["--offline", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {tuple(r) for r in rows} == {("check", "status", "detail", "fix")}
    assert {r["check"] for r in rows} >= {"python", "venv", "torch", "gpu", "cpu", "kernel isa", "c++ compiler",
                                          "chromium", "disk", "memory", "eval data", "post data"}
    assert not [r for r in rows if r["status"] == "fail"]


def test_plain_table_has_every_row():
    rows = [doctor.Row("python", "ok", "3.11.7"), doctor.Row("asset x", "missing", "not in the cache", "make models")]
    lines = doctor.render_plain(rows).splitlines()
    assert lines[0].split() == ["check", "status", "detail", "fix"]
    assert lines[3].split()[:2] == ["asset", "x"] and lines[3].endswith("make models")
    assert "to fix, run: make models" in doctor.summary(rows)


def test_launcher_runs_without_torch_or_rich(tmp_path):
    """scripts/doctor.py as `make doctor` runs it before the venv exists: standard library only."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib.util, json, sys\n"
        "sys.modules['torch'] = None\n"  # `import torch` now raises ImportError, as without torch
        "sys.modules['rich'] = None\n"
        "spec = importlib.util.spec_from_file_location('doctor_launcher', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "code = m.doctor.main(['--offline'])\n"
        "print(json.dumps({'code': code, 'evolm_imported': 'evolm' in sys.modules}))\n")
    p = subprocess.run([sys.executable, str(probe), str(ROOT / "scripts" / "doctor.py")], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    *table, result = p.stdout.strip().splitlines()
    assert json.loads(result) == {"code": 0, "evolm_imported": False}
    assert table[0].split() == ["check", "status", "detail", "fix"]
    torch_row = next(ln for ln in table if ln.startswith("torch "))
    assert torch_row.split()[1] in ("ok", "missing")  # from the venv's dist-info, or make setup


def test_cli_doctor_subcommand():
    p = subprocess.run([sys.executable, "-m", "evolm.cli", "doctor", "--offline", "--json"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert p.returncode == 0, p.stderr
    assert any(r["check"] == "torch" for r in json.loads(p.stdout))
