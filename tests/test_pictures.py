"""pictures.py and the pictures each stage writes, read back with SimpleITK (not our writer)."""

import ast
import json
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

import data
import evaluate
import finetune
import pictures
import preprocess
import pretrain

TINY = ["--arch", "unet_b", "--patch", "32", "--batch", "2", "--workers", "0", "--quiet", "--log-every", "1"]
ROOT = Path(__file__).resolve().parents[1]


def read_png(path):
    """(H, W, 3) uint8, decoded by SimpleITK's PNG reader (a grey PNG repeated over RGB)."""
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img


def colour_mask(img, colour):
    return (img == np.array(colour, np.uint8)).all(axis=-1)


def edge(mask):
    """The boundary as scipy sees it: mask minus its erosion (4-neighbours, outside counts as background)."""
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(2, 1), border_value=0)


def test_only_numpy_and_the_standard_library():
    tree = ast.parse((ROOT / "pictures.py").read_text())
    mods = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in getattr(n, "names", [])
    }
    assert {m.split(".")[0] for m in mods} <= {"html", "json", "math", "os", "struct", "zlib", "pathlib", "numpy"}


def test_png_decodes_with_an_independent_reader(tmp_path):
    rng = np.random.default_rng(0)
    for shape in ((7, 13, 3), (20, 9)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        pictures.save_png(tmp_path / "a.png", img)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.png"))), img)
    grey = np.repeat(img[..., None], 3, axis=-1)  # colourless RGB is stored as grey, a third of the bytes
    pictures.save_png(tmp_path / "g.png", grey)
    assert np.array_equal(read_png(tmp_path / "g.png"), grey)
    assert sitk.ReadImage(str(tmp_path / "g.png")).GetNumberOfComponentsPerPixel() == 1
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed


def test_a_bright_voxel_of_the_phantom_lands_on_its_pixel(demo, tmp_path):
    vol = np.load(demo / "preprocessed" / "images" / "demo_000.npy")[0].astype(np.float32)  # (X, Y, Z)
    X, Y, Z = vol.shape
    v = (X // 3, Y // 2 + 3, Z // 2 - 4)
    vol[v] = vol.max() * 3
    img, origins = pictures.volumes_picture([vol], ["phantom"], centre=v)
    pictures.save_png(tmp_path / "p.png", img)
    got = read_png(tmp_path / "p.png")[..., 0]
    k = pictures.auto_zoom(vol.shape)
    # (row, column) of the voxel in each view: rot90 puts voxel (a, b) of a slice at (n_b - 1 - b, a)
    where = [(Z - 1 - v[2], v[1]), (Z - 1 - v[2], v[0]), (Y - 1 - v[1], v[0])]  # sagittal, coronal, axial
    for (y, x), (r, c), (h, w) in zip([o[0] for o in origins], where, [(Z, Y), (Z, X), (Y, X)]):
        panel = got[y : y + h * k, x : x + w * k]
        assert panel[r * k + k // 2, c * k + k // 2] == 255
        assert (panel[r * k : (r + 1) * k, c * k : (c + 1) * k] == 255).all()
    assert got.shape[1] == 2 + 1 * (max(Y, X) * k + 2)


def test_outlines_lie_on_the_boundaries_and_nowhere_else(tmp_path):
    rng = np.random.default_rng(1)
    g = np.stack(np.meshgrid(*[np.arange(n) for n in (30, 26, 22)], indexing="ij"))
    ref = ((g - np.array([14, 12, 10])[:, None, None, None]) ** 2).sum(0) < 36

    def col(*v):
        return np.array(v)[:, None, None, None]

    pred = ((g - col(16, 12, 11)) ** 2 / col(1, 2, 1)).sum(0) < 30
    image = rng.uniform(0, 1, ref.shape).astype(np.float32)
    img, origins, centre = pictures.outline_picture(image, [(ref, pictures.GREEN), (pred, pictures.RED)])
    union = ref | pred
    assert centre == tuple(int(np.argmax(union.sum(axis=tuple(d for d in range(3) if d != ax)))) for ax in range(3))
    pictures.save_png(tmp_path / "o.png", img)
    got = read_png(tmp_path / "o.png")
    k = pictures.auto_zoom(ref.shape)
    for (y, x), r, p in zip(origins[0], pictures.ortho(ref, centre), pictures.ortho(pred, centre)):
        h, w = r.shape
        panel = got[y : y + h * k, x : x + w * k]
        assert np.array_equal(panel, panel[::k, ::k].repeat(k, 0).repeat(k, 1))  # nearest zoom: whole voxels
        px = panel[::k, ::k]
        yellow = colour_mask(px, pictures.YELLOW)
        assert np.array_equal(colour_mask(px, pictures.GREEN) | yellow, edge(r))
        assert np.array_equal(colour_mask(px, pictures.RED) | yellow, edge(p))
        assert np.array_equal(yellow, edge(r) & edge(p))


@pytest.mark.parametrize("preset", ["all", "wald", "nnunet"])
def test_show_has_one_panel_per_row_that_differs_from_the_original(demo, tmp_path, preset):
    out = tmp_path / "show.png"
    assert (
        data.main(["--show", str(demo / "preprocessed"), "--out", str(out), "--patch", "32", "--preset", preset]) == 0
    )
    img, origins, names, _ = data.show(demo / "preprocessed", preset, patch=32)
    got = read_png(out)
    assert np.array_equal(got, img)
    rows = data.preset_rows(preset)
    want = {
        "all": ["elastic", "rotation", "scale", *data.INTENSITY_ROWS],
        "wald": ["rotation", "scale", "mirror"],
        "nnunet": ["rotation", "scale", "mirror", *data.NNUNET_ROWS],
    }[preset]
    assert rows == want and names[1:-1] == rows and names[0].startswith("original") and names[-1].startswith("mask")
    assert len(origins) == len(rows) + 2 and all(len(o) == 4 for o in origins)
    n = 32 * pictures.auto_zoom((32,) * 3)

    def block(r, c):
        y, x = origins[r][c]
        return got[y : y + n, x : x + n]

    assert not block(0, 3).any()  # the original does not differ from itself
    for r in range(1, len(origins)):
        assert block(r, 3).any(), names[r]  # where the row changed the image
        assert any(not np.array_equal(block(r, c), block(0, c)) for c in range(4)), names[r]
        visible = ("elastic", "rotation", "scale", "mirror", "bias_field", "gamma", "ghosting")
        if names[r] in visible or r == len(origins) - 1:
            assert not np.array_equal(block(r, 2), block(0, 2)), names[r]  # visible on the grey slices too


def test_curves_png_and_svg():
    s = {"loss": ([1, 2, 3], [1.0, 0.5, float("nan")]), "val": ([2, 3], [0.2, 0.4])}
    img = pictures.curves_png(s, 200, 100, "loss")
    assert img.shape == (100, 200, 3) and (img != 255).any()
    svg = pictures.svg_curves(s, title="t")
    assert svg.count("<polyline") == 2 and "nan" not in svg
    assert pictures.svg_curves({}) == ""


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.tables, self.cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if tag == "a":
            self.links.append(a["href"])
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th"):
            self.cell = ""

    def handle_data(self, d):
        if self.cell is not None:
            self.cell += d

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None


@pytest.fixture(scope="module")
def evaluated(demo, tmp_path_factory):
    ft = tmp_path_factory.mktemp("ft") / "run"
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                "none",
                "--out",
                str(ft),
                "--n-train",
                "2",
                "--steps",
                "2",
                "--steps-per-epoch",
                "1",
            ]
        )
        == 0
    )
    assert evaluate.main(["--run", str(ft), "--data", str(demo / "preprocessed"), "--quiet"]) == 0
    return ft


