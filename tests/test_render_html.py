"""``--format html``: one self-contained page, every user string escaped, and every field it promises.

The browser test (tests/test_html_browser.py) loads these pages in headless Chromium.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from bncheck.cli import EXIT_ERROR, EXIT_FAIL, main
from bncheck.diagnosis import diagnose
from bncheck.recalibration import EvalComparison
from bncheck.render import OutputFormat, RenderOptions, renderer_for
from bncheck.report import Finding, ModeMetrics, Severity

from conftest import inject_drift
from test_render_golden import failing_report, forward_ordered_report, inspection, layer, recalibration

HTML = renderer_for(OutputFormat.HTML)(RenderOptions())

# Attributes through which a page can make the browser fetch something, and tags that fetch or run code.
URL_ATTRIBUTES = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background",
                  "ping", "cite", "longdesc", "manifest", "codebase", "archive", "lowsrc", "dynsrc"}
FETCHING_TAGS = {"script", "link", "img", "iframe", "frame", "object", "embed", "video", "audio", "source",
                 "track", "base", "image", "use", "feimage", "form", "input"}


class Page(HTMLParser):
    """Every tag with its attributes, the stylesheet text, and the visible text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.styles: list[str] = []
        self.text: list[str] = []
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = {k: (v or "") for k, v in attrs}
        self.tags.append((tag, attributes))
        if "style" in attributes:
            self.styles.append(attributes["style"])
        self._in_style = tag == "style"

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        self._in_style = False

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        (self.styles if self._in_style else self.text).append(data)

    def find(self, tag: str, **attributes) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attributes.items())]

    @property
    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())


def external_references(text: str) -> list[str]:
    """Whatever in the page could make a browser fetch: an empty list for a self-contained page."""
    page = Page(text)
    found = [f"<{tag}>" for tag, _ in page.tags if tag in FETCHING_TAGS]
    for tag, attributes in page.tags:
        for name, value in attributes.items():
            if name in URL_ATTRIBUTES and not value.startswith("#"):
                found.append(f"<{tag} {name}={value!r}>")
        if tag == "meta" and attributes.get("http-equiv", "").lower() == "refresh":
            found.append("<meta refresh>")
    for style in page.styles:
        found += [f"style {m}" for m in re.findall(r"url\(|@import|image-set\(", style, flags=re.IGNORECASE)]
    return found


def many_layers(count: int = 300):
    layers = tuple(layer(f"features.denseblock{i // 100 + 1}.denselayer{i % 100 + 1}.norm{i % 2 + 1}",
                         0.02 + 0.01 * i, 0.1, 1.1, order=i) for i in range(count))
    return dataclasses.replace(failing_report(), layers=layers)


@pytest.mark.parametrize("render", [
    lambda: HTML.diagnosis(failing_report()), lambda: HTML.diagnosis(forward_ordered_report()),
    lambda: HTML.diagnosis(many_layers()), lambda: HTML.inspection(inspection()),
    lambda: HTML.recalibration(recalibration()),
], ids=["diagnosis", "forward-order", "300-layers", "inspection", "recalibration"])
def test_page_is_self_contained(render):
    text = render()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert external_references(text) == []
    page = Page(text)
    assert len(page.find("style")) == 1 and page.styles  # styles inline
    assert page.find("meta", **{"http-equiv": "Content-Security-Policy"})[0]["content"].startswith("default-src 'none'")


@pytest.mark.parametrize("count", [4, 53, 300])
def test_every_layer_is_named_in_the_chart_and_the_table(count):
    text = HTML.diagnosis(many_layers(count))
    names = [f"features.denseblock{i // 100 + 1}.denselayer{i % 100 + 1}.norm{i % 2 + 1}" for i in range(count)]
    chart = text[text.index('<svg class="chart"'):text.index("</svg>")]
    tooltips = re.findall(r"<title>#(\d+) (\S+) \(", chart)
    assert tooltips == [(str(i + 1), name) for i, name in enumerate(names)]  # forward order, full names
    assert _row_names(text) == names
    under_axis = re.findall(r'text-anchor="end" transform="rotate\(-\d+ [^)]*\)">([^<]*)</text>', chart)
    assert len(under_axis) == (count if count <= 72 else 0)  # beyond 72 layers: index ticks, names on hover


def test_the_reference_check_finds_every_kind_of_fetch():
    page = HTML.diagnosis(failing_report())
    for injected in ('<img src="x.png">', '<a href="https://example.com/">x</a>',
                     '<link rel="stylesheet" href="s.css">',
                     '<div style="background: url(x.png)">x</div>', "<style>@import 'x.css';</style>",
                     '<svg><image href="x.png"/></svg>', '<script src="x.js"></script>'):
        assert external_references(page.replace("</main>", injected + "</main>")), injected


