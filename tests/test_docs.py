"""The documentation's links: every relative link of README.md names a file of the repository, and
the site's strict build (`make docs`, which `make test` runs first) really fails on a broken link,
a missing anchor and an API reference that does not resolve -- checked on a copy of docs/ with one
such fault planted at a time."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)\s]+)\)")
COMMIT = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
ISSUE = re.compile(r"\bissues? #?\d+(?![\d-])", re.I)
LOAD = re.compile(r"\bload(?: average)? (?:of )?~?\d", re.I)


def _pages():
    yield "README.md"
    for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if name.endswith(".md"):
            yield os.path.join("docs", name)


def test_no_commit_hashes_issue_numbers_or_load_averages_in_the_docs():
    """Dated measurements live with the benchmark results, not in the prose."""
    found = []
    for page in _pages():
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for pattern in (COMMIT, ISSUE, LOAD):
            found += [f"{page}: {m.group(0)!r}" for m in pattern.finditer(text)]
    assert not found, found


def test_readme_links_name_existing_files():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    targets = [t for t in LINK.findall(text) if "://" not in t and not t.startswith(("#", "mailto:"))]
    assert targets, "the README links into the docs"
    missing = [t for t in targets if not os.path.exists(os.path.join(ROOT, t.split("#")[0]))]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def _strict_build(tmp_path, fault: str):
    pytest.importorskip("mkdocs", reason="MkDocs is not installed (`make docs` installs it)")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not installed (`make docs`)")
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    shutil.copy(os.path.join(ROOT, "mkdocs.yml"), tmp_path / "mkdocs.yml")
    os.symlink(os.path.join(ROOT, "fastreg"), tmp_path / "fastreg")
    with open(tmp_path / "docs" / "index.md", "a", encoding="utf-8") as f:
        f.write("\n" + fault + "\n")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("fault, message", [
    ("[a page that is not there](no-such-page.md)", "no-such-page.md"),
    ("[an anchor that is not there](api.md#no-such-anchor)", "no-such-anchor"),
    ("::: fastreg.no_such_function", "fastreg.no_such_function"),
])
def test_strict_build_fails_on_a_broken_reference(tmp_path, fault, message):
    proc = _strict_build(tmp_path, fault)
    assert proc.returncode != 0, f"the strict build passed with {fault!r} planted:\n{proc.stderr[-2000:]}"
    assert message in proc.stdout + proc.stderr


def test_strict_build_of_the_unchanged_copy_passes(tmp_path):
    """The baseline of the test above: the same copy with a valid link added builds."""
    proc = _strict_build(tmp_path, "[the API reference](api.md)")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
