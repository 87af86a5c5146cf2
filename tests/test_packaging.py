"""The package builds, installs from its wheel into a fresh venv, and ships what it declares.

``test_build_install_and_sdist_tests`` copies the working tree (the files git would commit),
builds the sdist and the wheel from it with ``python -m build --no-isolation`` (offline: the
build backend comes from this environment, no download), installs the wheel with
``--no-deps`` into a fresh venv that sees this environment's dependencies through a ``.pth``
line (so jax is not downloaded again, and the editable install of this checkout, whose finder
is set up by a ``.pth`` *file* in that directory, is not processed), then checks in that venv
that ``eva_optax`` comes from the wheel with its ``py.typed`` and that the sdist's own tests
import (``pytest --collect-only``) and that a few of them pass against the installed wheel.

The other tests read the metadata (no build): versions, URLs and dependencies agree across
the files that state them.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile

import yaml

import eva_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
HOME = PROJECT["urls"]["Homepage"]

# Ignored like .gitignore does, for a tree that is not a git checkout (an unpacked sdist).
_IGNORED_NAMES = {".venv", ".git", "build", "dist", "__pycache__", ".pytest_cache",
                  ".ipynb_checkpoints", "_build"}
# Run from the unpacked sdist against the installed wheel: quick, and they import conftest.
_SDIST_TESTS_RUN = ("tests/test_docstrings.py",)


def _dependency_name(requirement: str) -> str:
  return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def _copy_source_tree(dest: pathlib.Path) -> None:
  """Copies what a commit of the working tree would hold (tracked and new, not ignored)."""
  if (ROOT / ".git").exists() and shutil.which("git"):
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
      src = ROOT / name
      if src.is_file():   # a tracked file deleted in the working tree is skipped
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
  else:
    def ignore(directory, names):
      top = pathlib.Path(directory) == ROOT
      return {n for n in names if n in _IGNORED_NAMES or n.endswith(".egg-info")
              or n.endswith(".pyc") or (top and n == "results")}
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def _clean_env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
  env.update(PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", JAX_PLATFORMS="cpu")
  return env


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
  result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=180, **kwargs)
  if result.returncode != 0:
    raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                         f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
  return result


# Runs inside the fresh venv: argv = sdist directory, output JSON path, tests to run.
_CHECK_IN_FRESH_VENV = r"""
import importlib.metadata, json, pathlib, sys
import pytest

