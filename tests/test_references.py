"""Every pointer into docs/architecture.md from the code, tests and README resolves to a section or an idea."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
SECTIONS = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", ARCHITECTURE, flags=re.M))
IDEAS = set(re.findall(r"^(\d+)\. \*\*", ARCHITECTURE.split("## 2.")[0], flags=re.M))
FILES = [
    *sorted((ROOT / "src" / "muddformer").rglob("*.py")),
    *sorted(p for p in (ROOT / "tests").glob("*.py") if p.name != "test_references.py"),
    *sorted((ROOT / "scripts").rglob("*.py")),
    ROOT / "README.md",
]


def test_the_document_has_its_sections_and_ideas():
    assert {"2.2", "2.3", "2.5", "2.6", "2.8", "3.1", "3.2", "4", "5", "8"} <= SECTIONS
    assert IDEAS == {str(i) for i in range(1, 8)}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_reference_resolves(path):
    for line in path.read_text().splitlines():
        if "architecture" not in line:
            continue
        for section in re.findall(r"§(\d+(?:\.\d+)?)", line):
            assert section in SECTIONS, f"{path.name}: '§{section}' is not a section of docs/architecture.md: {line}"
        for group in re.findall(r"architecture, ideas? ([\d ,and]+)", line):
            for idea in re.findall(r"\d+", group):
                assert idea in IDEAS, f"{path.name}: idea {idea} is not in docs/architecture.md: {line}"
    assert "spec §" not in path.read_text() and "DESIGN.md" not in path.read_text()
