"""The rendered book: build it offline, open every page in headless Chromium, and check what a reader sees.

Needs Debian's chromium (/usr/bin/chromium): installed here with apt-get where the test runs as root; skipped
with one line otherwise, and failed instead where CI=true. The checks live in book/check_site.py.
"""

import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from _apt import apt_install, unavailable  # tests/_apt.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "book"))
import build  # noqa: E402  (book/build.py)
import check_site  # noqa: E402  (book/check_site.py)

SCREENSHOT = ROOT / "book" / "_build" / "screenshots" / "lesson.png"
NOTEBOOKS = [nb for part in build.course_notebooks(ROOT).values() for nb in part]  # lessons, then exercises
PAGES = [p.relative_to(ROOT).with_suffix(".html").as_posix() for p in NOTEBOOKS]
BROWSER_TEST = "book browser test"


@pytest.fixture(scope="session")
def browser():
    """One headless Debian Chromium for every page (launched by the playwright wheel, no browser download)."""
    apt_install("chromium", check_site.CHROMIUM, BROWSER_TEST)  # about 70 s here
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable(BROWSER_TEST, "the playwright package is missing (pip install -e '.[test]')")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=check_site.CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The book built from the notebooks of this checkout, from their stored outputs (no network, no kernel)."""
    start = time.monotonic()
    out = build.build(tmp_path_factory.mktemp("book") / "html", timeout=600, quiet=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"book built in {time.monotonic() - start:.0f} s, {size / 1e6:.0f} MB")
    return out


def test_the_course_has_lessons():
    assert build.course_notebooks(ROOT)["Lessons"], "no notebooks in lessons/: the book would be empty"


def test_every_page_passes_in_the_browser(site, browser):
    searches = {doc: check_site.search_word(nb) for doc, nb in zip(PAGES, NOTEBOOKS)}
    problems = check_site.check_site(site, browser, PAGES, searches, screenshot=SCREENSHOT)
    assert not problems, "the book has problems:\n" + "\n".join(problems)
    assert SCREENSHOT.stat().st_size > 10_000


def test_a_broken_copy_of_the_book_fails(site, browser, tmp_path):
    """The same check on a copy with a missing image, broken links, math from a CDN, and prose between dollars."""
    broken = shutil.copytree(site, tmp_path / "html")
    doc = next((d for d in PAGES if "_images/" in (broken / d).read_text(encoding="utf-8")), None)
    assert doc, "no page of the book has a figure to remove"
    lesson = broken / doc
    html = lesson.read_text(encoding="utf-8")
    # a reader's page whose text has an unescaped pair of dollars, as MyST renders it
    dollars = html.replace('<p class="run-links">', '<p>Training cost <span class="math notranslate nohighlight">'
                           r'\(5.6M at the assumed rental price of \)</span>2 per GPU-hour.</p><p class="run-links">')
    (lesson.parent / "99_dollars.html").write_text(dollars, encoding="utf-8")
    dollars_doc = Path(doc).with_name("99_dollars.html").as_posix()
    # a missing figure
    image = re.search(r'src="((?:\.\./)*)(_images/[^"]+)"', html)
    (broken / image.group(2)).unlink()
    # MathJax pointed at a CDN
    cdn = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"
    lesson.write_text(re.sub(r'src="[^"]*mathjax/tex-chtml\.js"', f'src="{cdn}"', html), encoding="utf-8")
    # a link to a missing page and an anchor that is on no element
    index = broken / "index.html"
    index.write_text(index.read_text(encoding="utf-8").replace(
        "</body>", '<a href="lessons/no_such_lesson.html">x</a> <a href="#no-such-anchor">y</a></body>'))

    problems = check_site.check_site(broken, browser, PAGES, searches={})
    report = "\n".join(problems)
    expected = [f"{doc}: image did not load: {image.group(1)}{image.group(2)}",
                f"{doc}: HTTP 404 for {image.group(2)}",
                f"{doc}: request leaving the site blocked: {cdn}",
                f"{doc}: raw math left in the text",
                f"{dollars_doc}: prose typeset as math",
                "index.html: broken link lessons/no_such_lesson.html",
                "index.html: broken anchor index.html#no-such-anchor"]
    missed = [e for e in expected if e not in report]
    assert not missed, f"the check missed {missed}; it reported:\n{report}"
