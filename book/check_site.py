"""Open every page of a built book in headless Chromium and list what a reader would find broken.

    python book/check_site.py [SITE] [--screenshot PNG]    (SITE defaults to book/_build/html)

The site is served from 127.0.0.1; every request that leaves that server is blocked and reported. On each page:
console and page errors, local responses >= 400, raw math delimiters left in the text, MathJax errors, prose
typeset as math (the symptom of an unescaped dollar sign), images that did not load, internal links or anchors
that lead nowhere. Then the search page must find each lesson by a word of its text. Needs the `playwright` wheel
and Debian's chromium at /usr/bin/chromium (no `playwright install`).
"""

import argparse
import contextlib
import functools
import http.server
import re
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHROMIUM = "/usr/bin/chromium"
SKIP_DIRS = {"_static", "_sources", "_images"}  # assets, not pages

# Runs in the page once it has loaded: waits for MathJax's first typesetting and for every image, then reports.
PAGE_REPORT_JS = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const images = [...document.images];
  images.forEach(img => { img.loading = 'eager'; });
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done); img.addEventListener('error', done); setTimeout(done, 10000); })));
  const skip = 'script, style, pre, code, textarea, mjx-container, .highlight';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode: node =>
    node.parentElement.closest(skip) ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  const raw = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (['$$', '\\\\(', '\\\\)', '\\\\[', '\\\\]'].some(d => node.nodeValue.includes(d))) {
      raw.push(node.nodeValue.trim().slice(0, 80));
    }
  }
  const jax = window.MathJax && MathJax.startup && MathJax.startup.document;
  return {
    raw_math: raw,
    math_errors: [...document.querySelectorAll('mjx-merror, [data-mjx-error]')].map(
      e => e.getAttribute('data-mjx-error') || e.textContent),
    tex: jax ? jax.getMathItemsWithin(document.body).map(item => item.math) : [],
    broken_images: images.filter(img => !(img.complete && img.naturalWidth > 0 && img.naturalHeight > 0))
                         .map(img => img.getAttribute('src')),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id], a[name]')].map(e => e.id || e.getAttribute('name')),
  };
}"""

TEXT_COMMAND = re.compile(r"\\(?:text\w*|mathrm|operatorname|mbox)\s*\{[^{}]*\}")
WORD = re.compile(r"^[\"'(]*[A-Za-z]{4,}[.,;:!?\"')*]*$")


def prose_in_math(tex: str) -> bool:
    """True when a formula's source holds three ordinary words in a row (outside \\text{...})."""
    run = 0
    for token in TEXT_COMMAND.sub(" ", tex).split():
        run = run + 1 if WORD.match(token) else 0
        if run >= 3:
            return True
    return False


@contextlib.contextmanager
def serve(site: Path):
    """Serve `site` on 127.0.0.1 (a free port) in a thread; yields the base URL ending in '/'."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def site_pages(site: Path) -> list[str]:
    """Every HTML page of the site, as paths relative to it (assets folders left out)."""
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html")
                  if not SKIP_DIRS & set(p.relative_to(site).parts))


def _ids_in_file(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return set(re.findall(r"""\s(?:id|name)=["']([^"']+)["']""", text))


def _link_problems(page: str, links: list[str], base: str, site: Path, ids: dict[str, set[str]]) -> list[str]:
    """Internal links of `page` whose file is missing or whose #anchor is on no element of the target page."""
    problems = []
    for link in sorted(set(links)):
        if not link.startswith(base):
            continue  # another site (a paper, the local JupyterLab): a link, never loaded by the page
        parts = urlsplit(link)
        target = unquote(parts.path)[1:] or "index.html"
        if target.endswith("/"):
            target += "index.html"
        if not (site / target).is_file():
            problems.append(f"{page}: broken link {link[len(base):]}")
            continue
        if parts.fragment and target.endswith(".html"):
            if target not in ids:
                ids[target] = _ids_in_file(site / target)
            if unquote(parts.fragment) not in ids[target]:
                problems.append(f"{page}: broken anchor {link[len(base):]}")
    return problems


