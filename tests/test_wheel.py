"""Packaging: `python -m build --no-isolation` makes an sdist and a wheel; the wheel installs into a
fresh virtual environment (which sees this environment's torch through a .pth file) and works
there: import, one fused loss, one optimizer step, the build report.

The wheel is built from this checkout, so it reuses the objects of the in-place build (build/temp.*):
only the link runs again. ~30 s."""
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

import fastreg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import json, os, sys
import torch, torch.nn.functional as F
import fastreg
assert os.path.realpath(fastreg.__file__).startswith(os.path.realpath(sys.prefix)), fastreg.__file__
torch.manual_seed(0)
x = torch.randn(16, 8, requires_grad=True); w = torch.randn(50, 8, requires_grad=True)
y = torch.randint(0, 50, (16,))
loss = fastreg.linear_cross_entropy(x, w, y)
ref = F.cross_entropy(x @ w.T, y)
assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6), (loss, ref)
loss.backward()
p = torch.nn.Parameter(torch.randn(10)); p.grad = torch.randn(10)
q = torch.nn.Parameter(p.detach().clone()); q.grad = p.grad.clone()
fastreg.optim.AdamW([p], lr=0.1).step(); torch.optim.AdamW([q], lr=0.1).step()
assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
print("WHEEL-OK " + json.dumps({"file": fastreg.__file__, "version": fastreg.__version__,
                               "info": fastreg.build_info()}))
"""


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build", reason="`python -m build` is installed by scripts/bootstrap.sh")
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--sdist", "--wheel", "--no-isolation", "--outdir", str(out), ROOT], cwd=ROOT)
    return out


def test_sdist_carries_every_source(dist):
    (sdist,) = dist.glob("fastreg-*.tar.gz")
    assert sdist.name == f"fastreg-{fastreg.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc"))
               for f in fs if f.endswith((".h", ".cuh", ".cpp", ".cu"))}
    assert sources and sources <= names, sorted(sources - names)
    assert {"setup.py", "pyproject.toml", "README.md", "fastreg/_version.py", "fastreg/__main__.py"} <= names
    assert not any(n.endswith(".so") for n in names)


def test_wheel_contents_and_metadata(dist):
    (whl,) = dist.glob("fastreg-*.whl")
    assert whl.name.startswith(f"fastreg-{fastreg.__version__}-")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        meta = z.read(f"fastreg-{fastreg.__version__}.dist-info/METADATA").decode()
    assert any(n.startswith("fastreg/_C.") and n.endswith(".so") for n in names)
    assert {"fastreg/integrations/transformers.py", "fastreg/optim/adam.py", "fastreg/bench/common.py"} <= names
    assert not any(n.startswith(("tests/", "csrc/")) for n in names)
    assert f"Version: {fastreg.__version__}" in meta
    assert "Provides-Extra: transformers" in meta and "Requires-Dist: torch>=2.10" in meta


def test_wheel_installs_into_a_fresh_venv_and_works(dist, tmp_path):
    (whl,) = dist.glob("fastreg-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    # the fresh environment gets torch (and only what sits next to it) from this one
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    torch_dir = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    with open(os.path.join(site, "outer_torch.pth"), "w") as f:
        f.write(torch_dir + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    # pip of this environment installs into the new one; torch>=2.10 must be found there (no index)
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "-q", str(whl)], env=env)
    proc = run([str(py), "-c", CHECK], env=env, cwd=str(tmp_path))  # cwd: not the checkout's fastreg/
    line = next(l for l in proc.stdout.splitlines() if l.startswith("WHEEL-OK "))
    res = json.loads(line[len("WHEEL-OK "):])
    assert res["file"].startswith(site) and res["version"] == fastreg.__version__
    assert res["info"]["built_against_torch"] == fastreg.build_info()["built_against_torch"]
    assert res["info"]["cpu_code_path"] == fastreg.build_info()["cpu_code_path"]
