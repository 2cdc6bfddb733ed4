"""Generated sections of the README: the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers is
replaced by commands that measure (benchmarks, `vlm-patterns compare --readme`), never edited by hand."""

from pathlib import Path


def write_readme_section(readme: str | Path, name: str, content: str) -> None:
    readme = Path(readme)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} section to fill")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{start}\n{content}\n{end}{after}", encoding="utf-8")
