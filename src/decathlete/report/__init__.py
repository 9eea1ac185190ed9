"""A small self-contained HTML report: metrics table, prediction cost (``efficiency.json``), training curve and
overlays of a few held-out slices."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from decathlete.io.atomic import write_atomic  # noqa: E402
from decathlete.io.images import image_suffix, read_image, read_label  # noqa: E402
from decathlete.metrics.efficiency import describe, efficiency_of  # noqa: E402


def _png_base64(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def overlay(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, title: str) -> str:
    """Base64 PNG of the axial slice through the reference's largest cross-section: reference contours in green,
    prediction contours in red, over the first image channel."""
    z = int(np.argmax((reference > 0).sum(axis=(1, 2)))) if reference.any() else image.shape[1] // 2
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image[0, z], cmap="gray")
    for mask, colour in ((reference, "lime"), (prediction, "red")):
        for value in np.unique(mask[z])[1:]:
            ax.contour(mask[z] == value, levels=[0.5], colors=colour, linewidths=1)
    ax.set_title(f"{title} (slice {z}; green reference, red prediction)", fontsize=8)
    ax.axis("off")
    return _png_base64(fig)


def write_report(path: str | Path, summary: dict[str, Any], fold_dir: Path, images: Path, labels: Path,
                 predictions: Path, configuration: Any, timings: dict[str, float], n_overlays: int = 3) -> Path:
    """Write ``path`` (HTML with every picture embedded) and return it."""
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{m['dice']:.4f}</td><td>{m['nsd']:.4f}</td>"
                   f"<td>{m['hd95']:.2f}</td></tr>" for name, m in summary["mean"].items())
    curve = fold_dir / "progress.png"
    curve_html = (f'<img src="data:image/png;base64,{base64.b64encode(curve.read_bytes()).decode()}">'
                  if curve.is_file() else "<p>no training curve</p>")
    pictures = []
    for ref_path in sorted(labels.iterdir())[:n_overlays]:
        suffix = image_suffix(ref_path)
        case = ref_path.name[: -len(suffix)]
        channel_files = sorted(images.glob(f"{case}_0*{suffix}")) or [images / ref_path.name]
        image, _ = read_image(channel_files)
        reference, _ = read_label(ref_path)
        prediction, _ = read_label(predictions / ref_path.name)
        pictures.append(f'<img src="data:image/png;base64,{overlay(image, reference, prediction, case)}">')
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    efficiency = efficiency_of(predictions, [c["case"] for c in summary["per_case"]])
    efficiency_html = html.escape(describe(efficiency)) if efficiency else "no efficiency.json in the predictions"
    document = f"""<!doctype html><html><head><meta charset="utf-8"><title>decathlete report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;
padding:4px 8px;text-align:right}}</style></head><body>
<h1>decathlete demo report</h1>
<p>Held-out cases: {len(summary['per_case'])}. Configuration: patch {configuration.patch_size}, spacing
{[round(s, 3) for s in configuration.spacing]} mm (z, y, x), batch {configuration.batch_size},
{configuration.parameters:,} parameters. Seconds per stage: {html.escape(stages)}.</p>
<h2>Held-out metrics (mean over cases)</h2>
<table><tr><th>label</th><th>Dice</th><th>NSD</th><th>HD95 (mm)</th></tr>{rows}</table>
<p>{html.escape(summary['conventions'].get('empty_masks', ''))}</p>
<h2>Prediction cost</h2><p>{efficiency_html}</p>
<h2>Training</h2>{curve_html}
<h2>Overlays</h2>{''.join(pictures)}
</body></html>"""
    path = Path(path)
    write_atomic(path, lambda tmp: tmp.write_text(document))
    return path