sdist, out, run = sys.argv[1], sys.argv[2], sys.argv[3:]
common = ["-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir", sdist]
collect_rc = int(pytest.main(common + ["-qq", "--collect-only", sdist + "/tests"]))
run_rc = int(pytest.main(common + ["-q", "-x", "-n", "0"] + [sdist + "/" + t for t in run]))
import eva_optax   # imported by the tests above: where from?
dist = importlib.metadata.distribution("eva-optax")
pkg = pathlib.Path(eva_optax.__file__).parent
json.dump({
    "collect_rc": collect_rc, "run_rc": run_rc,
    "file": eva_optax.__file__, "version": eva_optax.__version__,
    "dist_version": dist.version,
    "dist_location": str(dist.locate_file("")),
    "py_typed": (pkg / "py.typed").is_file(),
    "record_has_py_typed": any(str(f) == "eva_optax/py.typed" for f in dist.files),
}, open(out, "w"))
"""


def test_build_install_and_sdist_tests(tmp_path):
  src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
  src.mkdir()
  _copy_source_tree(src)

  # 1. sdist, then the wheel built from the unpacked sdist (python -m build's default).
  _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src],
       env=_clean_env())
  [sdist_path] = dist.glob("eva_optax-*.tar.gz")
  [wheel_path] = dist.glob("eva_optax-*.whl")
  version = PROJECT["version"]
  assert sdist_path.name == f"eva_optax-{version}.tar.gz"

  # 2. The sdist: the tests with their conftest, and what they read.
  with tarfile.open(sdist_path) as tar:
    top = f"eva_optax-{version}/"
    members = {m.name[len(top):] for m in tar.getmembers() if m.isfile()}
    tar.extractall(tmp_path / "sdist", filter="data")
  sdist_root = tmp_path / "sdist" / top
  source_tests = {p.relative_to(src).as_posix() for p in (src / "tests").rglob("*.py")}
  required = {"LICENSE", "CHANGELOG.md", "CITATION.cff", "README.md", "pyproject.toml",
              "eva_optax/py.typed", "tests/conftest.py", "notebooks/quickstart.ipynb"}
  assert required | source_tests <= members, sorted((required | source_tests) - members)
  assert not [m for m in members if m.endswith(".pyc") or "__pycache__" in m
              or m.startswith((".venv/", ".git/", "docs/_build/"))]

  # 3. The wheel: the package with py.typed, the license, the metadata; no tests.
  with zipfile.ZipFile(wheel_path) as whl:
    names = set(whl.namelist())
    info = f"eva_optax-{version}.dist-info/"
    metadata = whl.read(info + "METADATA").decode()
    license_text = whl.read(info + "licenses/LICENSE").decode()
  package = {p.relative_to(src).as_posix() for p in (src / "eva_optax").rglob("*.py")}
  assert package | {"eva_optax/py.typed"} <= names
  assert not [n for n in names if n.startswith(("tests/", "examples/"))]
  assert license_text == (ROOT / "LICENSE").read_text()
  headers = [tuple(line.split(": ", 1)) for line in metadata.split("\n\n", 1)[0].splitlines()]
  assert ("License-Expression", "Apache-2.0") in headers
  assert ("License-File", "LICENSE") in headers
  assert ("Project-URL", f"Homepage, {HOME}") in headers
  assert ("Classifier", "Typing :: Typed") in headers
  requires = {_dependency_name(v) for k, v in headers if k == "Requires-Dist" and ";" not in v}
  assert requires == {_dependency_name(d) for d in PROJECT["dependencies"]}

  # 4. A fresh venv without pip; this environment's site-packages on its path (no download).
  _run([sys.executable, "-m", "venv", "--without-pip", venv])
  venv_python = venv / "bin" / "python"
  venv_site = pathlib.Path(_run(
      [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
  ).stdout.strip())
  (venv_site / "_eva_optax_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  _run([sys.executable, "-m", "pip", "--python", venv_python, "install", "-q", "--no-deps",
        "--no-index", wheel_path], env=_clean_env())

  # 5. In that venv (cwd outside both trees): eva_optax from the wheel; the sdist's tests.
  out = tmp_path / "check.json"
  (tmp_path / "check.py").write_text(_CHECK_IN_FRESH_VENV)
  run = _run([venv_python, tmp_path / "check.py", sdist_root, out, *_SDIST_TESTS_RUN],
             cwd=tmp_path, env=_clean_env())
  found = json.loads(out.read_text())
  problems = [l for l in run.stdout.splitlines() if re.match(r"(ERROR|FAILED|E )", l)]
  assert found["collect_rc"] == 0 and found["run_rc"] == 0, "\n".join(problems[:60])
  assert pathlib.Path(found["file"]).is_relative_to(venv_site), found
  assert pathlib.Path(found["dist_location"]).resolve() == venv_site.resolve(), found
  assert found["py_typed"] and found["record_has_py_typed"], found
  assert found["version"] == found["dist_version"] == version


def test_versions_agree():
  version = PROJECT["version"]
  assert eva_optax.__version__ == version
  citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  assert str(citation["version"]) == version
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert re.search(rf"^## \[{re.escape(version)}\]", changelog, re.M), "CHANGELOG.md"
  assert re.search(r"^## \[Unreleased\]", changelog, re.M), "CHANGELOG.md"


def test_citation_names_both_eva_papers():
  citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  papers = [citation["preferred-citation"], *citation["references"]]
  titles = {p["title"] for p in papers}
  assert titles == {
      "Eva: Practical Second-order Optimization with Kronecker-vectorized Approximation",
      "Eva: A General Vectorized Approximation Framework for Second-order Optimization"}
  for paper in papers:
    assert [a["family-names"] for a in paper["authors"]] == ["Zhang", "Shi", "Li"]
    assert paper["url"].startswith("https://")
  assert citation["license"] == PROJECT["license"] == "Apache-2.0"


def test_one_project_url_everywhere():
  """The declared home is the one the README, notebook and citation use, and no other."""
  assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["repository-code"] == HOME
  files = {"README.md": (ROOT / "README.md").read_text(),
           "notebooks/quickstart.ipynb": (ROOT / "notebooks" / "quickstart.ipynb").read_text()}
  for name, text in files.items():
    assert HOME in text, name
    other = set(re.findall(r"github\.com/[\w.-]+/eva[_-]optax", text, re.I))
    other.discard(HOME.removeprefix("https://"))
    assert not other, f"{name} names another home: {other}"
  # The Colab badge opens this notebook from the same repository.
  repo = HOME.removeprefix("https://github.com/")
  badge = f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/quickstart.ipynb"
  assert badge in files["notebooks/quickstart.ipynb"]


def _imported_top_level(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module.split(".")[0])
  return names


# Declared runtime dependencies that the library never imports itself, and why.
_USED_THROUGH = {"jaxlib": "jax's compiled backend: jax imports it"}


def test_every_runtime_dependency_is_imported_by_the_library():
  imported = set()
  for path in (ROOT / "eva_optax").rglob("*.py"):
    imported |= _imported_top_level(path)
  declared = {_dependency_name(d) for d in PROJECT["dependencies"]}
  unused = declared - imported - set(_USED_THROUGH)
  assert not unused, f"declared in pyproject.toml but not imported by eva_optax/: {unused}"
  assert set(_USED_THROUGH) <= declared
