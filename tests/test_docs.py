"""The project documents itself: every ``docs/methods.md §N.M`` citation in code, configs and benchmarks names a
section that exists, and nothing cites a methods file outside the repository."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTES = REPO / "docs" / "methods.md"
CITING = [*(REPO / "src").rglob("*.py"), *(REPO / "configs").rglob("*.yaml"), *(REPO / "benchmarks").glob("*.py"),
          REPO / "README.md", REPO / "BENCHMARKS.md"]


def sections() -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", NOTES.read_text(), flags=re.M))


def citations() -> list[tuple[str, str]]:
    """(file, section) for every ``docs/methods.md §A[, §B][-C]`` in the citing files."""
    found = []
    for path in CITING:
        for match in re.finditer(r"docs/methods\.md((?:[ ,and]*§\d+(?:\.\d+)?(?:[-–]\d+(?:\.\d+)?)?)+)", path.read_text()):
            for number in re.findall(r"\d+(?:\.\d+)?", match.group(1)):
                found.append((str(path.relative_to(REPO)), number))
    return found


def test_notes_have_the_numbered_sections():
    assert {"1", "1.1", "1.4", "1.5", "2", "2.1", "2.3", "2.4", "3", "3.2", "4"} <= sections()


def test_every_citation_resolves():
    cited = citations()
    assert len(cited) >= 20
    missing = [(f, s) for f, s in cited if s not in sections()]
    assert not missing, f"citations of sections docs/methods.md does not have: {missing}"


def test_no_citation_of_a_file_outside_the_repository():
    stale = [str(p.relative_to(REPO)) for p in CITING if re.search(r"(?<!docs/)METHODS\.md|shared/", p.read_text())]
    assert not stale, stale
