"""Pictures readable without W&B: the plots stay readable at any number of layers and any name
length, and the HTML report opens in a real headless browser with its tables and plots."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from readable import assert_readable_png, plot_area
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.language.reporting import _layer_figure
from lightning_influence.plots import (
    MAX_LABEL_CHARS,
    layer_bar_figure,
    save_png,
    short_labels,
)
from lightning_influence.reporting import ExampleLookup, InfluenceReport, write_results

LORA = [f"model.base_model.model.model.layers.{i}.{part}.lora_{ab}.default"
        for i in range(2) for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                       "mlp.down_proj") for ab in "AB"]


def long_names(count: int) -> list[str]:
    """``count`` distinct module names of about 120 characters, alike but for a middle part."""
    return [f"backbone.encoder.stages.{i // 10}.blocks.{i % 10}.attention_with_a_very_long_name"
            f".inner_projection_number_{i}.lora_adapter_matrix_A.default_weight_parameter"
            for i in range(count)]


def test_short_labels_keep_what_tells_layers_apart():
    labels = short_labels(LORA)
    assert labels[0] == "layers.0.self_attn.q_proj.lora_A"
    assert labels[-1] == "layers.1.mlp.down_proj.lora_B"
    assert len(set(labels)) == len(LORA)
    names = long_names(60)
    labels = short_labels(names)
    assert len(set(labels)) == 60 and all(len(s) <= MAX_LABEL_CHARS for s in labels)
    assert all("\u2026" in s for s in labels)  # shortened in the middle...
    assert labels[7].endswith("number_7")  # ...keeping the distinguishing tail
    assert short_labels(["net.0"]) == ["net.0"]
    assert short_labels(["a.b.c.d"]) == ["c.d"]
    # names that only differ where the middle is cut still get distinct labels
    same_ends = [f"x.{'m' * 30}{i}{'n' * 30}.y" for i in range(3)] + ["z"]
    assert len(set(short_labels(same_ends))) == 4


def _check_figure_fits(fig, count: int) -> None:
    """Every tick label, the title and the axis label lie inside the figure, the labels do not
    overlap, and each layer's row is at least 15 pixels tall."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    ax = fig.axes[0]
    area = ax.get_window_extent(renderer)
    assert area.height >= 15 * count and area.width >= 250, area
    texts = [*ax.get_yticklabels(), ax.title, ax.xaxis.label]
    assert len(ax.get_yticklabels()) == count
    for text in texts:
        ext = text.get_window_extent(renderer)
        assert ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1, (text.get_text(), ext, box)
        assert ext.y0 >= box.y0 - 1 and ext.y1 <= box.y1 + 1, (text.get_text(), ext, box)
    spans = sorted((t.get_window_extent(renderer).y0, t.get_window_extent(renderer).y1)
                   for t in ax.get_yticklabels())
    assert all(a[1] <= b[0] + 0.5 for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize("count", [3, 28, 60])
def test_layer_bars_stay_readable_at_any_count_and_name_length(tmp_path, count):
    names = long_names(count) if count != 28 else LORA
    values = np.random.default_rng(0).random(count)
    fig = layer_bar_figure(names, values, "Each layer's share of the influence (all pairwise "
                           "scores, a title long enough to need wrapping in a narrow figure)",
                           "share of |score|")
    _check_figure_fits(fig, count)
    path = save_png(fig, tmp_path / "layers.png")
    assert_readable_png(path)
    width, height = plot_area(path)  # read back from the PNG: the axes frame's extent
    assert height >= 15 * count and width >= 250, (width, height)


def test_document_layer_figure_is_readable_with_many_queries_and_lora_names(tmp_path):
    # the fine-tuning recipe's figure: 28 LoRA matrices, one bar per query
    result = SimpleNamespace(layer_names=LORA, queries=[None] * 4,
                             layer_shares=torch.rand(4, len(LORA), dtype=torch.float64))
    path = _layer_figure(result, tmp_path / "layer_influence.png")
    assert_readable_png(path)
    width, height = plot_area(path)
    assert height >= 15 * len(LORA) and width >= 250, (width, height)
    result.layer_names = long_names(60)
    result.layer_shares = torch.rand(4, 60, dtype=torch.float64)
    width, height = plot_area(_layer_figure(result, tmp_path / "many.png"))
    assert height >= 15 * 60 and width >= 250, (width, height)


# ------------------------------------------------------------------------------ the HTML page
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(x)))