def test_user_strings_are_escaped():
    hostile = '<img src=x onerror="alert(1)">&amp;'
    report = failing_report()
    finding = Finding("stats-mismatch", Severity.ERROR, (hostile,), {"note": hostile}, f"message {hostile}",
                      f"fix {hostile} then `run <this>`")
    report = dataclasses.replace(report, layers=(layer(hostile, 0.9, 1.0, 2.0),) + report.layers[1:],
                                 findings=(finding,), notes=(hostile,))
    for text in (HTML.diagnosis(report), HTML.inspection(dataclasses.replace(inspection(), notes=(hostile,))),
                 HTML.recalibration(dataclasses.replace(recalibration(), output_path=hostile,
                                                        updated_layers=(hostile,)))):
        page = Page(text)
        assert not page.find("img") and external_references(text) == []
        assert hostile in page.visible.replace("\u200b", "")
    assert "<code>run &lt;this&gt;</code>" in HTML.diagnosis(report)


def test_backticked_code_in_a_fix_becomes_a_code_element():
    report = failing_report()
    fix = "Recompute them: `bncheck recalibrate MODEL -o fixed.pt`, or train longer."
    finding = dataclasses.replace(report.findings[0], fix=fix)
    text = HTML.diagnosis(dataclasses.replace(report, findings=(finding,)))
    assert "Recompute them: <code>bncheck recalibrate MODEL -o fixed.pt</code>, or train longer." in text


def _row_names(text: str) -> list[str]:
    cells = re.findall(r'<tr id="layer-\d+"[^>]*><td class="num">\d+</td><td class="name"><span class="name">(.*?)'
                       r"</span>", text)
    return [c.replace("<wbr>", "") for c in cells]


def test_layers_follow_the_forward_order():
    text = HTML.diagnosis(forward_ordered_report())
    assert _row_names(text) == ["stem.bn", "layer1.bn1", "layer2.bn1", "head.bn"]
    assert "not known" not in text
    assert "drift over 0.5 from #1 stem.bn" in text  # where drift starts, in depth order


def test_without_an_order_the_report_order_is_kept_and_said():
    report = failing_report()
    text = HTML.diagnosis(report)
    assert _row_names(text) == [l.name for l in report.layers]
    assert "forward order of the layers is not known" in text
    assert "in report order" in text and "drift over" not in text


def test_layers_never_called_come_last():
    report = forward_ordered_report()
    layers = tuple(dataclasses.replace(l, order=None) if l.name == "stem.bn" else l for l in report.layers)
    text = HTML.diagnosis(dataclasses.replace(report, layers=layers))
    assert _row_names(text) == ["layer1.bn1", "layer2.bn1", "head.bn", "stem.bn"]
    assert "1 norm layer never ran in the forward pass: listed last." in text


def test_non_finite_and_missing_drift_are_drawn_and_marked():
    report = forward_ordered_report()
    drifts = {"stem.bn": math.nan, "layer1.bn1": math.inf, "layer2.bn1": None, "head.bn": 0.05}
    layers = tuple(dataclasses.replace(l, drift=drifts[l.name], drift_max=drifts[l.name],
                                       running_stats_corrupt=l.name == "stem.bn") for l in report.layers)
    text = HTML.diagnosis(dataclasses.replace(report, layers=layers))
    page = Page(text)
    chart = text[text.index('<svg class="chart"'):text.index("</svg>")]
    assert 'class="nan"' in chart and 'class="cap"' in chart and 'class="none"' in chart
    assert "not a number" in page.visible and "no drift measured" in page.visible
    assert "corrupt stats" in page.visible
    assert "drift over 0.5 from #1 stem.bn" in text  # NaN counts as over the threshold


def test_running_statistics_in_training_are_marked():
    text = HTML.diagnosis(forward_ordered_report())
    row = text[text.index('<tr id="layer-3"'):]
    row = row[:row.index("</tr>")]
    assert "running stats in training" in row and "hollow" in row
    assert text.count("running stats in training") == 1
    plain = HTML.diagnosis(failing_report())
    assert "running stats in training" not in plain and "hollow" not in plain.split("</style>")[1]


def test_gap_interval_is_shown_only_when_present():
    assert "95% interval +60.0 pts to +72.0 pts" in Page(HTML.diagnosis(forward_ordered_report())).visible
    assert "95% interval 50000.0% to 90000.0%" in Page(HTML.diagnosis(forward_ordered_report())).visible
    report = failing_report()
    without = dataclasses.replace(report, gap=dataclasses.replace(report.gap, accuracy_ci=None),
                                  gate=dataclasses.replace(report.gate, interval=None))
    assert "95% interval" not in HTML.diagnosis(without)


