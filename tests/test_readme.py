"""The README's code runs as written, and its references resolve.

Every fenced ``python`` block of README.md is run by itself, as a user would paste it, in a
fresh interpreter whose working directory is an empty temporary folder (each block must be
complete: its imports, model and data). A block that cannot run here (it needs a dataset or
many devices) is excluded by a marker comment on the line just above its fence, with the
reason::

    <!-- not-tested: needs 8 devices -->
    ```python
    ...

Illustrative fragments that are not meant to run should use another fence language
(``text``) instead. Keep exclusions rare.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
_NOT_TESTED = re.compile(r"^<!--\s*not-tested:\s*(.*?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
  line: int            # 1-based line of the opening fence
  language: str
  source: str
  not_tested: str | None  # the reason, when excluded


def blocks(text: str) -> list[Block]:
  """The fenced code blocks of a Markdown text, with their not-tested markers."""
  lines = text.splitlines()
  found, i = [], 0
  while i < len(lines):
    match = _FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    fence, language, start = match.group(1), match.group(2).lower(), i
    i += 1
    while i < len(lines) and not lines[i].startswith(fence):
      i += 1
    previous = next((l for l in reversed(lines[:start]) if l.strip()), "")
    marker = _NOT_TESTED.match(previous.strip())
    found.append(Block(line=start + 1, language=language,
                       source="\n".join(lines[start + 1:i]) + "\n",
                       not_tested=marker.group(1) if marker else None))
    i += 1
  return found


README_BLOCKS = blocks(README.read_text())
TESTED = [b for b in README_BLOCKS if b.language == "python" and b.not_tested is None]


@pytest.mark.parametrize("block", TESTED, ids=lambda b: f"README.md:{b.line}")
def test_readme_python_block_runs(block, tmp_path):
  script = tmp_path / f"readme_line_{block.line}.py"
  script.write_text(block.source)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.setdefault("JAX_PLATFORMS", "cpu")
  result = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (
      f"README.md line {block.line} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def test_quickstart_is_tested():
  """The Quickstart section holds a tested, complete training loop."""
  text = README.read_text()
  start = text.index("\n## Quickstart\n")
  line = text[:start].count("\n") + 2
  end = text.find("\n## ", start + 1)
  end_line = text[:end].count("\n") + 1 if end >= 0 else len(text.splitlines())
  quick = [b for b in TESTED if line < b.line < end_line]
  assert quick, "no tested python block under ## Quickstart"
  source = quick[0].source
  for needed in ("eva_optax.value_and_grad", "tx.init(", "tx.update(", "stats=stats",
                 "@jax.jit", "for "):
    assert needed in source, needed


def test_not_tested_markers_have_a_reason_and_a_block():
  lines = README.read_text().splitlines()
  marked = {b.line for b in README_BLOCKS if b.not_tested is not None}
  for b in README_BLOCKS:
    if b.not_tested is not None:
      assert b.not_tested, f"README.md:{b.line}: say why the block is not tested"
      assert b.language == "python", f"README.md:{b.line}: marker above a {b.language} block"
  for number, line in enumerate(lines, 1):
    if _NOT_TESTED.match(line.strip()):
      following = next(n for n in range(number + 1, len(lines) + 2)
                       if n > len(lines) or lines[n - 1].strip())
      assert following in marked, f"README.md:{number}: marker not followed by a code block"


def _slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading."""
  heading = re.sub(r"[`*_]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


@pytest.mark.parametrize("path", ["README.md", "benchmarks/README.md", "examples/README.md"])
def test_no_dangling_references(path):
  """Local links and images resolve; anchors name a heading; no file that is not here."""
  text = (ROOT / path).read_text()
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", prose, re.M)}
  for target in re.findall(r"\]\(([^)\s]+)\)", prose):
    if re.match(r"[a-z]+://", target):
      continue
    file, _, anchor = target.partition("#")
    if file:
      assert (ROOT / path).parent.joinpath(file).exists(), f"{path}: link to missing {file}"
    else:
      assert anchor in anchors, f"{path}: no heading for #{anchor}"
  assert "DESIGN.md" not in text, f"{path} refers to DESIGN.md, which is not in the repository"


def test_block_parser():
  text = ("x\n<!-- not-tested: needs data -->\n```python\na = 1\n```\n\n"
          "```bash\nls\n```\n````python\n```\nb = 2\n````\n")
  found = blocks(text)
  assert [(b.line, b.language, b.not_tested) for b in found] == [
      (3, "python", "needs data"), (7, "bash", None), (10, "python", None)]
  assert found[0].source == "a = 1\n" and found[2].source == "```\nb = 2\n"
