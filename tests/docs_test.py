"""Every document the code and the README cite is in the repository."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
_CITED = re.compile(r"\bdocs/[A-Za-z0-9_.-]+\.md\b")


def _citing_files():
    for pattern in ("tan_keras/**/*.py", "tests/*.py", "experiments/*", "benchmarks/*", "*.md"):
        yield from (p for p in ROOT.glob(pattern) if p.is_file())


def test_every_cited_document_exists():
    cited = {
        (path.relative_to(ROOT), name)
        for path in _citing_files()
        for name in _CITED.findall(path.read_text(errors="ignore"))
    }
    assert cited, "the method note should be cited somewhere"
    missing = sorted((str(path), name) for path, name in cited if not (ROOT / name).is_file())
    assert missing == []
