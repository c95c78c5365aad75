"""Static HTML report of a folder run: thumbnails with detection boxes and labels, per-image rewards with
filtering and sorting, and PNG plots (matplotlib) of each reward's distribution and per-class accuracy."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

THUMBNAIL = 256


def _thumbnail(row: dict[str, Any], target: Path) -> bool:
    """Draw the kept detections on a thumbnail; False when the image itself cannot be read."""
    try:
        with Image.open(row["file"]) as source:
            image = source.convert("RGB")
    except Exception:
        return False
    scale = THUMBNAIL / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(image)
    for details in (row.get("details") or {}).values():
        for detection in details.get("detections", []) if isinstance(details, dict) else []:
            x0, y0, x1, y1 = (value * scale for value in detection["box"])
            draw.rectangle((x0, y0, x1, y1), outline=(255, 64, 64), width=2)
            draw.text((x0 + 2, y0 + 1), f"{detection['class']} {detection['score']:.2f}", fill=(255, 255, 0))
        break  # one reward's boxes are enough; the matching family shares the detector
    image.save(target, format="JPEG", quality=85)
    return True


def _plots(rows: list[dict[str, Any]], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for row in rows for name in (row.get("rewards") or {})})
    written = []
    for name in names:
        values = [row["rewards"][name] for row in rows if (row.get("rewards") or {}).get(name) is not None]
        figure, axis = plt.subplots(figsize=(5, 3))
        axis.hist(values, bins=20, color="#3b7dd8")
        axis.set_title(f"{name} (n={len(values)})")
        axis.set_xlabel(name)
        axis.set_ylabel("images")
        figure.tight_layout()
        figure.savefig(directory / f"dist_{name}.png", dpi=100)
        plt.close(figure)
        written.append(f"dist_{name}.png")
    # Per-class accuracy: how often a requested class was detected exactly as often as requested.
    hits: dict[str, list[bool]] = {}
    for row in rows:
        for details in (row.get("details") or {}).values():
            for spec in details.get("objects", []) if isinstance(details, dict) else []:
                hits.setdefault(spec["class"], []).append(spec["detected"] == spec["requested"])
            break
    if hits:
        classes = sorted(hits)
        figure, axis = plt.subplots(figsize=(max(5, len(classes) * 0.4), 3))
        axis.bar(classes, [sum(hits[c]) / len(hits[c]) for c in classes], color="#d8823b")
        axis.set_ylim(0, 1)
        axis.set_ylabel("exact-count accuracy")
        axis.tick_params(axis="x", rotation=60)
        figure.tight_layout()
        figure.savefig(directory / "per_class_accuracy.png", dpi=100)
        plt.close(figure)
        written.append("per_class_accuracy.png")
    return written


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>rewardscope report</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }} th {{ cursor: pointer; background: #eee; }}
img.thumb {{ max-width: {thumb}px; }} .error {{ color: #b00; }} .plots img {{ margin: 4px; border: 1px solid #ddd; }}
</style></head><body>
<h1>rewardscope report</h1>
<p>{count} images; rewards: {names}. Models: {versions}</p>
<div class="plots">{plots}</div>
<p><input id="filter" placeholder="filter by prompt, file or error" size="50"></p>
<table id="rows"><thead><tr><th>image</th><th>file</th><th>prompt</th>{headers}<th>error</th></tr></thead>
<tbody>{body}</tbody></table>
<script>
const table = document.getElementById("rows");
document.getElementById("filter").addEventListener("input", (event) => {{
  const needle = event.target.value.toLowerCase();
  for (const row of table.tBodies[0].rows) row.hidden = !row.textContent.toLowerCase().includes(needle);
}});
table.tHead.addEventListener("click", (event) => {{
  const column = event.target.cellIndex, rows = [...table.tBodies[0].rows];
  const ascending = table.dataset.sorted !== String(column);
  const value = (row) => row.cells[column].dataset.value ?? row.cells[column].textContent;
  rows.sort((a, b) => {{
    const x = value(a), y = value(b), nx = parseFloat(x), ny = parseFloat(y);
    const order = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
    return ascending ? order : -order;
  }});
  table.dataset.sorted = ascending ? String(column) : "";
  rows.forEach((row) => table.tBodies[0].appendChild(row));
}});
</script></body></html>
"""


def write_report(rows: list[dict[str, Any]], directory: Path, versions: dict[str, str] | None = None) -> Path:
    """Write index.html, thumbs/ and the PNG plots into directory; returns the page's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "thumbs").mkdir(exist_ok=True)
    names = sorted({name for row in rows for name in (row.get("rewards") or {})})
    body = []
    for index, row in enumerate(rows):
        thumb = f"thumbs/{index:06d}.jpg"
        has_thumb = _thumbnail(row, directory / thumb)
        cells = [
            f"<td>{f'<img class=thumb src={thumb!r} alt=thumbnail>' if has_thumb else 'unreadable'}</td>",
            f"<td>{html.escape(row['key'])}</td>",
            f"<td>{html.escape(row['prompt'])}</td>",
        ]
        for name in names:
            value = (row.get("rewards") or {}).get(name)
            shown = "–" if value is None else f"{value:.4f}"
            cells.append(f'<td data-value="{"" if value is None else value}">{shown}</td>')
        cells.append(f'<td class="error">{html.escape(row.get("error") or "")}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    plots = "".join(f'<img src="{name}" alt="{name}">' for name in _plots(rows, directory))
    page = PAGE.format(
        thumb=THUMBNAIL,
        count=len(rows),
        names=html.escape(", ".join(names)),
        versions=html.escape(json.dumps(versions or {})),
        plots=plots,
        headers="".join(f"<th>{html.escape(name)}</th>" for name in names),
        body="\n".join(body),
    )
    target = directory / "index.html"
    target.write_text(page)
    return target
