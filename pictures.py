"""
Pictures of what the kit does, with numpy and the standard library only: PNG files
(zlib + struct), orthogonal slices, label outlines, a tiny bitmap font for names,
curves as PNG and as inline SVG, and one static HTML page. Every stage imports it
(data.py, pretrain.py, finetune.py, evaluate.py), so it depends on nothing else.

    import pictures
    img, _ = pictures.grid([pictures.ortho(vol)], col_names=["sagittal", "coronal", "axial"])
    pictures.save_png("vol.png", img)

Conventions: volumes are (X, Y, Z) arrays in RAS (preprocess.py's grid); a slice is
shown rotated a quarter turn (np.rot90) so that superior / anterior is up and the
patient's right is on the right, i.e. voxel (a, b) of a slice lands on pixel row
n_b - 1 - b, column a (times the zoom). Images are uint8 (H, W, 3).
"""

import html
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

GREEN, RED, YELLOW, WHITE, GREY = (0, 230, 0), (255, 40, 40), (255, 230, 0), (255, 255, 255), (170, 170, 170)
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]  # curves, in order


# -----------------------------------------------------------------------------
# Files: PNG bytes, atomic writes


def write_atomic(path, data):
    """Bytes or text to `path` through a temporary file and a rename: a reader (a
    browser refreshing the page) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def png(img, level=6):
    """(H, W) grey or (H, W, 3) RGB uint8 -> PNG bytes: 8-bit, no interlace, every
    row with filter 0 (none); zlib does the compressing (its window also catches the
    repeated rows of a zoomed slice)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 3 and (img == img[..., :1]).all():
        img = img[..., 0]  # an RGB picture with no colour in it is stored grey: a third of the bytes
    h, w = img.shape[:2]
    kind = 2 if img.ndim == 3 else 0  # PNG colour type: RGB or greyscale
    rows = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, -1)], axis=1)  # filter byte, then the row

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, kind, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + chunk(b"IEND", b"")
    )


def save_png(path, img):
    write_atomic(path, png(img))


# -----------------------------------------------------------------------------
# Slices, grey levels, outlines


def window(vol, lo=None, hi=None):
    """The grey levels of a volume: [lo, hi] (default: its minimum and 99.5th
    percentile, so one bright voxel does not darken the rest) -> (lo, hi)."""
    vol = np.asarray(vol, dtype=np.float32)
    lo = float(vol.min()) if lo is None else lo
    # every 3rd voxel per axis is plenty for a percentile, and 27x cheaper on a whole head
    hi = float(np.percentile(vol[::3, ::3, ::3] if vol.ndim == 3 else vol, 99.5)) if hi is None else hi
    return lo, hi if hi > lo else lo + 1.0


def grey(x, lo, hi):
    """Float array -> uint8 (H, W, 3), [lo, hi] to [0, 255], clipped."""
    g = np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def view(sl):
    """A slice (A, B) as shown: superior / anterior (B) up -> (B, A)."""
    return np.rot90(sl)


