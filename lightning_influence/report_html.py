"""A self-contained HTML report of a scoring run, readable in any browser without an account.

``<folder>/report.html`` shows, per query, its top proponents and opponents (images for image
tasks, text otherwise, through :meth:`Task.render`), the training examples flagged by
self-influence, the histograms of the pairwise and self-influence scores and each layer's
share of the influence. The plots are PNG files beside the page (``pairwise_score_histogram.png``,
``self_influence_histogram.png``, ``layer_influence.png``), linked by relative paths; example
images are inlined as small PNG data URIs, so the folder can be moved or zipped as it is. The
page loads nothing from the network, and every piece of text from the data or the model is
HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_influence.io import atomic_write
from lightning_influence.plots import histogram_figure, layer_bar_figure, save_png

__all__ = ["write_html_report", "example_image", "MAX_FLAGS_SHOWN"]

MAX_FLAGS_SHOWN = 200  # flagged examples shown on the page (all of them are in the CSV)
_TEXT_CHARS = 400  # characters of a text example shown on a card (the rest in its tooltip)

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
  background:#f4f5f7;color:#1d2330;line-height:1.45}
header{background:#1f3b63;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:24px}
header p{margin:2px 0;font-size:14px;opacity:.92}
nav{margin-top:8px}
nav a{color:#cfe0ff;margin-right:16px;font-size:14px}
main{padding:8px 28px 32px;max-width:1280px}
section{background:#fff;border-radius:8px;padding:14px 20px;margin:18px 0;
  box-shadow:0 1px 3px rgba(0,0,0,.12)}
h2{margin:4px 0 10px;font-size:20px;color:#1f3b63}
h3{margin:14px 0 6px;font-size:16px}
h4{margin:8px 0 4px;font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:#555}
.query{border-top:1px solid #e3e6ea;padding-top:6px}
.query:first-of-type{border-top:none}
.qhead{display:flex;gap:14px;align-items:center}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{border:1px solid #d9dde3;border-radius:6px;padding:6px;background:#fafbfc;font-size:11px;
  width:118px}
.card.text{width:300px}
.card img{image-rendering:pixelated;width:80px;height:auto;display:block;margin:0 auto 4px;
  border:1px solid #ccc;background:#fff}
.qhead img{image-rendering:pixelated;width:96px;height:auto;border:1px solid #ccc}
.qhead pre{max-width:640px}
.card pre,.qhead pre{white-space:pre-wrap;word-break:break-word;font-size:11px;margin:0 0 4px;
  max-height:150px;overflow:auto;background:#fff;border:1px solid #eee;padding:4px}
.pos{color:#1a7f37;font-weight:600}.neg{color:#c62828;font-weight:600}
.muted{color:#666}
figure{margin:10px 0 18px}
figure img{max-width:100%;border:1px solid #e3e6ea}
figcaption{font-size:13px;color:#555}
table{border-collapse:collapse;font-size:13px}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
"""