def test_data_summary_says_when_stopped_early_and_sharded():
    report = failing_report()
    plain = Page(HTML.diagnosis(report)).visible
    assert "stopped early" not in plain and "processes" not in plain
    data = dataclasses.replace(report.data, stopped_early=True, num_samples_available=50, world_size=4)
    visible = Page(HTML.diagnosis(dataclasses.replace(report, data=data))).visible
    assert "the verdict was settled after 3 of 50 samples" in visible
    assert "processes 4" in visible


def test_recalibration_shows_before_and_after_per_data_set():
    result = recalibration()
    val = EvalComparison("val-data", ModeMetrics(2.5, 0.4), ModeMetrics(0.3, 0.9))
    visible = Page(HTML.recalibration(dataclasses.replace(result, evaluations=result.evaluations + (val,)))).visible
    assert "data 10.75 0.016 33.3% 100.0%" in visible
    assert "val-data 2.5 0.3 40.0% 90.0%" in visible
    assert "before 40.0%" in visible and "after 90.0%" in visible  # the chart's labels
    assert "Kept as they were (1)" in visible and "frozen.bn" in visible


def test_real_diagnosis_marks_the_injected_layer(healthy_convnet, images):
    x, y = images
    inject_drift(healthy_convnet.bn2, shift=3.0)
    report = diagnose(healthy_convnet, (x, y), batch_size=32)
    text = HTML.diagnosis(report)
    assert external_references(text) == []
    bars = dict(re.findall(r"<title>#\d+ (\S+) \(BatchNorm2d\): drift [^<]*</title>"
                           r'<rect class="hit"[^>]*/><rect class="(\w+)', text))
    assert bars == {"bn1": "ok", "bn2": "high", "bn3": "ok"}
    assert "stats-mismatch" in text or "stats-not-converged" in text or "stats-never-updated" in text


@pytest.fixture
def shift_model(tmp_path, healthy_convnet, images):
    import torch

    x, y = images
    inject_drift(healthy_convnet.bn2)
    torch.save({"model": healthy_convnet, "x": x, "y": y}, tmp_path / "bundle.pt")
    source = tmp_path / "model.py"
    source.write_text("import torch\n"
                      f"_b = torch.load({str(tmp_path / 'bundle.pt')!r}, weights_only=False)\n"
                      "def build_model():\n    return _b['model']\n"
                      "def get_dataloader():\n    return list(zip(_b['x'].split(32), _b['y'].split(32)))\n")
    return source


def test_cli_writes_html_for_diagnose_and_inspect(tmp_path, shift_model):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["diagnose", str(shift_model), "--format", "html", "-o", str(out)])
    assert result.exit_code == EXIT_FAIL, result.output
    assert result.stdout == "" and external_references(out.read_text()) == []
    assert "<h1>FAIL</h1>" in out.read_text()
    result = CliRunner().invoke(main, ["inspect", str(shift_model), "--format", "html"])
    assert result.stdout.startswith("<!DOCTYPE html>") and "bncheck inspect" in result.stdout


@pytest.mark.parametrize("fmt", [f.value for f in OutputFormat])
def test_recalibrate_writes_its_report_to_a_file_in_every_format(tmp_path, shift_model, fmt):
    report = tmp_path / f"recalibrated.{fmt}"
    result = CliRunner().invoke(main, ["recalibrate", str(shift_model), "-o", str(tmp_path / "fixed.pt"),
                                       "--format", fmt, "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    text = report.read_text(encoding="utf-8")
    assert "fixed.pt" in text
    if fmt == "json":
        assert json.loads(text)["kind"] == "recalibration"
    if fmt == "html":
        assert external_references(text) == [] and "Eval mode before and after" in text


@pytest.mark.parametrize("target", ["checkpoint", "model"])
def test_recalibrate_report_may_not_overwrite_the_checkpoint_or_an_input(tmp_path, shift_model, target):
    fixed = tmp_path / "fixed.pt"
    source = shift_model.read_text()
    report = fixed if target == "checkpoint" else shift_model
    result = CliRunner().invoke(main, ["recalibrate", f"{shift_model}:build_model", "-o", str(fixed),
                                       "--report", str(report)])
    assert result.exit_code == EXIT_ERROR
    assert "--report" in result.stderr and "never writes over its inputs; choose another --report" in result.stderr
    assert not fixed.exists() and shift_model.read_text() == source