class TextTask(li.ClassificationTask):
    """Examples shown as text that needs escaping."""

    def render(self, batch, index):
        return f"<script>alert({index})</script> & <b>example</b>"


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    x = torch.rand(120, 16)
    train = TensorDataset(x, x[:, :3].argmax(1))
    queries = TensorDataset(x[:4], torch.tensor([0, 1, 2, 0]))
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), train.tensors[1]).backward()
        opt.step()
    task = li.ClassificationTask(image_shape=(4, 4))
    train_loader, query_loader = DataLoader(train, batch_size=32), DataLoader(queries, 32)
    factors = li.fit_factors(model, train_loader, task, strategy="ekfac", progress=False)
    pairwise = li.compute_pairwise_scores(model, factors, query_loader, train_loader, task,
                                          top_k=5, self_influence=True, progress=False)
    return SimpleNamespace(pairwise=pairwise, task=task, train=train_loader,
                           queries=query_loader)


def _report(scored, task) -> InfluenceReport:
    return InfluenceReport(scored.pairwise, scored.pairwise.self_result,
                           ExampleLookup(scored.queries, task), ExampleLookup(scored.train, task),
                           flag_fraction=0.1)


def test_html_report_is_self_contained_and_escaped(tmp_path, scored):
    paths = write_results(tmp_path, _report(scored, scored.task),
                          extra={"strategy": "ekfac", "note": "<i>not markup</i>"})
    page = paths["report"].read_text(encoding="utf-8")
    for section in ("queries", "flags", "distributions", "layers", "files"):
        assert f'<section id="{section}">' in page, section
    for name in ("pairwise_score_histogram.png", "self_influence_histogram.png",
                 "layer_influence.png"):
        assert f'src="{name}"' in page and (tmp_path / name).is_file(), name
        assert_readable_png(tmp_path / name)
    # every example is an inline image: 4 queries x (1 + 5 proponents + 5 opponents) + 12 flags
    assert page.count('src="data:image/png;base64,') == 4 * 11 + 12
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "&lt;i&gt;not markup&lt;/i&gt;" in page and "<i>not markup" not in page
    assert 'href="top_influential.csv"' in page

    text = write_results(tmp_path / "text", _report(scored, TextTask()))["report"].read_text()
    assert "<script" not in text and "<b>example" not in text
    assert "&lt;script&gt;alert(0)&lt;/script&gt; &amp; &lt;b&gt;example&lt;/b&gt;" in text


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
                 "chrome", "chromium-headless-shell", "headless_shell"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=120)


PROBE = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.setAttribute("data-probe", JSON.stringify({
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    plots: images.filter(i => !i.src.startsWith("data:")).map(
      i => [i.getAttribute("src"), i.naturalWidth, i.naturalHeight]),
    headings: [...document.querySelectorAll("h2")].map(h => h.textContent)}));
});</script>"""


def test_html_report_opens_in_a_headless_browser(tmp_path, scored):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (apt-get install chromium): the HTML "
                    "report's browser check needs one")
    paths = write_results(tmp_path, _report(scored, scored.task), extra={"strategy": "ekfac"})
    # a copy with a probe script, in the same folder (the page itself runs no script): after
    # the page has loaded it records which images decoded and which headings are there
    probe = tmp_path / "probe.html"
    probe.write_text(paths["report"].read_text().replace("</body>", PROBE + "</body>"))
    dom = _headless(browser, tmp_path / "profile", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    start = dom.stdout.index('data-probe="') + len('data-probe="')
    state = json.loads(html.unescape(dom.stdout[start:dom.stdout.index('"', start)]))
    assert state["images"] == 4 * 11 + 12 + 3
    assert state["loaded"] == state["images"], state
    assert sorted(p[0] for p in state["plots"]) == [
        "layer_influence.png", "pairwise_score_histogram.png", "self_influence_histogram.png"]
    assert all(w >= 250 and h >= 200 for _, w, h in state["plots"]), state["plots"]
    assert state["headings"][:2] == ["Queries: their top proponents and opponents",
                                     "Flagged training examples"]
    assert {"Score distributions", "Layer-wise influence"} <= set(state["headings"])

    shot = tmp_path / "screenshot.png"
    run = _headless(browser, tmp_path / "profile", f"--screenshot={shot}",
                    "--window-size=1280,2400", paths["report"].as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 30  # not a blank page
    assert np.abs(pixels[8, 8] - [31, 59, 99]).max() < 12  # the header band is drawn
    # the example thumbnails are drawn: many small dark-and-light tiles below the header
    body = pixels[300:, :, :].mean(-1)
    assert (body < 60).mean() > 0.01 and (body > 240).mean() > 0.3