def centre_of(shape):
    return tuple(n // 2 for n in shape)


def largest(mask):
    """For each axis, the slice with the most voxels of `mask` (X, Y, Z), the centre
    when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    idx = np.nonzero(mask)  # the voxels' coordinates: one pass over the volume, then work in the mask's size
    if not len(idx[0]):
        return centre_of(mask.shape)
    return tuple(int(np.bincount(i, minlength=n).argmax()) for i, n in zip(idx, mask.shape))


def ortho(vol, centre=None, stretch=(1, 1, 1)):
    """The three orthogonal slices of (X, Y, Z) through `centre`, as shown:
    sagittal (Z, Y), coronal (Z, X), axial (Y, X). stretch: each axis's voxels
    repeated so many times (thick slices of a raw image keep the head's proportions)."""
    c = centre_of(vol.shape) if centre is None else centre
    k = stretch
    return [
        view(vol[c[0], :, :].repeat(k[1], 0).repeat(k[2], 1)),
        view(vol[:, c[1], :].repeat(k[0], 0).repeat(k[2], 1)),
        view(vol[:, :, c[2]].repeat(k[0], 0).repeat(k[1], 1)),
    ]


def boundary(mask):
    """The pixels of a 2-D mask that touch a pixel outside it (4-neighbours; the
    image's edge counts as outside): the outline drawn for labels."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def outline(img, masks_colours):
    """Draw the boundary of each 2-D mask on a copy of img (H, W, 3) in its colour;
    where two outlines meet, yellow."""
    out, drawn = img.copy(), np.zeros(img.shape[:2], dtype=np.int32)
    for m, colour in masks_colours:
        b = boundary(m)
        out[b] = colour
        drawn += b
    out[drawn > 1] = YELLOW
    return out


def zoom(img, k):
    """Nearest-neighbour upscaling by an integer factor, so small volumes stay visible."""
    return img if k == 1 else img.repeat(k, axis=0).repeat(k, axis=1)


def auto_zoom(shape, target=128):
    return max(1, target // max(shape))


# -----------------------------------------------------------------------------
# Text (a 5x7 bitmap font: enough for names and numbers) and grids of panels

FONT = {  # each glyph: 7 rows of 5 bits, as 14 hex digits; lowercase is drawn as uppercase
    "A": "0E11111F111111",
    "B": "1E11111E11111E",
    "C": "0E11101010110E",
    "D": "1C12111111121C",
    "E": "1F10101E10101F",
    "F": "1F10101E101010",
    "G": "0E11101711110F",
    "H": "1111111F111111",
    "I": "0E04040404040E",
    "J": "0702020202120C",
    "K": "11121418141211",
    "L": "1010101010101F",
    "M": "111B1515111111",
    "N": "11111915131111",
    "O": "0E11111111110E",
    "P": "1E11111E101010",
    "Q": "0E11111115120D",
    "R": "1E11111E141211",
    "S": "0F10100E01011E",
    "T": "1F040404040404",
    "U": "1111111111110E",
    "V": "11111111110A04",
    "W": "1111111515150A",
    "X": "11110A040A1111",
    "Y": "11110A04040404",
    "Z": "1F01020408101F",
    "0": "0E11131519110E",
    "1": "040C040404040E",
    "2": "0E11010204081F",
    "3": "1F02040201110E",
    "4": "02060A121F0202",
    "5": "1F101E0101110E",
    "6": "0608101E11110E",
    "7": "1F010204080808",
    "8": "0E11110E11110E",
    "9": "0E11110F01020C",
    " ": "00000000000000",
    "_": "0000000000001F",
    "-": "0000001F000000",
    ".": "00000000000C0C",
    ":": "000C0C000C0C00",
    "/": "01010204081010",
    "(": "02040808080402",
    ")": "08040202020408",
    "%": "18190204081303",
    "+": "0004041F040400",
    "=": "00001F001F0000",
    ",": "000000000C0408",
    "^": "040A1100000000",
    "?": "0E110102040004",
}
FONT = {c: [int(g[i : i + 2], 16) for i in range(0, 14, 2)] for c, g in FONT.items()}
CHAR_W, CHAR_H = 6, 9  # 5x7 glyphs with a column and two rows of space


def text(img, s, y, x, colour=WHITE):
    """Write s into img (H, W, 3) in place, top-left corner at (y, x); clipped at the edges."""
    for i, ch in enumerate(str(s).upper()):
        for r, bits in enumerate(FONT.get(ch, FONT["?"])):
            for c in range(5):
                yy, xx = y + r, x + i * CHAR_W + c
                if bits >> (4 - c) & 1 and 0 <= yy < img.shape[0] and 0 <= xx < img.shape[1]:
                    img[yy, xx] = colour
    return img


def grid(rows, row_names=None, col_names=None, gap=2):
    """Panels (lists of (H, W, 3) uint8 per row) in a grid on black, each cell as large
    as the largest panel; a line of text above each row (its name) and above the
    first (the column names). Returns (image, origins[r][c] = (y, x) of each panel)."""
    h = max(p.shape[0] for r in rows for p in r)
    w = max(max(p.shape[1] for p in r) for r in rows)
    ncol = max(len(r) for r in rows)
    head = CHAR_H + gap if col_names else 0
    line = CHAR_H if row_names else 0
    img = np.zeros((head + len(rows) * (line + h + gap) + gap, gap + ncol * (w + gap), 3), np.uint8)
    for c, name in enumerate(col_names or []):
        text(img, name, gap, gap + c * (w + gap))
    origins = []
    for r, panels in enumerate(rows):
        y = head + r * (line + h + gap) + gap
        if row_names:
            text(img, row_names[r], y, gap, GREY)
        origins.append([])
        for c, p in enumerate(panels):
            x = gap + c * (w + gap)
            img[y + line : y + line + p.shape[0], x : x + p.shape[1]] = p
            origins[-1].append((y + line, x))
    return img, origins


# -----------------------------------------------------------------------------
# The pictures the stages write


def volumes_picture(vols, names, centre=None, lo=None, hi=None):
    """Pretraining's picture: columns = volumes (X, Y, Z) (one grey window for all,
    from the last one: the target), rows = sagittal, coronal, axial through centre."""
    lo, hi = window(vols[-1], lo, hi)
    k = auto_zoom(vols[0].shape)
    cols = [[zoom(grey(s, lo, hi), k) for s in ortho(np.asarray(v, np.float32), centre)] for v in vols]
    return grid([list(r) for r in zip(*cols)], ["sagittal", "coronal", "axial"], names)


def outline_picture(image, masks_colours, centre=None, title="", stretch=(1, 1, 1)):
    """Evaluation's picture: the three slices of image (X, Y, Z) through `centre`
    (default: where the masks are largest), each mask (X, Y, Z) outlined in its colour;
    stretch as in ortho. Returns (image, origins, centre)."""
    if centre is None:
        centre = largest(np.logical_or.reduce([m for m, _ in masks_colours])) if masks_colours else None
    lo, hi = window(image)
    k = auto_zoom([n * s for n, s in zip(image.shape, stretch)])
    panels = []
    for i, sl in enumerate(ortho(np.asarray(image, np.float32), centre, stretch)):
        ms = [(ortho(np.asarray(m, bool), centre, stretch)[i], col) for m, col in masks_colours]
        # outline at voxel resolution, then zoomed: the outline is the boundary voxels, whatever the zoom
        panels.append(zoom(outline(grey(sl, lo, hi), ms), k))
    img, origins = grid([panels], [title], ["sagittal", "coronal", "axial"])
    return img, origins, centre


def curves_png(series, width=480, height=160, title=""):
    """Line plot of series {name: (xs, ys)} on one pair of axes, each curve scaled to
    the common range (nnU-Net's progress.png, without matplotlib). (H, W, 3) uint8."""
    img = np.full((height, width, 3), 255, np.uint8)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    left, r, t, b = 8 + 7 * CHAR_W, width - 8, 4 + CHAR_H * (1 + (len(series) > 1) * len(series)), height - 4 - CHAR_H
    img[t : b + 1, left], img[b, left : r + 1] = 0, 0
    text(img, title, 2, left, (0, 0, 0))
    if not pts:
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    text(img, f"{y1:.3g}", t, 2, (0, 0, 0)), text(img, f"{y0:.3g}", b - 7, 2, (0, 0, 0))
    text(img, f"{x0:g}", b + 3, left, (0, 0, 0)), text(img, f"{x1:g}", b + 3, r - CHAR_W * len(f"{x1:g}"), (0, 0, 0))
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = tuple(int(COLOURS[i % len(COLOURS)][j : j + 2], 16) for j in (1, 3, 5))
        if len(series) > 1:  # a legend; one curve is named by the title
            text(img, name, 2 + CHAR_H * (i + 1), left + 4, colour)
        p = np.array(
            [
                (b - (y - y0) / (y1 - y0) * (b - t), left + (x - x0) / (x1 - x0) * (r - left))
                for x, y in zip(xs, ys)
                if y is not None and math.isfinite(y)
            ]
        ).reshape(-1, 2)  # (N, 2) row, col
        if len(p) == 0:
            continue
        p = np.concatenate([p, p[-1:]])  # a single point is a segment of length 0
        # every segment sampled at each pixel it crosses, all segments at once: n[i] samples of segment i
        n = np.abs(np.diff(p, axis=0)).max(axis=1).astype(int) + 2
        seg = np.repeat(np.arange(len(n)), n)
        frac = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n - 1, n)
        yx = (p[seg] + (p[seg + 1] - p[seg]) * frac[:, None]).round().astype(int)
        img[yx[:, 0], yx[:, 1]] = colour
    return img


def read_log(path):
    """log.jsonl -> its rows (a missing file: none; a line cut short: skipped)."""
    rows = []
    if Path(path).exists():
        for ln in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(ln))
            except ValueError:
                pass
    return rows


