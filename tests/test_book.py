"""The book's build: its table of contents, Colab twins, configuration and experiment notebooks.

The slowest test runs the smoke profile of every experiment notebook through papermill
(one preset and one variant each: a Ray simulation of two rounds, about a minute on two cores;
the CIFAR and FEMNIST chapters run on fake files in the real formats).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path, PurePosixPath

import jupytext
import nbformat
import pytest
import yaml
from sphinx.util.matching import get_matching_files

from fedpara.results import listed, parse_seeds

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def _load_driver():
    spec = importlib.util.spec_from_file_location(
        "execute_notebooks", ROOT / "scripts" / "execute_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


driver = _load_driver()


def toc_files(entry: dict) -> list[str]:
    """Every `file:` (and the root) in a jupyter-book _toc.yml, depth first."""
    files = [entry["root"]] if "root" in entry else []
    if "file" in entry:
        files.append(entry["file"])
    for key in ("parts", "chapters", "sections"):
        for child in entry.get(key, []):
            files += toc_files(child)
    return files


CHAPTERS = toc_files(TOC)
SOURCES = sorted((ROOT / "book").glob("*.md")) + sorted(
    (ROOT / "book" / "experiments").glob("*.md")
)
EXPERIMENTS = driver.experiment_names()


def cells(notebook) -> list[tuple[str, str, tuple[str, ...]]]:
    """What a reader sees of a notebook: each cell's type, source and tags (no ids or metadata)."""
    return [
        (c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", []))) for c in notebook.cells
    ]


# table of contents ---------------------------------------------------------------------------


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_in_the_toc_exists(chapter):
    assert (ROOT / f"{chapter}.md").is_file() or (ROOT / f"{chapter}.ipynb").is_file(), chapter


def test_every_chapter_source_is_in_the_toc():
    listed = set(CHAPTERS)
    for source in (ROOT / "book").glob("*.md"):
        assert f"book/{source.stem}" in listed, f"{source} is not in _toc.yml"
    for name in EXPERIMENTS:  # experiments are rendered from their executed copies
        assert f"book/generated/{name}" in listed, f"book/generated/{name} is not in _toc.yml"


# Colab twins and the install cell -------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_every_chapter_has_an_up_to_date_ipynb_twin(source):
    twin = source.with_suffix(".ipynb")
    assert twin.is_file(), f"{twin} is missing: run `make colab`"
    assert cells(nbformat.read(twin, as_version=4)) == cells(jupytext.read(source)), (
        f"{twin.name} differs from {source.name}: run `make colab`"
    )


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_first_cell_installs_on_colab_only(source, tmp_path, monkeypatch):
    first = next((c for c in jupytext.read(source).cells if c.cell_type == "code"), None)
    if first is None:  # a page of plain text (notation, bibliography) runs nothing
        pytest.skip(f"{source.name} has no code cells")
    assert "remove-cell" in first.metadata.get("tags", [])
    assert '"google.colab" in sys.modules' in first.source
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)
    exec(first.source, namespace)  # not on Colab: it must change nothing
    assert Path.cwd() == tmp_path
    assert namespace["FEDPARA_REPO"] == CONFIG["repository"]["url"], (
        "the install cell's FEDPARA_REPO must be the repository url of _config.yml"
    )
    assert namespace["FEDPARA_BRANCH"] == CONFIG["repository"]["branch"], (
        "the install cell's FEDPARA_BRANCH must be the repository branch of _config.yml"
    )
    assert '"--branch", FEDPARA_BRANCH' in first.source, "Colab must clone that branch"


# citations --------------------------------------------------------------------------------------


def test_every_citation_is_in_the_bibliography():
    import re

    bibfiles = CONFIG["bibtex_bibfiles"]
    assert all((ROOT / f).is_file() for f in bibfiles), bibfiles
    keys = set()
    for f in bibfiles:
        keys |= set(re.findall(r"^@\w+\{([^,\s]+),", (ROOT / f).read_text(), re.MULTILINE))
    cited = set()
    for source in SOURCES:
        for roles in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", source.read_text()):
            cited |= {key.strip() for key in roles.split(",")}
    assert cited, "no {cite} roles found"
    assert cited <= keys, f"cited but not in {bibfiles}: {sorted(cited - keys)}"
    bibliography = (ROOT / "book" / "bibliography.md").read_text()
    assert "```{bibliography}" in bibliography and "book/bibliography" in CHAPTERS