def test_finetune_progress_png(evaluated):
    img = read_png(evaluated / "progress.png")
    assert img.shape[1] == 480 and img.shape[0] >= 160 and (img != 255).any()


def test_evaluation_pictures_show_the_saved_prediction_and_label(evaluated, demo):
    m = json.loads((evaluated / "eval" / "metrics.json").read_text())
    for row in m["cases"]:
        meta = json.loads((demo / "preprocessed" / "meta" / f"{row['case']}.json").read_text())
        pred = np.asarray(nib.load(evaluated / "eval" / "predictions" / f"{row['case']}.nii.gz").dataobj)
        ref = np.rint(preprocess.read_nifti(meta["source_label"])[0]).astype(np.int64)
        image = preprocess.read_nifti(meta["source_files"][0])[0]
        ornt = nib.orientations.ornt_transform(np.array(meta["native_ornt"]), nib.orientations.axcodes2ornt("RAS"))
        ras = [nib.orientations.apply_orientation(v, ornt) for v in (image, ref > 0, pred > 0)]
        # voxel sides along the RAS axes, from the raw header: thick axes stretched to whole multiples of the thin
        zooms = np.array(nib.load(meta["source_files"][0]).header.get_zooms()[:3])
        side = np.array([zooms[list(ornt[:, 0].astype(int)).index(d)] for d in range(3)])
        stretch = tuple(int(max(1, min(8, round(s / side.min())))) for s in side)
        got = read_png(evaluated / "eval" / "pictures" / f"{row['case']}.png")
        want, origins, centre = pictures.outline_picture(
            ras[0],
            [(ras[1], pictures.GREEN), (ras[2], pictures.RED)],
            title=f"{row['case']} dice {evaluate.case_dice(row):.3f}",
            stretch=stretch,
        )
        assert np.array_equal(got, want)
        assert centre == pictures.largest(ras[1] | ras[2])
        k = pictures.auto_zoom([n * s for n, s in zip(ras[0].shape, stretch)])
        views = zip(origins[0], pictures.ortho(ras[1], centre, stretch), pictures.ortho(ras[2], centre, stretch))
        for (y, x), r, p in views:
            px = got[y : y + r.shape[0] * k : k, x : x + r.shape[1] * k : k]
            yellow = colour_mask(px, pictures.YELLOW)
            assert np.array_equal(colour_mask(px, pictures.GREEN) | yellow, edge(r))
            assert np.array_equal(colour_mask(px, pictures.RED) | yellow, edge(p))


