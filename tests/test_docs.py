"""The README's and the guides' code runs as written, and their references resolve.

Every fenced ``python`` block of README.md and of every guide (``docs/*.md``) is run by
itself, as a user would paste it, in a fresh interpreter whose working directory is an empty
temporary folder (each block must be complete: its imports, model and data). A block that
cannot run here (it needs a dataset or many processes) is excluded by a marker comment on the
line just above its fence, with the reason::

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
GUIDES = sorted((ROOT / "docs").glob("*.md"))
# The pages whose python blocks run, by path relative to the repository root.
PAGES = {p.relative_to(ROOT).as_posix(): p for p in (README, *GUIDES)}
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


PAGE_BLOCKS = {name: blocks(path.read_text()) for name, path in PAGES.items()}
TESTED = [(name, b) for name, page in PAGE_BLOCKS.items() for b in page
          if b.language == "python" and b.not_tested is None]


@pytest.mark.parametrize("page,block", TESTED, ids=[f"{n}:{b.line}" for n, b in TESTED])
def test_python_block_runs(page, block, tmp_path):
  script = tmp_path / f"{pathlib.Path(page).stem}_line_{block.line}.py"
  script.write_text(block.source)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.setdefault("JAX_PLATFORMS", "cpu")
  result = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (
      f"{page} line {block.line} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _section_blocks(page: str, heading: str) -> list[Block]:
  """The tested python blocks of ``page`` under the ``## heading`` section."""
  lines = PAGES[page].read_text().splitlines()
  start = lines.index(f"## {heading}") + 1
  end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
  return [b for name, b in TESTED if name == page and start < b.line <= end]


@pytest.mark.parametrize("page,heading", [("README.md", "Quickstart"),
                                          ("docs/getting_started.md", "The first training loop")])
def test_first_loop_is_tested(page, heading):
  """The README's Quickstart and the guide's first loop are tested, complete training loops."""
  quick = _section_blocks(page, heading)
  assert quick, f"no tested python block under ## {heading} in {page}"
  source = quick[0].source
  for needed in ("eva_optax.value_and_grad", "tx.init(", "tx.update(", "stats=stats",
                 "@jax.jit", "for "):
    assert needed in source, needed


@pytest.mark.parametrize("page", PAGES)
def test_not_tested_markers_have_a_reason_and_a_block(page):
  lines = PAGES[page].read_text().splitlines()
  marked = {b.line for b in PAGE_BLOCKS[page] if b.not_tested is not None}
  for b in PAGE_BLOCKS[page]:
    if b.not_tested is not None:
      assert b.not_tested, f"{page}:{b.line}: say why the block is not tested"
      assert b.language == "python", f"{page}:{b.line}: marker above a {b.language} block"
  for number, line in enumerate(lines, 1):
    if _NOT_TESTED.match(line.strip()):
      following = next(n for n in range(number + 1, len(lines) + 2)
                       if n > len(lines) or lines[n - 1].strip())
      assert following in marked, f"{page}:{number}: marker not followed by a code block"


def _slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading: its text, lower case, punctuation removed
  (hyphens and underscores inside words stay), spaces to hyphens."""
  heading = re.sub(r"[`*]|(?<!\w)_|_(?!\w)", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
  return {_slug(h) for h in re.findall(r"^#+ (.*)$", prose, re.M)}


@pytest.mark.parametrize("path", ["README.md", "benchmarks/README.md", "examples/README.md",
                                  *(p for p in PAGES if p != "README.md")])
def test_no_dangling_references(path):
  """Local links and images resolve; anchors name a heading, also in another page; no file
  that is not here."""
  text = (ROOT / path).read_text()
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  for target in re.findall(r"\]\(([^)\s]+)\)", prose):
    if re.match(r"[a-z]+://", target):
      continue
    file, _, anchor = target.partition("#")
    linked = (ROOT / path).parent.joinpath(file) if file else ROOT / path
    assert linked.exists(), f"{path}: link to missing {file}"
    if anchor and linked.suffix == ".md":
      assert anchor in _anchors(linked), f"{path}: no heading for #{anchor} in {linked.name}"
  assert "DESIGN.md" not in text, f"{path} refers to DESIGN.md, which is not in the repository"


def test_readme_links_every_guide():
  """The README is the front door: it links every guide of docs/."""
  text = README.read_text()
  for guide in GUIDES:
    if guide.name != "index.md":
      assert f"(docs/{guide.name})" in text, f"README.md does not link docs/{guide.name}"


def test_slug_like_github():
  assert _slug("The refresh split over devices: `distribute_over`") == (
      "the-refresh-split-over-devices-distribute_over")
  assert _slug("FOOF + adaptive: no learning rate to tune") == (
      "foof--adaptive-no-learning-rate-to-tune")
  assert _slug("Why _this_ **works**") == "why-this-works"


def test_block_parser():
  text = ("x\n<!-- not-tested: needs data -->\n```python\na = 1\n```\n\n"
          "```bash\nls\n```\n````python\n```\nb = 2\n````\n")
  found = blocks(text)
  assert [(b.line, b.language, b.not_tested) for b in found] == [
      (3, "python", "needs data"), (7, "bash", None), (10, "python", None)]
  assert found[0].source == "a = 1\n" and found[2].source == "```\nb = 2\n"