# configuration ---------------------------------------------------------------------------------


def test_build_excludes_twins_sources_and_non_book_folders(tmp_path):
    pages = ["book/intro.md", "book/generated/fashion_mnist.ipynb"]
    others = [
        "book/intro.ipynb",
        "book/experiments/fashion_mnist.md",
        "book/experiments/fashion_mnist.ipynb",
        ".venv/lib/x.md",
        ".pytest_cache/README.md",
        "_build/html/x.md",
        "data/x.md",
        "results/x.md",
        "tests/x.md",
        "README.md",
    ]
    for path in pages + others:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("# x\n")
    # what Sphinx reads from the source folder, with the book's exclude_patterns
    assert sorted(
        get_matching_files(tmp_path, exclude_patterns=CONFIG["exclude_patterns"])
    ) == sorted(pages)


def test_execution_never_reruns_experiments():
    execute = CONFIG["execute"]

    def skipped(path: str) -> bool:  # how myst-nb matches execute.exclude_patterns
        return any(
            PurePosixPath(ROOT.as_posix(), path).match(p) for p in execute["exclude_patterns"]
        )

    assert all(skipped(f"book/generated/{name}.ipynb") for name in EXPERIMENTS)
    assert not any(skipped(f"book/{p.name}") for p in (ROOT / "book").glob("*.md"))


# the papermill driver ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_committed_executed_copy_is_from_the_current_source(name):
    digest, parameters = driver.stored_run(ROOT / "book" / "generated" / f"{name}.ipynb")
    assert digest == driver.chapter_digest(name), (
        f"book/generated/{name}.ipynb was made from an older source: run `make book` (renders "
        "from stored histories) or `make execute CHAPTER={name}`"
    )
    assert "profile" in parameters


def test_render_parameters_missing_stale_and_current(tmp_path, monkeypatch):
    sources, generated = tmp_path / "experiments", tmp_path / "generated"
    sources.mkdir(), generated.mkdir()
    monkeypatch.setattr(driver, "SOURCES_DIR", sources)
    monkeypatch.setattr(driver, "GENERATED_DIR", generated)
    source = sources / "demo.md"
    source.write_text("# demo\n")
    # missing: render the full profile, never train
    assert driver.render_parameters("demo") == {"profile": "full", "train": False}
    # made from this source: nothing to do
    notebook = nbformat.v4.new_notebook(
        metadata={
            driver.METADATA_KEY: {"source_sha256": driver.source_digest(source)},
            "papermill": {"parameters": {"profile": "quick", "train": True, "seed": 3}},
        }
    )
    nbformat.write(notebook, generated / "demo.ipynb")
    assert driver.render_parameters("demo") is None
    # the source changed: render again with the same parameters, without training
    source.write_text("# demo, edited\n")
    assert driver.render_parameters("demo") == {"profile": "quick", "train": False, "seed": 3}


@pytest.mark.parametrize("argv", [["--profile", "huge"], ["--chapter", "no_such_chapter"]])
def test_driver_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit):
        driver.parse_args(argv)
    assert "must be one of" in capsys.readouterr().err


def test_driver_refuses_a_parameter_the_notebooks_do_not_have(capsys):
    with pytest.raises(SystemExit):
        driver.parse_args(["-p", "devcie", "cuda"])
    err = capsys.readouterr().err
    assert "-p devcie: not a parameter of the" in err and "device" in err
    # fake_data is a parameter of the fake-data chapters only
    plain = next(name for name in EXPERIMENTS if name not in FAKE_DATA_CHAPTERS)
    with pytest.raises(SystemExit):
        driver.parse_args(["--chapter", plain, "-p", "fake_data", "true"])
    assert f"not a parameter of the {plain} chapter" in capsys.readouterr().err
    for name in FAKE_DATA_CHAPTERS:
        assert driver.parse_args(["--chapter", name, "-p", "fake_data", "true"]).parameter
    assert driver.parse_args(["-p", "device", "cuda"]).parameter == [["device", "cuda"]]