def _search_problems(page, base: str, searches: dict[str, str]) -> list[str]:
    """Each (page, word): the site's search for the word lists that page."""
    problems = []
    for doc, word in searches.items():
        page.goto(f"{base}search.html?q={word}", wait_until="load")
        page.wait_for_function(
            "() => { const s = document.querySelector('#search-results .search-summary');"
            " return s && s.textContent.trim().length > 0; }", timeout=30000)
        found = page.eval_on_selector_all("#search-results ul.search li a", "as => as.map(a => a.href)")
        if not any(urlsplit(href).path == f"/{doc}" for href in found):
            problems.append(f"search: '{word}' does not find {doc} (found {len(found)} pages)")
    return problems


def check_site(site: Path, browser, pages: list[str], searches: dict[str, str],
               screenshot: Path | None = None) -> list[str]:
    """Every problem found on the site, one line each; an empty list for a good site.

    `browser` is a launched Playwright Chromium; `pages` are the notebook pages that must exist and be linked
    from the landing page (e.g. 'lessons/00_two_costs.html'); `searches` maps a page to a word the search must
    find it by; `screenshot`, if given, receives a PNG of the first of `pages`.
    """
    problems = [f"missing page {doc}" for doc in pages if not (site / doc).is_file()]
    with serve(site) as base:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(30000)

        current = ["?"]  # the page being checked, named in each problem

        def keep_inside(route):
            if route.request.url.startswith(base):
                route.continue_()
            else:
                problems.append(f"{current[0]}: request leaving the site blocked: {route.request.url}")
                route.abort()
        context.route("**/*", keep_inside)
        page = context.new_page()
        page.on("console", lambda m: m.type == "error" and problems.append(f"{current[0]}: console error: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"{current[0]}: page error: {e}"))
        page.on("response", lambda r: r.status >= 400 and r.url.startswith(base)
                and problems.append(f"{current[0]}: HTTP {r.status} for {r.url[len(base):]}"))
        ids, links = {}, {}
        for name in site_pages(site):
            current[0] = name
            page.goto(base + name, wait_until="load")
            report = page.evaluate(PAGE_REPORT_JS)
            ids[name], links[name] = set(report["ids"]), report["links"]
            problems += [f"{name}: raw math left in the text: {t!r}" for t in report["raw_math"]]
            problems += [f"{name}: math error: {e}" for e in report["math_errors"]]
            problems += [f"{name}: prose typeset as math (an unescaped $?): {t[:80]!r}"
                         for t in report["tex"] if prose_in_math(t)]
            problems += [f"{name}: image did not load: {src}" for src in report["broken_images"]]
            if screenshot is not None and pages and name == pages[0]:
                _screenshot(page, screenshot)
        for name, page_links in links.items():
            problems += _link_problems(name, page_links, base, site, ids)
        problems += [f"index.html: no link to {doc}" for doc in pages
                     if base + doc not in {link.split("#")[0] for link in links.get("index.html", [])}]
        current[0] = "search.html"
        problems += _search_problems(page, base, searches)
        context.close()
    return problems


def _screenshot(page, path: Path) -> None:
    """The whole page: the viewport stretched to its height (steadier than full_page=True with this theme)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("() => document.documentElement.scrollHeight")
    page.set_viewport_size({"width": 1280, "height": min(height, 30000)})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1280, "height": 900})


def search_word(notebook: Path) -> str:
    """A word of the notebook's prose to search for: its longest plain word (code and math left out)."""
    import json
    text = " ".join("".join(c["source"]) for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"]
                    if c["cell_type"] == "markdown")
    text = re.sub(r"`[^`]*`|\$[^$]*\$|\(http[^)]*\)", " ", text)
    words = set(re.findall(r"(?<![\w\\-])[A-Za-z]{5,}(?![\w-])", text))
    return max(sorted(words), key=len) if words else ""


def main() -> None:
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build import BOOK, ROOT, course_notebooks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, nargs="?", default=BOOK / "_build" / "html")
    parser.add_argument("--screenshot", type=Path, default=BOOK / "_build" / "screenshots" / "lesson.png")
    args = parser.parse_args()
    notebooks = [nb for part in course_notebooks(ROOT).values() for nb in part]
    pages = [p.relative_to(ROOT).with_suffix(".html").as_posix() for p in notebooks]
    searches = {doc: search_word(p) for doc, p in zip(pages, notebooks)}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        problems = check_site(args.site.resolve(), browser, pages, searches, args.screenshot)
        browser.close()
    print("\n".join(problems) or f"{len(site_pages(args.site))} pages checked: no problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
