"""README.md's layout section names every module of the package, and nothing that does not exist."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_layout_matches_the_tree():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("```", 2)[1]
    named = set()
    for line in layout.splitlines():
        first = line.split("  ", 1)[0].strip()  # the path column
        for part in first.split(", "):
            if part.startswith("fusednoise/") or "/" not in part:
                named.add(part if part.startswith("fusednoise/") else "fusednoise/" + part)
    named = {n.rstrip("/") for n in named if n != "fusednoise/"}
    assert all((REPO / n).exists() for n in named), sorted(n for n in named if not (REPO / n).exists())
    named = {"/".join(n.split("/")[:2]) for n in named}  # fusednoise/optim/pats.py names the folder optim
    folders = {str(p.relative_to(REPO)) for p in (REPO / "fusednoise").iterdir()
               if p.is_dir() and not p.name.startswith("__")}
    modules = {str(p.relative_to(REPO)) for p in (REPO / "fusednoise").glob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert named == modules | folders, (sorted(named - modules - folders), sorted((modules | folders) - named))
    for path in re.findall(r"^(benchmarks|tests|examples)/", layout, flags=re.M):
        assert (REPO / path).is_dir()
