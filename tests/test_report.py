"""``mlm-score report``: a self-contained HTML page, escaped, with the plot and the table; rendered in
headless Chromium (Debian's ``chromium``; scripts/ci_system_deps.sh installs it) when it is there."""
from __future__ import annotations

import html
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import read_outputs

from mlm_scorer.cli import main as score_main
from mlm_scorer.report import main as report_main
from mlm_scorer.report import make_report

ROOT = Path(__file__).resolve().parents[1]
VOID = {"meta", "br", "img", "hr", "input", "link", "rect", "line", "path"}


class _Checker(HTMLParser):
    """Collects tags and checks that every element closes in order (svg children included)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Checker:
    c = _Checker()
    c.feed(page)
    c.close()
    assert not c.errors and not c.stack, (c.errors, c.stack)
    return c


def _bar_total(page: str, css: str) -> int:
    svg = re.search(rf'<svg class="{css}".*?</svg>', page, re.S).group(0)
    return sum(int(n) for n in re.findall(r": (\d+) sentence\(s\)</title></rect>", svg))


def test_report_counts_escaping_and_flags(tmp_path, fake_export):
    tsv = tmp_path / "in.tsv"
    nasty = 'Evil <script>alert("x")</script> & </td></tr> tags'
    tsv.write_text("id\ttext\n"
                   "a\tThe cat sat on the mat.\n"
                   f"b<i>\t{nasty}\n"
                   "c\tthe the the of of\n"
                   "d\ttoo\tmany\n"
                   "e\tA dog ran home.\n", encoding="utf-8")
    out = tmp_path / "o.parquet"
    assert score_main([str(tsv), "-o", str(out), "--model", str(fake_export), "--engine", "fake", "--id-column", "id",
                       "--on-bad-row", "skip", "--flag-above", "pseudo_perplexity=1", "-q"]) == 0
    _, sents = read_outputs(out)
    ok = [s for s in sents if s["status"] == "ok"]
    report = tmp_path / "r.html"
    assert report_main([str(out), "-o", str(report), "--lowest", "10"]) == 0
    page = report.read_text(encoding="utf-8")
    c = _parse(page)

    # user data is escaped everywhere: no element came from it, and the text reads back unchanged
    assert "<script" not in page.lower() and "<i>" not in page
    assert "b&lt;i&gt;" in page  # the id
    assert not [t for t, _ in c.tags if t in ("script", "i", "iframe", "img", "link")]
    # self-contained: nothing is fetched (the SVG namespace is an identifier, not a request)
    assert not re.search(r"\b(src|href)\s*=|url\(|@import", page)
    assert "Content-Security-Policy" in page

    # counts and the distribution: every scored sentence is in each histogram once
    cards = dict(re.findall(r'data-count="([^"]+)"><b>([^<]*)</b>', page))
    assert (cards["rows"], cards["scored"], cards["skipped"]) == ("5", str(len(ok)), "1")
    assert cards["flagged"] == str(sum(bool(s["flag"]) for s in sents))
    assert _bar_total(page, "hist pppl") == _bar_total(page, "hist minp") == len(ok) == 4

    # the lowest-scoring sentences: highest pseudo-perplexity first, each word a span, least likely outlined
    table = re.search(r'<table class="lowest">.*?</table>', page, re.S).group(0)
    trs = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    worst = sorted(ok, key=lambda s: -s["pseudo_perplexity"])
    assert len(trs) == len(ok) == 4 and nasty in [s["text"] for s in worst]
    for tr, s in zip(trs, worst):
        assert f'<td class="num">{s["line"]}</td>' in tr
        text_cell = re.search(r'<td class="text">(.*)</td>', tr, re.S).group(1)
        assert html.unescape(re.sub(r"<[^>]+>", "", text_cell)) == s["text"]
        assert text_cell.count('class="w') == s["n_words"] and text_cell.count('class="w least"') == 1
    # flags shown, skipped rows listed with their error, settings from the Parquet metadata
    assert 'id="flagged"' in page and "pseudo_perplexity" in page
    assert 'id="skipped"' in page and "expected 2 tab-separated fields" in page
    assert "<code>fake</code>" in page and "--flag-above pseudo_perplexity=1" in page


def test_report_errors(tmp_path, capsys):
    assert report_main([str(tmp_path / "missing.parquet"), "-o", str(tmp_path / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "x.parquet"
    bad.write_text("not parquet")
    (tmp_path / "x.sentences.parquet").write_text("not parquet")
    assert report_main([str(bad), "-o", str(tmp_path / "r.html")]) == 2
    assert "cannot read" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- chromium
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes): (width, height, rows of raw pixel bytes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, hdr
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        cur = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                cur[i] = (cur[i] + cur[i - bpp]) & 255
        elif f == 2:
            cur = bytearray((a + b) & 255 for a, b in zip(cur, prev))
        elif f == 3:
            for i in range(stride):
                cur[i] = (cur[i] + (((cur[i - bpp] if i >= bpp else 0) + prev[i]) >> 1)) & 255
        elif f == 4:
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b, cc = prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else cc)) & 255
        rows.append(bytes(cur if bpp == 3 else bytes(v for j, v in enumerate(cur) if j % 4 != 3)))
        prev = cur
    return w, h, rows


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (scripts/ci_system_deps.sh installs it)")
def test_report_renders_in_headless_chromium(tmp_path, tiny_export):
    from mlm_scorer.pipeline import score_file
    from mlm_scorer.quality import parse_rule

    out = tmp_path / "probs.parquet"
    # the sample data, scored with the tiny model; flag the worst few so the flag column shows
    score_file(ROOT / "data" / "sample.tsv", out, model=tiny_export, id_column="id")
    _, sents = read_outputs(out)
    ppl = sorted(s["pseudo_perplexity"] for s in sents if s["status"] == "ok")
    score_file(ROOT / "data" / "sample.tsv", out, model=tiny_export, id_column="id",
               flag_rules=[parse_rule(f"pseudo_perplexity={ppl[-4]!r}", "above")])
    _, sents = read_outputs(out)
    report = tmp_path / "report.html"
    info = make_report(out, report, lowest=10)
    assert info["flagged"] == 3 and info["shown"] == 10

    chrome = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1200,1600"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([chrome, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120,
                         env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    d = dom.stdout
    # what the browser built from the page: both plots with bars, the table with its rows, the worst sentence
    assert re.search(r'<svg class="hist pppl"[^>]*>.*<rect class="bar"', d, re.S)
    assert re.search(r'<svg class="hist minp"[^>]*>.*<rect class="bar"', d, re.S)
    table = re.search(r'<table class="lowest">.*?</table>', d, re.S)
    assert table and len(re.findall(r"<tr>", table.group(0))) == 1 + 10
    worst = max((s for s in sents if s["status"] == "ok"), key=lambda s: s["pseudo_perplexity"])
    first_row = re.findall(r"<tr>(.*?)</tr>", table.group(0), re.S)[1]
    assert html.unescape(re.sub(r"<[^>]+>", "", re.search(r'<td class="text">(.*?)</td>', first_row, re.S).group(1))) \
        == worst["text"]
    assert 'id="flagged"' in d

    shot = tmp_path / "report.png"
    r = subprocess.run([chrome, *flags, f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    if os.environ.get("MLM_REPORT_SCREENSHOT"):  # keep it for a human to look at
        shutil.copyfile(shot, os.environ["MLM_REPORT_SCREENSHOT"])
    assert shot.stat().st_size > 20_000
    w, h, rows = _png_pixels(shot)
    assert (w, h) == (1200, 1600)
    px = [row[i:i + 3] for row in rows[::4] for i in range(0, len(row), 12)]  # a 1/16 sample of the pixels
    non_white = sum(p != b"\xff\xff\xff" for p in px)
    blue = sum(p[2] > 200 and p[0] < 80 and p[1] < 140 for p in px)  # the histogram bars (#2563eb)
    red = sum(p[0] > 200 and p[1] < 170 and p[2] < 170 for p in px)  # highlighted words
    assert non_white > 0.05 * len(px), (non_white, len(px))
    assert blue > 200 and red > 20, (blue, red)


def _chrome_run(tmp_path: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1200,1600"]
    return subprocess.run([_chromium(), *flags, *extra, page.as_uri()], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (scripts/ci_system_deps.sh installs it)")
def test_report_compares_with_a_baseline_in_headless_chromium(tmp_path, antibody_batches):
    """Real weights: the current antibody batch (3 of 12 domains corrupted) against the natural baseline:
    both distributions on one plot, the shift statistics, the rows newly flagged; DOM and pixels."""
    import math

    ab = antibody_batches
    _, base = read_outputs(ab.baseline)
    _, cur = read_outputs(ab.current)
    b_ppl = [s["pseudo_perplexity"] for s in base]
    b_minp = [math.exp(s["min_word_log_prob"]) for s in base]
    # newly flagged, by definition: beyond the baseline's p99 pseudo-perplexity or p1 min word probability
    # (nearest rank over 20 rows: its maximum and its minimum)
    newly = sorted((s for s in cur if s["pseudo_perplexity"] > max(b_ppl)
                    or math.exp(s["min_word_log_prob"]) < min(b_minp)), key=lambda s: -s["pseudo_perplexity"])
    assert ab.corrupted <= {s["id"] for s in newly}

    report = tmp_path / "report.html"
    assert report_main([str(ab.current), "-o", str(report), "--baseline", str(ab.baseline), "--lowest", "5"]) == 0
    page = report.read_text(encoding="utf-8")
    c = _parse(page)
    assert not [t for t, _ in c.tags if t in ("script", "iframe", "img", "link")]
    assert not re.search(r"\b(src|href)\s*=|url\(|@import", page)  # still self-contained

    cards = {html.unescape(k): v for k, v in re.findall(r'data-count="([^"]+)"><b>([^<]*)</b>', page)}
    assert cards["beyond the baseline's tails"] == f"{len(newly)} ({100 * len(newly) / 12:.1f} %)"
    # the statistics table: one row per metric, KS D as defined
    shift = re.search(r'<table class="shift">.*?</table>', page, re.S).group(0)
    row = re.search(r'<tr data-metric="pseudo_perplexity">(.*?)</tr>', shift, re.S).group(1)
    cells = [html.unescape(re.sub(r"<[^>]+>", "", x)) for x in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    c_ppl = [s["pseudo_perplexity"] for s in cur]
    d = max(abs(sum(x <= t for x in c_ppl) / 12 - sum(x <= t for x in b_ppl) / 20) for t in c_ppl + b_ppl)
    assert cells[1] == f"{d:.3f}" and cells[4] == f"> p99 = {max(b_ppl):.4g}" and cells[5] == "3 (25.0 %)"
    assert 'data-metric="min_word_prob"' in shift
    # both distributions on one plot: every row of each batch counted once, as a share of its batch
    for css in ("cmp pppl", "cmp minp"):
        svg = re.search(rf'<svg class="{css}".*?</svg>', page, re.S).group(0)
        counts = re.findall(r"current (\d+) of 12 \([\d.]+ %\), baseline (\d+) of 20", svg)
        assert sum(int(a) for a, _ in counts) == 12 and sum(int(b) for _, b in counts) == 20
        assert '<polyline class="base"' in svg and '<line class="thr"' in svg
    # the rows newly flagged: those beyond the tails, least likely first, each with its reason
    table = re.search(r'<table class="newly">.*?</table>', page, re.S).group(0)
    trs = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    assert len(trs) == min(5, len(newly))
    for tr, s in zip(trs, newly):
        assert f"<td>{s['id']}</td>" in tr
        text_cell = re.search(r'<td class="text">(.*)</td>', tr, re.S).group(1)
        assert html.unescape(re.sub(r"<[^>]+>", "", text_cell)) == s["text"]
    assert "(p99 of the baseline)" in trs[0]

    # in the browser: the DOM it built, then the pixels
    dom = _chrome_run(tmp_path, report, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    d = dom.stdout
    assert re.search(r'<section id="baseline">.*<svg class="cmp pppl"[^>]*>.*<rect class="bar cur".*'
                     r'<polyline class="base"', d, re.S)
    assert re.search(r'<svg class="cmp minp"[^>]*>.*<polyline class="base"', d, re.S)
    assert len(re.findall(r"<tr>", re.search(r'<table class="newly">.*?</table>', d, re.S).group(0))) == \
        1 + min(5, len(newly))
    shot = tmp_path / "report.png"
    r = _chrome_run(tmp_path, report, f"--screenshot={shot}")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    if os.environ.get("MLM_REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MLM_REPORT_SCREENSHOT"].replace(".png", "-baseline.png"))
    w, h, rows = _png_pixels(shot)
    assert (w, h) == (1200, 1600)
    px = [row[i:i + 3] for row in rows[::4] for i in range(0, len(row), 12)]  # a 1/16 sample
    orange = sum(p[0] > 200 and 60 < p[1] < 150 and p[2] < 90 for p in px)  # the baseline outline (#ea580c)
    blue = sum(p[2] > 200 and p[0] < 150 and p[1] < 190 for p in px)  # the current batch's bars (#2563eb, 60 %)
    red = sum(p[0] > 200 and p[1] < 170 and p[2] < 170 and not (60 < p[1] < 150 and p[2] < 90) for p in px)
    assert orange > 40 and blue > 100 and red > 20, (orange, blue, red)
