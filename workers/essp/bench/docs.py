"""The benchmarks page (docs/benchmarks.md, relative to where `essp bench` runs) and replacing one
bench's block in it between that bench's markers."""

from __future__ import annotations

from pathlib import Path

DOCS_START = "<!-- bench:dataplane:start -->"
DOCS_END = "<!-- bench:dataplane:end -->"
DEFAULT_DOCS = Path("docs") / "benchmarks.md"  # under the project folder, where `essp bench` runs


def update_docs(path: Path, block: str, *, name: str = "dataplane", title: str = "Data plane") -> None:
    """Replace what lies between the ``bench:<name>`` markers (a section titled ``title`` with the
    markers is appended when they are missing, and the file created when it is)."""
    path = Path(path)
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    fenced = f"{start}\n{block}{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + fenced + tail
    else:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + fenced + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