def log_series(rows):
    """The curves of a run's log: training loss per step, and each validation value
    (val_loss, val_dice) that the run logged. {name: (steps, values)}."""
    out = {}
    for key in ("loss", "val_loss", "val_dice"):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
        if pts:
            out[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def progress_png(log_path, png_path):
    """RUN/progress.png from RUN/log.jsonl: the loss, and each validation value on its own axes."""
    s = log_series(read_log(log_path))
    plots = [curves_png({k: v}, title=k) for k, v in s.items()] or [curves_png({}, title="no log yet")]
    save_png(png_path, np.concatenate(plots, axis=0))


# -----------------------------------------------------------------------------
# The HTML page: inline SVG curves, tables, images by relative path


def svg_curves(series, width=480, height=200, title=""):
    """Inline SVG of series {name: (xs, ys)}, one curve each, scaled to the common range."""
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not pts:
        return ""
    left, r, t, b = 50, width - 10, 20, height - 20
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
        f'<text x="{left}" y="12">{html.escape(title)}</text>',
        f'<path d="M{left},{t} L{left},{b} L{r},{b}" fill="none" stroke="black"/>',
        f'<text x="2" y="{t + 4}">{y1:.3g}</text><text x="2" y="{b}">{y0:.3g}</text>',
        f'<text x="{left}" y="{height - 4}">{x0:g}</text><text x="{r - 40}" y="{height - 4}">{x1:g}</text>',
    ]
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        p = " ".join(
            f"{left + (x - x0) / (x1 - x0) * (r - left):.1f},{b - (y - y0) / (y1 - y0) * (b - t):.1f}"
            for x, y in zip(xs, ys)
            if y is not None and math.isfinite(y)
        )
        out.append(f'<polyline points="{p}" fill="none" stroke="{colour}"/>')
        if len(series) > 1:
            out.append(f'<text x="{left + 100 + 90 * i}" y="12" fill="{colour}">{html.escape(name)}</text>')
    return "\n".join(out + ["</svg>"])


def table(header, rows):
    """An HTML table; cells are escaped, floats given 4 decimals."""

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    return (
        "<table>\n<tr>"
        + "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        + "</tr>\n"
        + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>\n" for r in rows)
        + "</table>"
    )


def page(title, body):
    """One static page: no script, no external file; images are referenced by relative path."""
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n<style>'
        "body{font-family:sans-serif;margin:1em 2em} table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} img{image-rendering:pixelated}"
        f"</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
