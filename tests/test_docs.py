"""The docs site builds in strict mode: a broken link or anchor, a page left out of the navigation, or a
generated reference page that no longer builds from the code fails here (and so in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "max_new_tokens" in config and "trust_remote_code" in config  # generated from the config classes
    methods = (tmp_path / "site" / "reference" / "methods" / "index.html").read_text()
    assert "refine_lr" in methods and "prodistill" in methods  # generated from the registry


def test_readme_headline_table_is_the_benchmarks_page_table():
    """The README shows the headline quality table and the docs' benchmarks page sums up the same numbers:
    a rerun that updates one must update the other."""

    def table(path: Path) -> list[str]:
        lines = path.read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("| N adapters"))
        end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
        return lines[start:end]

    readme, page = table(ROOT / "README.md"), table(ROOT / "docs" / "benchmarks.md")
    assert len(readme) > 3 and readme == page
