"""Local Sphinx extension of the course book: pages that load nothing from outside the site, and run links.

- sphinx-thebe 0.3.1 (always loaded by Jupyter Book 1) writes its inline script twice into every page, a
  console SyntaxError, and names a script on unpkg; the book has no live code, so its scripts are dropped.
- Each notebook page gets a line under its title with two links: download the notebook (the stored .ipynb that
  Sphinx copies to `_sources/`) and open it in the learner's own JupyterLab started by `make lab`
  (http://localhost:8888, the Makefile's default LAB_PORT), plus the same JupyterLab link among the header buttons.
"""

from html import escape

LAB_URL = "http://localhost:8888/lab/tree/"  # `make lab` serves the repository root on LAB_PORT=8888


def drop_thebe_scripts(app, pagename, templatename, context, doctree):
    """Remove sphinx-thebe's inline configuration and its loader script from the page."""
    def is_thebe(script) -> bool:
        body = script.attributes.get("body", "")
        return "thebe" in str(script.filename or "") or "THEBE_JS_URL" in body
    context["script_files"] = [s for s in context.get("script_files", []) if not is_thebe(s)]


def add_run_links(app, pagename, templatename, context, doctree):
    """On a notebook's page: a download link and a local-JupyterLab link under the title and in the header."""
    if context.get("page_source_suffix") != ".ipynb" or "body" not in context:
        return
    notebook = pagename + ".ipynb"
    download = f"{context['pathto']('_sources', 1)}/{notebook}"
    lab = LAB_URL + notebook
    line = (f'<p class="run-links">Run it yourself: <a class="download-notebook" href="{escape(download)}" '
            f'download>download the notebook</a>, or <a class="open-in-lab" href="{escape(lab)}">open it in your '
            f'local JupyterLab</a> (after <code>make lab</code>, which serves the course on port 8888).</p>')
    body = context["body"]
    end_of_title = body.find("</h1>")
    at = end_of_title + len("</h1>") if end_of_title >= 0 else 0
    context["body"] = body[:at] + line + body[at:]
    context.setdefault("header_buttons", []).append({
        "type": "link", "url": lab, "icon": "fas fa-rocket", "label": "open-in-lab-button",
        "tooltip": "Open in your local JupyterLab (make lab, port 8888)"})


def setup(app):
    # after sphinx-book-theme has prepared its header buttons (priority 500-501)
    app.connect("html-page-context", drop_thebe_scripts, priority=900)
    app.connect("html-page-context", add_run_links, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
