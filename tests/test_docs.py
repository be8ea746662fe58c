"""The docs hold together: every relative link in README.md, docs/ and deploy/ resolves (to
a file, and to a heading when it names one), and the settings reference is the one the
settings' definition generates."""
from __future__ import annotations

import re

from conftest import ROOT

from service import settings as settings_mod

PAGES = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    return {_slug(m) for m in re.findall(r"(?m)^#{1,6} (.+)$", text)}


def test_every_relative_link_resolves() -> None:
    assert len(PAGES) >= 11
    broken, checked = [], 0
    for page in PAGES:
        text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())  # code is not links
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []
    assert checked > 100  # every page links to the others


def test_the_readme_links_every_page_of_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert missing == []


def test_the_settings_reference_is_current() -> None:
    written = (ROOT / "docs" / "settings.md").read_text()
    assert written == settings_mod.markdown(), (
        "docs/settings.md is stale: run `python -m service.settings --markdown > "
        "docs/settings.md`")