def test_render_refuses_a_train_parameter(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(driver, "run_notebook", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(driver, "render_parameters", lambda name: {"profile": "full",
                                                                   "train": False})
    with pytest.raises(SystemExit):
        driver.main(["--render", "--chapter", EXPERIMENTS[0], "-p", "train", "true"])
    assert "--render never trains: leave out -p train" in capsys.readouterr().err
    assert calls == []


def test_a_failing_cell_keeps_the_partial_notebook_and_the_last_good_copy(tmp_path):
    source = tmp_path / "broken.md"
    source.write_text(
        "---\njupytext:\n  text_representation:\n    extension: .md\n    format_name: myst\n"
        "kernelspec:\n  display_name: Python 3\n  language: python\n  name: python3\n---\n\n"
        "```{code-cell} ipython3\n:tags: [parameters]\n\nx = 1\n```\n\n"
        "```{code-cell} ipython3\nraise RuntimeError(f'cell failed with x={x}')\n```\n"
    )
    output, work = tmp_path / "out" / "broken.ipynb", tmp_path / "work"
    output.parent.mkdir()
    output.write_text("last good copy")
    with pytest.raises(driver.papermill.PapermillExecutionError, match="x=2"):
        driver.run_notebook(source, output, {"x": 2}, work_dir=work, cwd=tmp_path, log_output=False)
    assert output.read_text() == "last good copy"
    partial = nbformat.read(work / "broken.ipynb", as_version=4)
    errors, _ = _outputs(partial)
    assert errors == ["RuntimeError"]
    # a plain notebook (no jupytext pairing) that names its source and the source's digest
    assert "jupytext" not in partial.metadata
    assert partial.metadata[driver.METADATA_KEY] == {
        "source": "broken.md", "source_sha256": driver.source_digest(source)}


def _outputs(notebook) -> tuple[list[str], str]:
    """(error names, all text/plain, text/markdown and stream text) of an executed notebook."""
    errors, text = [], []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                errors.append(output.ename)
            text.append(output.get("text", ""))
            for mime in ("text/plain", "text/markdown"):
                text.append(output.get("data", {}).get(mime, ""))
    return errors, "\n".join(text)


def _defaults(name: str) -> dict:
    """The values of an experiment notebook's `parameters` cell, with the chapter's fixed
    parameters (a chapter of a shared source) applied."""
    source, fixed, _ = driver.chapter_source(name)
    cell = next(
        c.source for c in jupytext.read(source).cells if "parameters" in c.metadata.get("tags", [])
    )
    defaults: dict = {}
    exec(cell, defaults)
    return {**defaults, **fixed}


# chapters whose smoke profile runs on fake files (unless a data_dir is given), on every machine
FAKE_DATA_CHAPTERS = {"cifar10", "cifar100", "femnist"}


def test_every_experiment_notebook_takes_the_same_parameters():
    for name in EXPERIMENTS:
        defaults = _defaults(name)
        assert {"presets", "profile", "variants", "data_dir", "device", "seed", "train", "retrain",
                "results_dir"} <= set(defaults), name
        assert defaults["profile"] == "full", f"{name}: the book is about the full profile"
        assert ("fake_data" in defaults) == (name in FAKE_DATA_CHAPTERS), name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_render_only_run_never_trains(name, tmp_path):
    """train=False with no stored history: the command and the planned traffic, no simulation."""
    output = tmp_path / f"{name}.ipynb"
    source, fixed, title = driver.chapter_source(name)
    driver.run_notebook(
        source,
        output,
        {**fixed, "profile": "full", "train": False, "results_dir": str(tmp_path / "results")},
        work_dir=tmp_path / "work",
        log_output=False,
        title=title,
    )
    notebook = nbformat.read(output, as_version=4)
    errors, text = _outputs(notebook)
    assert errors == []
    assert f"make execute CHAPTER={name} PROFILE=full" in text
    assert "planned traffic (GiB)" in text
    if name in FAKE_DATA_CHAPTERS:
        assert "No runs yet" in text and "FAKE DATA" not in text
        # the status is the notice's, computed on the page; the title stays true after a run
        assert "no runs yet" not in notebook.cells[0].source.lower()
        assert "NaN" not in text and "None" not in text, "no table of missing values"
    assert "a test of the machinery" not in text
    assert not (tmp_path / "results").exists(), "a render-only run must not write histories"
    # papermill's record of the run names the source, not a copy of it or a local folder
    record = notebook.metadata["papermill"]
    assert "output_path" not in record
    assert record["input_path"] == source.relative_to(ROOT).as_posix()


SEEDED = [name for name in EXPERIMENTS if "seeds" in _defaults(name)]


def _listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", SEEDED)
def test_full_profile_renders_its_seed_comparison_from_the_stored_runs(name, tmp_path):
    """The chapter as `make book` renders it, from the full-profile runs committed under
    results/ (every seed of its `seeds` parameter; nothing is trained): the code that words the
    comparison over seeds runs only for the full profile, so it is checked on the real
    histories. (A run that writes under results/ meanwhile fails the last check.)"""
    results = ROOT / "results"
    before = _listing(results)
    source, fixed, title = driver.chapter_source(name)
    output = tmp_path / f"{name}.ipynb"
    driver.run_notebook(source, output, {**fixed, "train": False}, work_dir=tmp_path / "work",
                        log_output=False, title=title)
    notebook = nbformat.read(output, as_version=4)
    errors, text = _outputs(notebook)
    assert errors == []
    seeds = listed([0, *parse_seeds(_defaults(name)["seeds"])])
    assert "**Over seeds" in text and f"Over seeds {seeds}" in text, (
        "the comparison over every seed is worded from the stored runs")
    assert "**Seed " not in text, "a seed with runs still to make"
    assert "a test of the machinery" not in text and "No runs yet" not in text
    prose = "\n".join(o.get("data", {}).get("text/markdown", "")
                      for c in notebook.cells for o in c.get("outputs", []))
    assert not re.search(r"\b(nan|inf)\b", prose, re.IGNORECASE), "a number that is missing"
    assert _listing(results) == before, "rendering must not write under results/"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_profile_runs_through_papermill(name, tmp_path, fmnist_dir, monkeypatch):
    """One preset and one variant of each notebook (about a minute each on two cores)."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    from fedpara.config import PRESETS

    preset = _defaults(name)["presets"].split(",")[0]
    variant = next(iter(PRESETS[preset].variants))
    results = tmp_path / "results"
    output = tmp_path / f"{name}.ipynb"
    source, fixed, _ = driver.chapter_source(name)
    driver.run_notebook(
        source,
        output,
        {
            **fixed,
            "profile": "smoke",
            "presets": preset,
            "variants": variant,
            # a data_dir given is used as it is: the fake-data chapters write their own
            **({} if name in FAKE_DATA_CHAPTERS else {"data_dir": str(fmnist_dir)}),
            "results_dir": str(results),
            # one more seed, not the chapter's two: the seeds code runs at half the cost
            **({"seeds": "1"} if "seeds" in _defaults(name) else {}),
        },
        work_dir=tmp_path / "work",
        log_output=False,
    )

    notebook = nbformat.read(output, as_version=4)
    errors, text = _outputs(notebook)
    assert errors == []
    assert notebook.metadata.papermill.parameters["profile"] == "smoke"
    history = json.loads((results / preset / f"{variant}-smoke.json").read_text())
    assert (
        history["config"]["profile"] == "smoke"
        and len(history["records"]) == history["config"]["rounds"]
    )
    assert not list(results.rglob("*-full.json")), "a smoke run must never write a full history"
    if "seeds" in _defaults(name):  # the other seed's run is made too
        assert (results / preset / f"{variant}-smoke+seed=1.json").is_file()
    assert "trained" in text and "a test of the machinery, not a result" in text
    assert ("FAKE DATA" in text) == (name in FAKE_DATA_CHAPTERS)
    if PRESETS[preset].base.get("evaluation") == "clients":  # the per-client spread is shown
        scores = results / preset / "clients" / f"{variant}-smoke.json"  # from the checkpoint
        assert history["records"][-1].get("client_accuracy") or json.loads(scores.read_text())[
            "clients"
        ], "per-client accuracies: in the history, else recomputed from the final checkpoint"
        assert "clients scored" in text
    assert any(
        o.get("data", {}).get("image/png") for c in notebook.cells for o in c.get("outputs", [])
    ), "the smoke run should plot its curves"


# chapters made from one shared source ------------------------------------------------------------


def test_shared_source_makes_each_chapter_with_its_parameters_and_title():
    for name, entry in driver.SHARED_SOURCES.items():
        source, fixed, title = driver.chapter_source(name)
        assert source == driver.SOURCES_DIR / f"{entry['source']}.md" and source.is_file()
        assert name in EXPERIMENTS and entry["source"] not in EXPERIMENTS
        assert fixed["chapter"] == name, "the page's commands name its own chapter"
        notebook = jupytext.read(source)
        driver.set_title(notebook, title)
        assert notebook.cells[0].source.splitlines()[0] == f"# {title}"
        # the copy is stale when the source or the chapter's parameters change
        digest = driver.chapter_digest(name)
        assert digest != driver.source_digest(source)
        other = {**entry, "parameters": {**entry["parameters"], "seed": 1}}
        original = driver.SHARED_SOURCES[name]
        try:
            driver.SHARED_SOURCES[name] = other
            assert driver.chapter_digest(name) != digest
        finally:
            driver.SHARED_SOURCES[name] = original
    assert driver.chapter_digest("fashion_mnist") == driver.source_digest(
        driver.SOURCES_DIR / "fashion_mnist.md"
    ), "a chapter with a source of its own: the digest of its source alone"


def test_render_parameters_apply_the_chapters_fixed_parameters(tmp_path, monkeypatch):
    sources, generated = tmp_path / "experiments", tmp_path / "generated"
    sources.mkdir(), generated.mkdir()
    (sources / "shared.md").write_text("# shared\n")
    monkeypatch.setattr(driver, "SOURCES_DIR", sources)
    monkeypatch.setattr(driver, "GENERATED_DIR", generated)
    monkeypatch.setattr(
        driver,
        "SHARED_SOURCES",
        {"one": {"source": "shared", "parameters": {"presets": "a"}, "title": "One"}},
    )
    assert driver.experiment_names() == ["one"]
    assert driver.render_parameters("one") == {"profile": "full", "presets": "a", "train": False}
    notebook = nbformat.v4.new_notebook(
        metadata={
            driver.METADATA_KEY: {"source_sha256": driver.chapter_digest("one")},
            "papermill": {"parameters": {"profile": "quick", "presets": "a", "train": True}},
        }
    )
    nbformat.write(notebook, generated / "one.ipynb")
    assert driver.render_parameters("one") is None
    driver.SHARED_SOURCES["one"]["parameters"] = {"presets": "b"}  # the table changed
    assert driver.render_parameters("one") == {"profile": "quick", "presets": "b", "train": False}


def test_readme_and_install_cells_agree_with_the_repository_url():
    """`make colab` writes _config.yml's url everywhere it is repeated; nothing has drifted."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import sync_repository
    finally:
        sys.path.pop(0)
    assert sync_repository.sync(check=True) == [], "run `make colab`"
    readme = (ROOT / "README.md").read_text()
    url, branch = sync_repository.repository()
    for page in sync_repository.toc_pages():
        assert f"`{page}`" in readme, page
        if sync_repository._runs_code(ROOT, page):
            link = f"{url.removeprefix('https://github.com/')}/blob/{branch}/{page}.ipynb"
            assert link in readme and (ROOT / f"{page}.ipynb").is_file(), page


def test_driver_main_runs_each_chapter_with_its_parameters(monkeypatch, capsys):
    """A training run: the profile, train=True, the chapter's fixed parameters, then the -p
    overrides read as YAML (they win); the copy goes to book/generated/ with the chapter's
    digest and title. A failing chapter does not stop the others, and the exit code is 1."""
    calls = []

    def run_notebook(source, output, parameters, **kwargs):
        calls.append((source, output, parameters, kwargs))
        if output.stem == "cifar10":
            raise driver.papermill.PapermillExecutionError(3, 7, "x", "RuntimeError", "boom", [])

    monkeypatch.setattr(driver, "run_notebook", run_notebook)
    assert driver.main(["--profile", "smoke", "--chapter", "cifar10", "--chapter", "cifar100",
                        "-p", "seed", "3", "-p", "presets", "cifar100-iid"]) == 1
    assert [c[1] for c in calls] == [driver.GENERATED_DIR / "cifar10.ipynb",
                                     driver.GENERATED_DIR / "cifar100.ipynb"]
    source, _, parameters, kwargs = calls[1]
    assert source == driver.SOURCES_DIR / "cifar.md"
    assert parameters == {"profile": "smoke", "train": True, "chapter": "cifar100",
                          "presets": "cifar100-iid", "seed": 3}
    assert kwargs == {"digest": driver.chapter_digest("cifar100"),
                      "title": driver.SHARED_SOURCES["cifar100"]["title"]}
    err = capsys.readouterr().err
    assert "cifar10 FAILED in cell 7: RuntimeError: boom" in err
    assert "_build/papermill/cifar10.ipynb" in err
    assert "book/generated/cifar10.ipynb left unchanged" in err
    calls.clear()
    monkeypatch.setattr(driver, "run_notebook", lambda s, o, p, **k: calls.append(p))
    assert driver.main(["--chapter", "fashion_mnist"]) == 0
    assert calls == [{"profile": "full", "train": True}]


def test_driver_render_runs_only_stale_chapters(monkeypatch):
    calls = []
    monkeypatch.setattr(driver, "run_notebook",
                        lambda source, output, parameters, **kwargs: calls.append((output.stem,
                                                                                   parameters)))
    monkeypatch.setattr(driver, "render_parameters",
                        lambda name: None if name == "cifar10" else {"profile": "quick",
                                                                     "train": False})
    forgotten = []
    monkeypatch.setattr(driver, "forget_stale_pages", lambda: forgotten.append(1) or [])
    assert driver.main(["--render", "--chapter", "cifar10", "--chapter", "fashion_mnist",
                        "-p", "device", "cpu"]) == 0
    assert calls == [("fashion_mnist", {"profile": "quick", "train": False, "device": "cpu"})]
    assert forgotten == [1], "make book's render first drops stale cached pages"


def test_a_cached_page_that_reads_stored_files_is_dropped_when_they_change(tmp_path):
    """Jupyter Book's cache keys on a page's code: the intro's results summary would keep
    showing the runs stored when it was cached, so make book drops that execution once a
    file of results/ is newer; pages that read nothing stored keep theirs."""
    from jupyter_cache import get_cache

    root, cache_dir = tmp_path / "repo", tmp_path / "repo" / "_build" / ".jupyter_cache"
    (root / "book").mkdir(parents=True)
    (root / "results" / "p").mkdir(parents=True)
    (root / "benchmarks" / "results").mkdir(parents=True)
    stored = root / "results" / "p" / "run-full.json"
    stored.write_text("{}")
    (root / "benchmarks" / "results" / "old.json").write_text("{}")
    cache = get_cache(str(cache_dir))
    for n, page in enumerate(("intro.md", "rank_bound.md", "performance.md")):
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"x = {n}")])
        path = tmp_path / f"{page}.ipynb"
        nbformat.write(notebook, path)
        cache.cache_notebook_file(str(path), uri=str(root / "book" / page),
                                  check_validity=False)
    assert driver.forget_stale_pages(cache_dir, root) == []  # nothing newer than the cache
    later = time.time() + 60
    os.utime(stored, (later, later))  # a run stored after the pages were cached
    assert driver.forget_stale_pages(cache_dir, root) == ["intro.md"]
    assert sorted(Path(r.uri).name for r in get_cache(str(cache_dir)).list_cache_records()) == [
        "performance.md", "rank_bound.md"]
    assert driver.forget_stale_pages(cache_dir, root) == []
    assert driver.forget_stale_pages(tmp_path / "no-cache", root) == []


