"""The pybind11 module fastreg._C: build facts, the torch version guard, `python -m fastreg`."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import fastreg
from fastreg import _C
from fastreg._C_loader import build_summary, built_torch_from_binary, check_torch_version, import_failure_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_module_is_pybind11_and_reports_the_build():
    assert _C.version.__doc__.startswith("version() -> str")  # pybind11's signature line
    assert _C.version() == fastreg.__version__
    built = _C.torch_version()
    assert built.count(".") == 2 and all(p.isdigit() for p in built.split("."))
    assert built.split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert _C.cuda_kernels_compiled() == fastreg.has_cuda_kernels()
    archs = _C.cuda_archs()
    assert all(a.startswith("sm_") and a[3:].rstrip("a").isdigit() for a in archs)
    assert bool(archs) == _C.cuda_kernels_compiled()
    assert _C.openmp_threads() >= 1
    path = _C.cpu_code_path()
    serial = "" if _C.openmp() else "-serial"
    if platform.machine() in ("x86_64", "AMD64"):
        flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
        expected = "x86_64-avx512f" if "avx512f" in flags else "x86_64-avx2" if "avx2" in flags else "x86_64-sse2"
        assert path == expected + serial
    elif platform.machine() == "aarch64":
        assert path == "aarch64-neon" + serial


def test_build_info_and_summary():
    info = fastreg.build_info()
    assert info["fastreg"] == fastreg.__version__ == info["fastreg_binary"]
    assert info["running_torch"] == torch.__version__
    assert info["cpu_code_path"] == _C.cpu_code_path()
    assert os.path.exists(info["library"])
    s = build_summary()
    assert s.startswith(f"{fastreg.__version__} torch-{_C.torch_version()} cpu={_C.cpu_code_path()}")


@pytest.mark.parametrize("built,running,ok", [
    ("2.13.0", "2.13.0+cpu", True), ("2.13.0", "2.13.1", True), ("2.13.0", "2.13.0a0+git123", True),
    ("2.13.0", "2.12.1", False), ("2.13.0", "3.13.0", False), ("2.13.0", "2.14.0.dev20260101+cu130", False),
])
def test_torch_version_check(built, running, ok):
    if ok:
        check_torch_version(built, running)
    else:
        with pytest.raises(ImportError) as e:
            check_torch_version(built, running)
        assert built in str(e.value) and running in str(e.value)


def test_import_refuses_a_mismatched_torch():
    # what the loader compares: the running torch's version (the binary's is fixed at build time)
    proc = run_python("-c", "import torch; torch.__version__ = '2.99.1'; import fastreg")
    assert proc.returncode != 0
    msg = proc.stderr.strip().splitlines()[-1]
    assert msg.startswith("ImportError") and "2.99.1" in msg and _C.torch_version() in msg, proc.stderr[-2000:]


def test_a_binary_that_cannot_load_still_names_its_torch(monkeypatch, tmp_path):
    # built against another torch ABI, `from . import _C` fails with undefined symbols before any
    # Python code of the module runs: the loader reads the build stamp from the file instead
    assert built_torch_from_binary(_C.__file__) == _C.torch_version()
    err = ImportError(f"{_C.__file__}: undefined symbol: _ZN3c1015SmallVectorBaseIjE8grow_podEPKvmm")
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    msg = import_failure_message(err, _C.__file__)
    assert "built against torch " + _C.torch_version() in msg and "running torch is 2.99.0" in msg
    not_built = import_failure_message(ImportError("No module named 'fastreg._C'"), None)
    assert "make build" in not_built
    stampless = tmp_path / "_C.so"
    stampless.write_bytes(b"\x7fELF no stamp here")
    assert built_torch_from_binary(str(stampless)) is None
    assert "make build" in import_failure_message(err, str(stampless))


def test_python_m_fastreg_prints_the_report():
    proc = run_python("-m", "fastreg")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in (f"fastreg version                : {fastreg.__version__}",
                   f"built against torch            : {_C.torch_version()}",
                   f"CPU code path (picked at load) : {_C.cpu_code_path()}",
                   f"OpenMP threads                 : {_C.openmp_threads()}"):
        assert needle in out, out
    proc = run_python("-m", "fastreg", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["built_against_torch"] == _C.torch_version()


def test_benchmark_provenance_records_the_build():
    from fastreg.bench import bars, common, lce, optim
    assert common.provenance("cpu")["fastreg_build"] == build_summary()
    for columns in (lce.CSV_COLUMNS, optim.CSV_COLUMNS, bars.CSV_COLUMNS):
        assert "fastreg_build" in columns