def test_index_html(evaluated, demo):
    out = evaluated / "eval"
    page = Page()
    page.feed((out / "index.html").read_text())
    text = (out / "index.html").read_text()
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    cases = json.loads((demo / "preprocessed" / "dataset.json").read_text())["cases"]
    tests = [c["case"] for c in cases if c["split"] == "test"]
    assert page.images and all((out / src).exists() for src in page.images)
    assert sorted(page.images) == sorted(f"pictures/{c}.png" for c in tests)
    table = page.tables[0]
    assert [r[0] for r in table[1:]] and sorted(r[0] for r in table[1:]) == sorted(tests)
    dice = [float(r[1]) for r in table[1:]]
    assert dice == sorted(dice)
    assert "<svg" in (out / "index.html").read_text()  # the curves, inline
    assert any(r[:2] == ["arch", "unet_b"] for t in page.tables for r in t)  # the run's settings


def test_report_page_and_no_pictures(evaluated, demo, tmp_path):
    assert evaluate.main(["--report", str(evaluated), "--out", str(tmp_path / "rep")]) == 0
    page = Page()
    page.feed((tmp_path / "rep" / "report.html").read_text())
    target = (evaluated / "eval" / "index.html").resolve()
    assert page.links and all((tmp_path / "rep" / h).resolve() == target for h in page.links)
    regions = json.loads((evaluated / "eval" / "metrics.json").read_text())["summary"]
    assert len(page.tables[0]) == 1 + len(regions)  # header, then one row per label / region of the one configuration
    out = tmp_path / "quiet"
    assert (
        evaluate.main(
            [
                "--run",
                str(evaluated),
                "--data",
                str(demo / "preprocessed"),
                "--quiet",
                "--no-pictures",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "metrics.json").exists() and not (out / "index.html").exists() and not (out / "pictures").exists()


def test_pretrain_writes_the_validation_picture(demo, tmp_path):
    run = tmp_path / "run"
    assert (
        pretrain.main(
            TINY + ["--data", str(demo / "preprocessed"), "--out", str(run), "--steps", "2", "--steps-per-epoch", "2"]
        )
        == 0
    )
    img = read_png(run / "samples" / "step0000002.png")
    k = pictures.auto_zoom((32,) * 3)
    assert img.shape == (pictures.CHAR_H + 2 + 3 * (pictures.CHAR_H + 32 * k + 2) + 2, 2 + 4 * (32 * k + 2), 3)
    assert read_png(run / "progress.png").shape[1] == 480
    quiet = tmp_path / "quiet"
    assert (
        pretrain.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--out",
                str(quiet),
                "--steps",
                "2",
                "--steps-per-epoch",
                "2",
                "--no-pictures",
            ]
        )
        == 0
    )
    assert not list(quiet.rglob("*.png")) and list((quiet / "samples").glob("*.nii.gz"))


def test_a_picture_that_cannot_be_written_does_not_stop_the_run(demo, tmp_path, monkeypatch, capsys):
    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pictures, "write_atomic", full)
    run = tmp_path / "run"
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                "none",
                "--out",
                str(run),
                "--n-train",
                "2",
                "--steps",
                "2",
                "--steps-per-epoch",
                "1",
            ]
        )
        == 0
    )
    assert "progress.png not written" in capsys.readouterr().out and (run / "ckpt.pt").exists()