def example_image(obj: Any, min_side: int = 64) -> np.ndarray | None:
    """A rendered example (``Task.render``: a float array in [0, 1] or uint8, ``[H, W]`` or
    ``[H, W, C]``) as uint8 ``[H', W'(, C)]``, tiny images upscaled (nearest neighbour) to at
    least ``min_side`` pixels; None for anything that is not an image."""
    if obj is None or isinstance(obj, str):
        return None
    arr = np.asarray(obj)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1:
        return None
    side = min(arr.shape[0], arr.shape[1])
    if side < min_side:
        factor = -(-min_side // side)
        arr = arr.repeat(factor, axis=0).repeat(factor, axis=1)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr


def _data_uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _label_text(label: Any) -> str | None:
    """A label worth showing (token lists and other long structures are not)."""
    if label is None:
        return None
    if isinstance(label, (list, tuple)) and len(label) > 8:
        return None
    text = str(label)
    return text if len(text) <= 40 else text[:39] + "\u2026"


def _example_html(rendered: Any, render: bool) -> tuple[str, bool]:
    """(HTML of an example's picture or text, whether it is text)."""
    if not render or rendered is None:
        return "", False
    if isinstance(rendered, str):
        shown = rendered if len(rendered) <= _TEXT_CHARS else rendered[:_TEXT_CHARS] + "\u2026"
        return f'<pre title="{_esc(rendered)}">{_esc(shown)}</pre>', True
    image = example_image(rendered)
    if image is None:
        return "", False
    return f'<img alt="example" src="{_data_uri(image)}">', False


def _num(value: Any, sign: bool = False) -> str:
    """A compact number: 3 significant digits, exponents without padding (``4.73e4``)."""
    text = f"{float(value):+.3g}" if sign else f"{float(value):.3g}"
    return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _score_html(score: float) -> str:
    cls = "pos" if score >= 0 else "neg"
    return f'<span class="{cls}">{_num(score, sign=True)}</span>'


def _card(lookup: Any, index: int, lines: list[str], render: bool) -> str:
    body, is_text = _example_html(lookup.render(index) if render else None, render)
    label = _label_text(lookup.label(index))
    info = [f"<b>#{index}</b>" + (f" &middot; label {_esc(label)}" if label is not None else "")]
    info += lines
    return (f'<div class="card{" text" if is_text else ""}">{body}'
            + "<br>".join(info) + "</div>")


def _queries_section(report: Any, render: bool) -> str:
    pairwise, queries, train = report.pairwise, report.queries, report.train
    top = pairwise.top
    parts = ['<section id="queries"><h2>Queries: their top proponents and opponents</h2>',
             '<p class="muted">Proponents (<span class="pos">+</span>) are training examples '
             "whose up-weighting lowers the query's loss (helpful); opponents "
             '(<span class="neg">&minus;</span>) raise it (harmful). Removing an example from N '
             "training examples changes the query's loss by about +score / N.</p>"]
    for q in range(top.proponent_indices.shape[0]):
        body, _ = _example_html(queries.render(q) if render else None, render)
        label = _label_text(queries.label(q))
        meta = (f"loss {float(pairwise.query_losses[q]):.4g}"
                + (f" &middot; label {_esc(label)}" if label is not None else ""))
        parts.append(f'<div class="query"><h3 id="query-{q}">Query {q}</h3>'
                     f'<div class="qhead">{body}<div>{meta}</div></div>')
        for kind, idx, val, sign in (("Proponents", top.proponent_indices, top.proponent_scores,
                                      "+"),
                                     ("Opponents", top.opponent_indices, top.opponent_scores,
                                      "&minus;")):
            cards = [_card(train, int(idx[q, r]), [f"rank {r + 1} &middot; "
                                                   f"{_score_html(float(val[q, r]))}"], render)
                     for r in range(idx.shape[1])]
            parts.append(f"<h4>{kind} ({sign})</h4><div class=\"cards\">{''.join(cards)}</div>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _flags_section(report: Any, render: bool, max_shown: int) -> str:
    from lightning_influence.ranking import flag_top_fraction

    result, train = report.self_result, report.train
    flagged = flag_top_fraction(result.scores, report.flag_fraction).tolist()
    shown = flagged[:max_shown]
    note = (f" The first {len(shown)} are shown; all {len(flagged)} are in "
            '<a href="self_influence_flags.csv">self_influence_flags.csv</a>.'
            if len(shown) < len(flagged) else
            ' Also in <a href="self_influence_flags.csv">self_influence_flags.csv</a>.')
    cards = [_card(train, int(n), [f"rank {r + 1} &middot; loss {_num(result.losses[n])}",
                                   f"self-infl. {_num(result.scores[n])}"], render)
             for r, n in enumerate(shown)]
    return ('<section id="flags"><h2>Flagged training examples</h2>'
            f'<p class="muted">The {len(flagged)} training examples ({report.flag_fraction:.0%}) '
            "with the largest self-influence, largest first: examples the model finds "
            "surprising (often mislabeled, conflicting or out of distribution)." + note + "</p>"
            f'<div class="cards">{"".join(cards)}</div></section>')


def _fact(value: Any) -> str | None:
    """A run fact for the header: a number or string, or a per-layer mapping of numbers as
    its range; None for anything else."""
    if isinstance(value, bool) or value is None:
        return None if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value and all(isinstance(v, (int, float))
                                                 for v in value.values()):
        low, high = min(value.values()), max(value.values())
        return f"{low:.3g}" if low == high else f"{low:.3g} to {high:.3g} (per layer)"
    return None


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img alt="{_esc(caption)}" src="{_esc(src)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _plots(folder: Path, report: Any) -> tuple[dict[str, Path], list[str], list[str]]:
    """Write the PNG plots; returns the paths and the HTML of the two plot sections."""
    from lightning_influence.reporting import layer_share_rows

    paths: dict[str, Path] = {}
    dist: list[str] = []
    pairwise, self_result = report.pairwise, report.self_result
    if pairwise is not None:
        if pairwise.scores is not None:
            values, what = pairwise.scores, "every query x training pair"
        else:
            values = torch.cat([pairwise.top.proponent_scores, pairwise.top.opponent_scores], 1)
            what = "the kept top-k proponents and opponents of each query"
        paths["pairwise_histogram"] = save_png(histogram_figure(
            values.double().numpy(), "Pairwise influence scores",
            "score (+ = proponent/helpful, - = opponent/harmful)"),
            folder / "pairwise_score_histogram.png")
        dist.append(_figure("pairwise_score_histogram.png",
                            f"Pairwise influence scores, {what}."))
    if self_result is not None:
        paths["self_histogram"] = save_png(histogram_figure(
            self_result.scores.double().numpy(), "Self-influence of the training examples",
            "self-influence (high = surprising to the model)"),
            folder / "self_influence_histogram.png")
        dist.append(_figure("self_influence_histogram.png",
                            "Self-influence of every training example; the flags are its "
                            "largest values."))
    layers: list[str] = []
    shares = layer_share_rows(pairwise, self_result)
    if shares:
        source = shares[0]["source"]
        paths["layer_figure"] = save_png(layer_bar_figure(
            [r["layer"] for r in shares], [r["mean_abs_share"] for r in shares],
            f"Each layer's share of the influence ({source})", "share of |score|"),
            folder / "layer_influence.png")
        layers.append(_figure("layer_influence.png",
                              f"Mean share of the absolute score per layer, from {source}; "
                              "full names in layer_influence.csv."))
    return paths, dist, layers


def write_html_report(folder: str | Path, report: Any, extra: dict[str, Any] | None = None,
                      render: bool = True, max_flags: int = MAX_FLAGS_SHOWN,
                      files: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``report.html`` and its PNG plots into ``folder`` (atomically); return the paths.

    Args:
        folder: the output folder (the CSV files the page links to are written there by
            :func:`~lightning_influence.reporting.write_results`).
        report: an :class:`~lightning_influence.reporting.InfluenceReport`.
        extra: run facts shown in the page's header (e.g. ``strategy``, ``damping``).
        render: show examples as images or text (``Task.render``); False shows indices and
            labels only.
        max_flags: how many flagged examples the page shows (all are in the CSV).
        files: names of files in ``folder`` the page links to (the CSV and JSON files).
    """
    folder = Path(folder)
    paths, dist, layers = _plots(folder, report)
    facts = []
    if report.pairwise is not None:
        facts.append(f"{report.pairwise.top.proponent_indices.shape[0]} queries")
    num_train = (report.self_result.scores.numel() if report.self_result is not None
                 else report.pairwise.num_train)
    if num_train:
        facts.append(f"{num_train:,} training examples")
    facts += [f"{_esc(k)}: {_esc(_fact(v))}" for k, v in (extra or {}).items()
              if _fact(v) is not None]
    sections = [("queries", "Queries"), ("flags", "Flagged examples"),
                ("distributions", "Score distributions"), ("layers", "Layers")]
    present = {"queries": report.pairwise is not None, "flags": report.self_result is not None,
               "distributions": bool(dist), "layers": bool(layers)}
    nav = " ".join(f'<a href="#{key}">{name}</a>' for key, name in sections if present[key])
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>Influence report</title>", f"<style>{_STYLE}</style></head><body>",
            "<header><h1>Influence report</h1>",
            f"<p>{' &middot; '.join(facts)} &middot; written {stamp}</p>",
            "<p>Sign: positive = proponent (helpful), negative = opponent (harmful).</p>",
            f"<nav>{nav}</nav></header><main>"]
    if report.pairwise is not None:
        page.append(_queries_section(report, render))
    if report.self_result is not None:
        page.append(_flags_section(report, render, max_flags))
    if dist:
        page.append('<section id="distributions"><h2>Score distributions</h2>'
                    + "".join(dist) + "</section>")
    if layers:
        page.append('<section id="layers"><h2>Layer-wise influence</h2>' + "".join(layers)
                    + "</section>")
    if files:
        page.append('<section id="files"><h2>Files</h2><p>' + " &middot; ".join(
            f'<a href="{_esc(n)}">{_esc(n)}</a>' for n in files) + "</p></section>")
    page.append("</main></body></html>")
    paths["report"] = atomic_write(folder / "report.html", lambda tmp: Path(tmp).write_text(
        "\n".join(page), encoding="utf-8", errors="backslashreplace"))
    return paths
