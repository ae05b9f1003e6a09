"""Write the repository url of `_config.yml` wherever the project repeats it (`make colab`).

    python scripts/sync_repository.py           # rewrite what disagrees with _config.yml
    python scripts/sync_repository.py --check   # exit 1 and list what disagrees (the tests)

`_config.yml`'s `repository.url` and `repository.branch` are the one place that says where the
book lives. Jupyter Book builds each chapter's launch buttons from them; this script writes
them into the two other places that need them:

- the hidden install cell of every chapter source (`FEDPARA_REPO = "<url>"` and
  `FEDPARA_BRANCH = "<branch>"`), which clones that branch when a chapter is opened on Colab;
- the chapter table of README.md between `<!-- chapters:start -->` and `<!-- chapters:end -->`,
  one row per page of `_toc.yml` with its title and its Colab badge
  (`https://colab.research.google.com/github/<owner>/<repo>/blob/<branch>/<notebook>`).

A fork sets `url` and `branch` in `_config.yml` and runs `make colab`, which also re-renders
the executed experiment copies in book/generated/ (the notebooks the README's badges open).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
INSTALL_LINE = re.compile(r'^FEDPARA_REPO = "[^"]*"', re.MULTILINE)
BRANCH_LINE = re.compile(r'^FEDPARA_BRANCH = "[^"]*"', re.MULTILINE)
START, END = "<!-- chapters:start -->", "<!-- chapters:end -->"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository(root: Path = ROOT) -> tuple[str, str]:
    """(url, branch) from _config.yml; the url must be a GitHub repository."""
    config = yaml.safe_load((root / "_config.yml").read_text())["repository"]
    url, branch = str(config["url"]).rstrip("/"), str(config.get("branch") or "main")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"_config.yml repository.url={url!r}: expected "
                         "https://github.com/<owner>/<repo> (Colab opens GitHub notebooks)")
    return url, branch


def toc_pages(root: Path = ROOT) -> list[str]:
    """Every page of _toc.yml in reading order, e.g. ["book/intro", "book/rank_bound", ...]."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [chapter["file"] for chapter in part.get("chapters", [])]
    return pages


def _title(root: Path, page: str) -> str:
    """A page's first '# ' heading, from its .md source or its executed .ipynb copy."""
    md, notebook = root / f"{page}.md", root / f"{page}.ipynb"
    if md.is_file():
        lines = md.read_text().splitlines()
    elif notebook.is_file():
        cells = json.loads(notebook.read_text())["cells"]
        lines = [line for c in cells if c["cell_type"] == "markdown"
                 for line in "".join(c["source"]).splitlines()]
    else:
        return page
    return next((line[2:].strip() for line in lines if line.startswith("# ")), page)


def chapter_table(root: Path = ROOT) -> str:
    """The README's chapter table: title, page, Colab badge of the notebook Colab opens."""
    url, branch = repository(root)
    owner_repo = url.removeprefix("https://github.com/")
    rows = ["| chapter | page | Colab |", "|---|---|---|"]
    for page in toc_pages(root):
        link = f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/{page}.ipynb"
        badge = f"[![Open in Colab]({BADGE})]({link})" if _runs_code(root, page) else "–"
        rows.append(f"| {_title(root, page)} | `{page}` | {badge} |")
    return "\n".join(rows)


def _runs_code(root: Path, page: str) -> bool:
    """True for a notebook page (a Colab badge makes sense), False for a text-only page."""
    md = root / f"{page}.md"
    return not md.is_file() or "```{code-cell}" in md.read_text()


def expected_readme(text: str, root: Path = ROOT) -> str:
    if START not in text or END not in text:
        raise ValueError(f"README.md lacks the markers {START} and {END} around its chapter table")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{chapter_table(root)}\n{END}{tail}"


def sources(root: Path = ROOT) -> list[Path]:
    """Chapter sources with an install cell: book/*.md and book/experiments/*.md."""
    return sorted([*root.glob("book/*.md"), *root.glob("book/experiments/*.md")])


def sync(root: Path = ROOT, check: bool = False) -> list[Path]:
    """Files that disagree with _config.yml; rewritten unless `check`."""
    url, branch = repository(root)
    changed = []
    for path in sources(root):
        text = path.read_text()
        fixed = INSTALL_LINE.sub(f'FEDPARA_REPO = "{url}"', text)
        fixed = BRANCH_LINE.sub(f'FEDPARA_BRANCH = "{branch}"', fixed)
        if fixed != text:
            changed.append(path)
            if not check:
                path.write_text(fixed)
    readme = root / "README.md"
    text = readme.read_text()
    fixed = expected_readme(text, root)
    if fixed != text:
        changed.append(readme)
        if not check:
            readme.write_text(fixed)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a file disagrees with _config.yml")
    args = parser.parse_args(argv)
    changed = sync(check=args.check)
    for path in changed:
        verb = "disagrees with" if args.check else "updated from"
        print(f"{path.relative_to(ROOT)} {verb} _config.yml")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