def test_an_unreadable_executed_copy_counts_as_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "SOURCES_DIR", tmp_path)
    monkeypatch.setattr(driver, "GENERATED_DIR", tmp_path)
    (tmp_path / "demo.md").write_text("# demo\n")
    (tmp_path / "demo.ipynb").write_text('{"cells": [')  # truncated
    assert driver.stored_run(tmp_path / "demo.ipynb") == (None, {})
    assert driver.render_parameters("demo") == {"train": False}


def _sync_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import sync_repository
    finally:
        sys.path.pop(0)
    return sync_repository


def test_sync_writes_a_forks_url_and_branch(tmp_path):
    """What `make colab` does for a fork: its url (a trailing slash dropped) and branch in the
    install cells and in the README's badges; a text-only page gets no badge."""
    sync = _sync_module()
    (tmp_path / "_config.yml").write_text(
        'repository:\n  url: "https://github.com/me/fork/"\n  branch: dev\n')
    (tmp_path / "_toc.yml").write_text(
        "root: book/intro\nparts:\n- chapters:\n  - file: book/code\n  - file: book/notes\n")
    (tmp_path / "book").mkdir()
    cell = 'FEDPARA_REPO = "https://github.com/your-org/fedpara"\nFEDPARA_BRANCH = "main"\n'
    (tmp_path / "book" / "intro.md").write_text("# Intro\n\n```{code-cell}\n" + cell + "```\n")
    (tmp_path / "book" / "code.md").write_text("# Code\n\n```{code-cell}\n" + cell + "```\n")
    (tmp_path / "book" / "notes.md").write_text("# Notes\n\ntext only\n")
    (tmp_path / "README.md").write_text(
        "top\n<!-- chapters:start -->\nold\n<!-- chapters:end -->\nend\n")
    readme, intro = tmp_path / "README.md", tmp_path / "book" / "intro.md"
    assert sync.sync(tmp_path, check=True) == [tmp_path / "book" / "code.md", intro, readme]
    assert "your-org" in intro.read_text(), "--check changes nothing"
    assert sorted(sync.sync(tmp_path)) == sorted([intro, tmp_path / "book" / "code.md", readme])
    assert sync.sync(tmp_path, check=True) == []
    assert ('FEDPARA_REPO = "https://github.com/me/fork"\nFEDPARA_BRANCH = "dev"\n'
            in intro.read_text())
    text = readme.read_text()
    assert text.startswith("top\n") and text.endswith("<!-- chapters:end -->\nend\n")
    badge = "https://colab.research.google.com/github/me/fork/blob/dev/book/{}.ipynb"
    assert "| Code | `book/code` | [![Open in Colab]" in text and badge.format("code") in text
    assert "| Notes | `book/notes` | – |" in text and badge.format("notes") not in text
    # no branch: main; not a GitHub url: refused
    (tmp_path / "_config.yml").write_text('repository:\n  url: "https://github.com/me/fork"\n')
    assert sync.repository(tmp_path) == ("https://github.com/me/fork", "main")
    (tmp_path / "_config.yml").write_text('repository:\n  url: "https://gitlab.com/me/fork"\n')
    with pytest.raises(ValueError, match="expected https://github.com/<owner>/<repo>"):
        sync.repository(tmp_path)


def test_sync_check_exits_1_and_names_what_disagrees(monkeypatch, capsys):
    sync = _sync_module()
    monkeypatch.setattr(sync, "sync", lambda check=False: [ROOT / "README.md"])
    assert sync.main(["--check"]) == 1
    assert capsys.readouterr().out == "README.md disagrees with _config.yml\n"
    assert sync.main([]) == 0
    assert capsys.readouterr().out == "README.md updated from _config.yml\n"
