"""The HTML report as a reader sees it: opened in headless Chromium, every table has one row per record
and as many cells per row as headers, and every image loads.

Needs the Debian package ``chromium-headless-shell`` (``.ci/run`` installs it when missing); where it
cannot be found the test is skipped with that reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report_federation import _federated_store

from defenda.harness.report import write_report

BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")

#: appended to a copy of index.html: after the page has loaded, what the reader got, as JSON in the DOM
PROBE = """<script>
window.addEventListener("load", () => {
  const tables = [...document.querySelectorAll("table")].map(t => ({
    headers: t.querySelectorAll("thead th").length,
    rows: [...t.querySelectorAll("tbody tr")].map(r => r.querySelectorAll("td").length)}));
  const images = [...document.images].map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0}));
  const pre = document.createElement("pre"); pre.id = "probe";
  pre.textContent = JSON.stringify({tables, images}); document.body.appendChild(pre);
});
</script>"""


def _probe(index_html: Path) -> dict:
    page = index_html.with_name("probe.html")
    page.write_text(index_html.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run([BROWSER, "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the page did not finish loading in the browser: {dom[-500:]}"
    import html

    return json.loads(html.unescape(found.group(1)))


def _markdown_tables(index_md: Path) -> list[int]:
    """Records per table of index.md (lines of a table minus its header and separator)."""
    counts, run = [], 0
    for line in [*index_md.read_text(encoding="utf-8").splitlines(), ""]:
        if line.startswith("|"):
            run += 1
        elif run:
            counts.append(run - 2)
            run = 0
    return counts


@pytest.mark.skipif(BROWSER is None, reason="chromium-headless-shell is not installed (apt-get install -y "
                                            "chromium-headless-shell; .ci/run does this)")
def test_the_report_renders_in_a_browser(tmp_path: Path) -> None:
    _federated_store(tmp_path)
    index = write_report(tmp_path)
    seen = _probe(index.with_name("index.html"))
    expected = _markdown_tables(index)
    assert len(seen["tables"]) == len(expected) >= 3
    for table, records in zip(seen["tables"], expected):
        assert len(table["rows"]) == records  # one row per record
        assert all(cells == table["headers"] for cells in table["rows"])  # as many cells as headers
    assert len(seen["images"]) >= 4 and all(i["ok"] for i in seen["images"]), seen["images"]
    # issue 14's tables (success rates, bounds beside ε) and the bounds figure are among those checked
    text = index.read_text(encoding="utf-8")
    assert "### Success rates" in text and "### Reconstruction bounds beside ε" in text
    assert len(seen["tables"]) >= 6 and "bounds digits" in {i["alt"] for i in seen["images"]}
