"""Run the book's experiment notebooks with papermill.

    python scripts/execute_notebooks.py --profile full        # make execute
    python scripts/execute_notebooks.py --profile smoke --chapter fashion_mnist
    python scripts/execute_notebooks.py --render              # make book (never trains)

Each experiment source `book/experiments/<name>.md` (a jupytext MyST notebook) is converted to a
notebook in memory -- the same as `jupytext --to ipynb -o - SRC | papermill - OUT -p k v` -- and
executed by papermill, which overrides the cell tagged `parameters`. The executed copy goes to
`book/generated/<name>.ipynb`, which is what the book renders; the book build never re-executes it.

One source can make several chapters: `SHARED_SOURCES` maps such a chapter to its source, the
parameters that make it that chapter (e.g. its presets) and its title, which replaces the
source's first heading in the executed copy. `book/experiments/cifar.md` makes `cifar10` and
`cifar100` this way; every other source `<name>.md` is the chapter `<name>`, with no fixed
parameters. Command-line `-p` overrides come last, after a chapter's fixed parameters.

Papermill first writes into `_build/papermill/<name>.ipynb`. The copy in `book/generated/` is
replaced (atomically) only when every cell succeeded; after a failing cell the partial notebook
stays in `_build/papermill/` for inspection, the last good copy is kept, and the exit code is 1.

`--render` is what `make book` runs. First it drops Jupyter Book's cached execution of each
explanatory page that reads stored files (`READS_STORED`: the intro's results summary, the run
table, the benchmark figures) when a file in the folders it reads is newer than that execution:
the cache keys on a page's code, so a run stored by `make execute` would otherwise not show on
those pages until their code changed. Then, for each experiment whose executed copy is
missing, or was made from an older version of its source or of its fixed parameters and title
(`chapter_digest`), it runs the notebook with `train=False` -- the notebook then shows the stored history of its
preset and profile if there is one, else the command that produces it and its communication
cost. It never trains, so `-p train ...` with `--render` is refused.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
from datetime import timezone
from pathlib import Path

import jupytext
import nbformat
import papermill
import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCES_DIR = ROOT / "book" / "experiments"
GENERATED_DIR = ROOT / "book" / "generated"
WORK_DIR = ROOT / "_build" / "papermill"
PROFILES = ("full", "quick", "smoke")
METADATA_KEY = (
    "fedpara_book"  # notebook metadata: which source (and which version of it) made a copy
)
# explanatory pages that read stored files when they execute -> the folders they read
READS_STORED: dict[str, tuple[str, ...]] = {
    "intro.md": ("results",),
    "run_it_yourself.md": ("results", "benchmarks/results"),
    "hadamard_layers.md": ("benchmarks/results",),
    "performance.md": ("benchmarks/results",),
}
CACHE_DIR = ROOT / "_build" / ".jupyter_cache"  # Jupyter Book's default execution cache
# chapters made from a shared source: name -> source stem in SOURCES_DIR, fixed parameters, title
SHARED_SOURCES: dict[str, dict] = {
    "cifar10": {
        "source": "cifar",
        "parameters": {"chapter": "cifar10", "presets": "cifar10-iid,cifar10-noniid"},
        "title": "CIFAR-10, Figure 3 (a) and (d)",
    },
    "cifar100": {
        "source": "cifar",
        "parameters": {"chapter": "cifar100", "presets": "cifar100-iid,cifar100-noniid"},
        "title": "CIFAR-100, Figure 3 (b) and (e)",
    },
}


# helpers


def experiment_names() -> list[str]:
    """Names of the experiment chapters, e.g. ["cifar10", "fashion_mnist"]: the sources in
    book/experiments/*.md, a shared source replaced by the chapters of SHARED_SOURCES."""
    stems = {path.stem for path in SOURCES_DIR.glob("*.md")}
    shared = {name for name, entry in SHARED_SOURCES.items() if entry["source"] in stems}
    used = {SHARED_SOURCES[name]["source"] for name in shared}
    return sorted((stems - used) | shared)


def chapter_source(name: str) -> tuple[Path, dict, str | None]:
    """(source, fixed parameters, title or None) of experiment chapter `name`."""
    entry = SHARED_SOURCES.get(name)
    if entry is None:
        return SOURCES_DIR / f"{name}.md", {}, None
    return SOURCES_DIR / f"{entry['source']}.md", dict(entry["parameters"]), entry["title"]


def source_digest(source: Path) -> str:
    """SHA-256 of a source file: identifies the version of the source a copy was made from."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def chapter_digest(name: str) -> str:
    """What a chapter's executed copy is made from: its source's digest, or, for a chapter of
    SHARED_SOURCES, the digest of its source together with its fixed parameters and title (a
    copy is stale when any of them changed)."""
    source, fixed, title = chapter_source(name)
    if not fixed and title is None:
        return source_digest(source)
    extra = json.dumps({"parameters": fixed, "title": title}, sort_keys=True).encode()
    return hashlib.sha256(source.read_bytes() + b"\0" + extra).hexdigest()


def set_title(notebook, title: str) -> None:
    """Replace the first Markdown heading of level 1 (`# ...`) of `notebook` with `title`."""
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            if line.startswith("# "):
                lines[i] = f"# {title}"
                cell.source = "\n".join(lines)
                return
    raise ValueError("the notebook has no '# ' heading to replace with its chapter's title")


def stored_run(generated: Path) -> tuple[str | None, dict]:
    """(source digest, papermill parameters) of an executed copy; (None, {}) if unreadable."""
    try:
        metadata = jupytext.read(generated).metadata
    except Exception:  # a truncated or hand-edited file: treat it as missing
        return None, {}
    digest = metadata.get(METADATA_KEY, {}).get("source_sha256")
    return digest, dict(metadata.get("papermill", {}).get("parameters", {}))


def notebook_parameters(source: Path) -> list[str]:
    """The names the cell tagged `parameters` of `source` assigns: what `-p` may override
    (papermill only warns about another name, and the run then goes on with the default)."""
    names = []
    for cell in jupytext.read(source).cells:
        if "parameters" not in cell.metadata.get("tags", []):
            continue
        for node in ast.parse(cell.source).body:
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else [])
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


# running


def run_notebook(
    source: Path,
    output: Path,
    parameters: dict,
    *,
    work_dir: Path = WORK_DIR,
    cwd: Path = GENERATED_DIR,
    log_output: bool = True,
    digest: str | None = None,
    title: str | None = None,
) -> None:
    """Execute the jupytext source `source` with papermill and write the result to `output`.

    The notebook runs in `cwd` (by default book/generated/, where its executed copy lives, so
    paths resolve as they do for a reader who opens that copy). `output` is written only if
    every cell succeeds; otherwise papermill's `PapermillExecutionError` propagates and the
    partial notebook is left at `work_dir / output.name`. `digest` (default: the source's) is
    stored in the copy's metadata; `title`, if given, replaces the source's first heading.
    """
    notebook = jupytext.read(source)
    if title is not None:
        set_title(notebook, title)
    notebook.metadata[METADATA_KEY] = {
        "source": source.resolve().relative_to(ROOT).as_posix()
        if source.resolve().is_relative_to(ROOT)
        else source.name,
        "source_sha256": digest or source_digest(source),
    }
    notebook.metadata.pop("jupytext", None)  # the executed copy is a plain notebook, not a pairing
    for folder in (work_dir, output.parent, cwd):
        folder.mkdir(parents=True, exist_ok=True)
    partial = work_dir / output.name
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    papermill.execute_notebook(
        notebook,
        str(partial),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(cwd),
        progress_bar=False,
        log_output=log_output,
    )
    # papermill records where it read and wrote: here a copy of the whole input notebook (it
    # was given one in memory) and a folder of this machine; the copy keeps neither
    executed = nbformat.read(partial, as_version=4)
    record = executed.metadata.get("papermill", {})
    record.pop("output_path", None)
    if "input_path" in record:
        record["input_path"] = notebook.metadata[METADATA_KEY]["source"]
    nbformat.write(executed, partial)
    os.replace(partial, output)  # same file system (both under the repository): atomic


def render_parameters(name: str) -> dict | None:
    """Parameters for a render-only run of experiment `name`, or None if its copy is current.

    A missing copy is rendered for the full profile; a copy made from an older source (or
    older fixed parameters or title) is rendered again with the parameters it was made with,
    except that it does not train and that the chapter's fixed parameters are the current ones.
    """
    _, fixed, _ = chapter_source(name)
    generated = GENERATED_DIR / f"{name}.ipynb"
    if not generated.exists():
        return {"profile": "full", **fixed, "train": False}
    digest, parameters = stored_run(generated)
    if digest == chapter_digest(name):
        return None
    return {**parameters, **fixed, "train": False}


def forget_stale_pages(cache_dir: Path | None = None, root: Path | None = None) -> list[str]:
    """Drop the cached execution of each page of `READS_STORED` that is older than the newest
    file in the folders the page reads, so that the book build executes it again; returns
    the pages dropped. Nothing to do without a cache."""
    cache_dir, root = cache_dir or CACHE_DIR, root or ROOT
    if not (cache_dir / "global.db").is_file():
        return []
    from jupyter_cache import get_cache

    cache = get_cache(str(cache_dir))
    dropped = []
    for record in cache.list_cache_records():
        page = Path(record.uri)
        if page.parent != root / "book" or page.name not in READS_STORED:
            continue
        newest = max((f.stat().st_mtime for folder in READS_STORED[page.name]
                      for f in (root / folder).rglob("*") if f.is_file()), default=0.0)
        created = record.created  # jupyter-cache stores UTC, read back without a zone
        if created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)
        if created.timestamp() < newest:
            cache.remove_cache(record.pk)
            dropped.append(page.name)
    return dropped


# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", help=f"one of {', '.join(PROFILES)}")
    parser.add_argument(
        "--chapter", action="append", default=[], help="run only this experiment (repeatable)"
    )
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="override a notebook parameter (VALUE is read as YAML, as papermill does)",
    )
    parser.add_argument(
        "--render", action="store_true", help="render missing or stale copies without training"
    )
    args = parser.parse_args(argv)
    if args.profile not in PROFILES:
        parser.error(f"--profile must be one of {', '.join(PROFILES)}, got {args.profile!r}")
    if args.render and any(key == "train" for key, _ in args.parameter):
        parser.error("--render never trains: leave out -p train (or run without --render)")
    known = experiment_names()
    for name in args.chapter:
        if name not in known:
            parser.error(f"--chapter must be one of {', '.join(known)}, got {name!r}")
    allowed = {name: notebook_parameters(chapter_source(name)[0])
               for name in (args.chapter or known)} if args.parameter else {}
    for key, _ in args.parameter:  # a typo would otherwise run every chapter with the default
        for name, names in allowed.items():
            if key not in names:
                parser.error(f"-p {key}: not a parameter of the {name} chapter; "
                             f"its parameters: {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.chapter or experiment_names()
    overrides = {key: yaml.safe_load(value) for key, value in args.parameter}
    failed = []
    if args.render:
        for page in forget_stale_pages():
            print(f"[execute] book/{page}: its stored files changed since its cached execution;"
                  f" the book build executes it again", flush=True)
    for name in names:
        if args.render:
            parameters = render_parameters(name)
            if parameters is None:
                continue
            parameters.update(overrides)
        else:
            parameters = {"profile": args.profile, "train": True,
                          **chapter_source(name)[1], **overrides}
        output = GENERATED_DIR / f"{name}.ipynb"
        source, _, title = chapter_source(name)
        print(f"[execute] {name}: {parameters} -> {output.relative_to(ROOT)}", flush=True)
        try:
            run_notebook(source, output, parameters, digest=chapter_digest(name), title=title)
        except papermill.PapermillExecutionError as error:
            partial = (WORK_DIR / output.name).relative_to(ROOT)
            print(
                f"[execute] {name} FAILED in cell {error.exec_count}: "
                f"{error.ename}: {error.evalue}\n"
                f"          partial notebook: {partial}; {output.relative_to(ROOT)} left unchanged",
                file=sys.stderr,
                flush=True,
            )
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
