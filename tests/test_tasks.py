"""The paper's downstream tasks: each dataset's download layout converted and
preprocessed (preprocess.py --format), label names / regions / ignore label carried to
training and evaluation, the challenge rules, and the comparison report."""

import json
import math

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
import torch

import evaluate
import finetune
import preprocess

SHAPE = (26, 28, 24)


def head(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    inside = (g**2).sum(0) < 0.75
    return (inside * (rng.uniform(50, 100, SHAPE) + 100 * scale * (g[0] + 1))).astype(np.float32)


def blob(values=(1,)):
    lab = np.zeros(SHAPE, np.uint8)
    for i, v in enumerate(values):
        lab[10 + 2 * i : 13 + 2 * i, 11:15, 9:12] = v
    return lab


def save(path, arr, affine=np.eye(4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def channel_order_ok(image, sources):
    """Channel k of the preprocessed image is modality k: each modality here has its
    own intensity gradient along x (scale), which survives normalisation."""
    slopes = [
        np.polyfit(np.arange(image.shape[1]), image[k][:, image.shape[2] // 2, image.shape[3] // 2], 1)[0]
        for k in range(len(sources))
    ]
    return np.argsort(slopes).tolist() == np.argsort(sources).tolist()


def test_brats21_layout(tmp_path):
    raw = tmp_path / "raw"
    scales = {"flair": 0.5, "t1": 1.5, "t1ce": 3.0, "t2": 0.2}
    for i in range(3):
        d = raw / f"BraTS2021_0000{i}"
        for m, s in scales.items():
            save(d / f"BraTS2021_0000{i}_{m}.nii.gz", head(i, s))
        save(d / f"BraTS2021_0000{i}_seg.nii.gz", blob((1, 2, 4)))
    (raw / "BraTS2021_00002" / "BraTS2021_00002_t1ce.nii.gz").unlink()  # a missing modality
    out = tmp_path / "pre"
    done, _, failed = preprocess.run(raw, out, workers=1, quiet=True, fmt="brats21")
    assert done == 2 and len(failed) == 1 and "missing modality: t1ce" in failed[0]["reason"]
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channels"] == {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"} and ds["n_channels"] == 4
    assert ds["evaluation_regions"] == {"whole tumour": [1, 2, 3], "tumour core": [1, 3], "enhancing tumour": [3]}
    assert ds["metric_rules"] == "brats" and ds["label_names"]["3"] == "enhancing tumour"
    lab = np.load(out / "labels" / "BraTS2021_00000.npy")
    assert set(np.unique(lab)) == {0, 1, 2, 3}  # 4 -> 3
    assert channel_order_ok(np.load(out / "images" / "BraTS2021_00000.npy").astype(np.float32), list(scales.values()))


def test_isles22_channels_on_the_mask_grid(tmp_path):
    raw = tmp_path / "raw"
    sub = "sub-strokecase0001"
    dwi_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    flair_aff = np.array(
        [[0, 1.2, 0, -3.0], [-1.1, 0, 0, 4.0], [0, 0, 1.6, -1.0], [0, 0, 0, 1]]
    )  # own spacing and axes
    flair = head(7, 1.0)
    save(raw / sub / "ses-0001" / "anat" / f"{sub}_ses-0001_FLAIR.nii.gz", flair, flair_aff)
    save(raw / sub / "ses-0001" / "dwi" / f"{sub}_ses-0001_dwi.nii.gz", head(8, 2.0), dwi_aff)
    save(raw / sub / "ses-0001" / "dwi" / f"{sub}_ses-0001_adc.nii.gz", head(9, 0.3), dwi_aff)
    save(raw / "derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz", blob(), dwi_aff)
    other = "sub-strokecase0002"  # its ADC is missing
    save(raw / other / "ses-0001" / "anat" / f"{other}_ses-0001_FLAIR.nii.gz", flair, flair_aff)
    save(raw / other / "ses-0001" / "dwi" / f"{other}_ses-0001_dwi.nii.gz", head(8), dwi_aff)
    save(raw / "derivatives" / other / "ses-0001" / f"{other}_ses-0001_msk.nii.gz", blob(), dwi_aff)
    case = preprocess.find_isles22(raw)[0][0]
    assert [f.split("_")[-1] for f in case["files"]] == ["FLAIR.nii.gz", "dwi.nii.gz", "adc.nii.gz"]
    # the FLAIR onto the mask's grid equals nibabel's resample_from_to (cubic), which the authors' conversion calls
    img = nib.Nifti1Image(flair, flair_aff)
    want = nibabel.processing.resample_from_to(img, (SHAPE, dwi_aff), order=3).get_fdata()
    got = preprocess.onto_grid(flair, flair_aff, SHAPE, dwi_aff)
    assert np.abs(got - want).max() < 1e-3 * flair.max()
    out = tmp_path / "pre"
    done, _, failed = preprocess.run(raw, out, workers=1, quiet=True, fmt="isles22")
    assert done == 1 and [f["case"] for f in failed] == [other] and "missing modality: adc" in failed[0]["reason"]
    meta = json.loads((out / "meta" / f"{sub}.json").read_text())
    assert np.allclose(meta["original_affine"], dwi_aff) and meta["grid_file"].endswith("_msk.nii.gz")
    assert json.loads((out / "dataset.json").read_text())["metric_rules"] == "isles"


def test_wmh_challenge_set_up_and_a_label_on_another_grid_is_named(tmp_path):
    """--wmh-with-t1 --wmh-label2-ignore: FLAIR + T1, label 2 ignored (the default, the
    authors' FLAIR-only task with label 2 a class, is in test_protocol.py)."""
    raw = tmp_path / "raw"
    for site, case, test in (("Utrecht", "0", False), ("Amsterdam/GE3T", "100", False), ("Singapore", "50", True)):
        d = raw / ("test" if test else "training") / site / case
        save(d / "pre" / "FLAIR.nii.gz", head(int(case), 0.5))
        save(d / "pre" / "T1.nii.gz", head(int(case) + 1, 2.0))
        save(d / "wmh.nii.gz", blob((1, 2)))
    save(raw / "training" / "Utrecht" / "0" / "wmh.nii.gz", blob((1, 2)), np.diag([1.0, 1.0, 3.0, 1.0]))  # another grid
    out = tmp_path / "pre"
    done, _, failed = preprocess.run(raw, out, workers=1, quiet=True, fmt="wmh", wmh_t1=True, wmh_label2_ignore=True)
    assert done == 2 and len(failed) == 1 and "must share the image's voxel grid" in failed[0]["reason"]
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["ignore_label"] == 2 and ds["evaluation_regions"] == {"white matter hyperintensities": [1]}
    assert {c["case"]: c["split"] for c in ds["cases"]} == {
        "training_Amsterdam_GE3T_100": "train",
        "test_Singapore_50": "test",
    }
    assert ds["channels"] == {"0": "FLAIR", "1": "T1"}


def test_msseg_case_names_include_the_centre(tmp_path):
    raw = tmp_path / "raw"
    for centre in ("Center_01", "Center_03"):
        d = raw / "training" / centre / "Patient_01"
        for k, m in enumerate(("DP", "FLAIR", "GADO", "T1", "T2")):
            save(d / "Preprocessed_Data" / f"{m}_preprocessed.nii.gz", head(k, 0.3 * (k + 1)))
        save(d / "Masks" / "Consensus.nii.gz", blob())
    done, _, failed = preprocess.run(raw, tmp_path / "pre", workers=1, quiet=True, fmt="msseg")
    ds = json.loads((tmp_path / "pre" / "dataset.json").read_text())
    assert (
        done == 2
        and not failed
        and sorted(c["case"] for c in ds["cases"]) == ["Center_01_Patient_01", "Center_03_Patient_01"]
    )
    assert ds["n_channels"] == 5


# -----------------------------------------------------------------------------
# Regions, the ignore label and the challenge rules


def test_region_dice_by_hand_and_ignore_changes_nothing():
    ref = np.zeros((10, 10, 10), np.int64)
    ref[2:6, 2:6, 2:6] = 2  # edema
    ref[3:5, 3:5, 3:5] = 1  # necrosis inside
    ref[4, 4, 4] = 3  # enhancing
    pred = ref.copy()
    pred[2, 2:6, 2:6] = 0  # one missed plane of edema
    regions = {"whole tumour": [1, 2, 3], "tumour core": [1, 3], "enhancing tumour": [3]}
    m = evaluate.case_metrics(pred, ref, (1, 1, 1), regions, rules="brats")
    wt_ref, wt_pred = 64, 64 - 16
    assert m["whole tumour"]["dice"] == pytest.approx(2 * wt_pred / (wt_ref + wt_pred))
    assert m["tumour core"]["dice"] == 1.0 and m["enhancing tumour"]["dice"] == 1.0
    empty = evaluate.case_metrics(
        np.zeros_like(ref), np.zeros_like(ref), (1, 1, 1), {"enhancing tumour": [3]}, rules="brats"
    )
    assert empty["enhancing tumour"]["dice"] == 1.0 and empty["enhancing tumour"]["hd95_mm"] == 0.0
    miss = evaluate.case_metrics(np.zeros_like(ref), ref, (1, 1, 1), {"enhancing tumour": [3]}, rules="brats")
    assert miss["enhancing tumour"]["dice"] == 0.0 and miss["enhancing tumour"]["hd95_mm"] == 373.13
    # an ignore-label voxel (WMH's 2) counts in no metric, whatever is predicted there
    wref = np.zeros((10, 10, 10), np.int64)
    wref[2:5, 2:5, 2:5], wref[7, 7, 7] = 1, 2
    a = evaluate.case_metrics(wref.clip(max=1), wref, (1, 1, 1), {"wmh": [1]}, ignore=2, rules="wmh")
    b_pred = wref.clip(max=1)
    b_pred[7, 7, 7] = 1  # predicted WMH where the reference says "other pathology"
    b = evaluate.case_metrics(b_pred, wref, (1, 1, 1), {"wmh": [1]}, ignore=2, rules="wmh")
    assert a["wmh"]["dice"] == b["wmh"]["dice"] == 1.0 and a["wmh"]["lesion_f1"] == b["wmh"]["lesion_f1"] == 1.0


def test_ignore_and_region_losses():
    torch.manual_seed(0)
    seg = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    seg[:, 2:5, 2:5, 2:5] = 1
    seg[:, 6, 6, 6] = 2  # ignore
    t = finetune.targets(seg, [0, 1], ignore=2)
    logits = torch.randn(1, 2, 8, 8, 8)
    moved = logits.clone()
    moved[:, :, 6, 6, 6] = torch.tensor([50.0, -50.0])  # anything at the ignored voxel
    assert finetune.seg_loss(logits, t).item() == pytest.approx(finetune.seg_loss(moved, t).item(), rel=1e-6)
    regions = {"whole": [1, 2], "core": [2]}
    seg2 = seg.clone()
    seg2[:, 3, 3, 3] = 2  # no ignore here: 2 is a label inside both regions
    rt = finetune.targets(seg2, None, None, regions)
    assert rt.shape == (1, 2, 8, 8, 8) and rt[0, 0].sum() == 28 and rt[0, 1].sum() == 2
    perfect = rt * 40 - 20  # sigmoid ~ the masks
    assert finetune.seg_loss(perfect, rt, regions=True).item() < 0.01
    assert finetune.seg_loss(torch.zeros_like(perfect), rt, regions=True).item() > 0.5


def test_region_training_end_to_end(demo, tmp_path):
    """An nnU-Net dataset.json with region labels is trained with one sigmoid per region."""
    import shutil

    data_dir = tmp_path / "pre"
    shutil.copytree(demo / "preprocessed", data_dir)
    ds = json.loads((data_dir / "dataset.json").read_text())
    ds["training_regions"] = {"lesion": [1]}
    ds["regions_class_order"] = [1]
    (data_dir / "dataset.json").write_text(json.dumps(ds))
    out = tmp_path / "ft"
    assert (
        finetune.main(
            [
                "--patch",
                "32",
                "--batch",
                "1",
                "--steps",
                "2",
                "--n-train",
                "2",
                "--workers",
                "0",
                "--quiet",
                "--pretrained",
                "none",
                "--data",
                str(data_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["n_outputs"] == 1 and ck["training_regions"] == {"lesion": [1]}
    assert evaluate.main(["--run", str(out), "--data", str(data_dir), "--quiet", "--metrics", "challenge"]) == 0
    assert "lesion" in json.loads((out / "eval" / "metrics.json").read_text())["summary"]


def test_report_mean_and_std_by_hand(tmp_path, capsys):
    dice = {"a": (0.8, 0.6), "b": (0.7, 0.5), "c": (0.9, 0.4)}  # three seeds, two regions
    folders = []
    for seed, (wt, et) in dice.items():
        d = tmp_path / f"brats_xl_s{seed}" / "eval"
        d.mkdir(parents=True)
        summary = {r: {"dice": {"mean": v}} for r, v in (("whole tumour", wt), ("enhancing tumour", et))}
        (d / "metrics.json").write_text(
            json.dumps(
                {"dataset": "BraTS2021", "arch": "unet_xl", "pretrained": "runs/xl/encoder.pt", "summary": summary}
            )
        )
        folders.append(str(d.parent))
    scratch = tmp_path / "brats_xl_scratch" / "eval"
    scratch.mkdir(parents=True)
    (scratch / "metrics.json").write_text(
        json.dumps(
            {
                "dataset": "BraTS2021",
                "arch": "unet_xl",
                "pretrained": "none",
                "summary": {"whole tumour": {"dice": {"mean": 0.5}}},
            }
        )
    )
    assert evaluate.main(["--report", *folders, str(scratch.parent), "--out", str(tmp_path / "rep")]) == 0
    rows = {(r["init"], r["region"]): r for r in __import__("csv").DictReader(open(tmp_path / "rep" / "report.csv"))}
    wt = np.array([0.8, 0.7, 0.9])
    assert float(rows[("pretrained", "whole tumour")]["dice_mean"]) == pytest.approx(wt.mean())
    assert float(rows[("pretrained", "whole tumour")]["dice_std"]) == pytest.approx(
        math.sqrt(((wt - wt.mean()) ** 2).mean())
    )
    assert (
        rows[("pretrained", "whole tumour")]["runs"] == "3"
        and float(rows[("scratch", "whole tumour")]["dice_mean"]) == 0.5
    )
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| unet_xl | pretrained | runs/xl/encoder.pt | - | - | 3 | 0.8000 +- 0.0816" in md
    # the same run given twice counts once; a run scored with other metrics is a row of its own
    assert evaluate.main(["--report", *folders, folders[0] + "/eval", "--out", str(tmp_path / "rep2")]) == 0
    assert "| 3 | 0.8000 +- 0.0816" in (tmp_path / "rep2" / "report.md").read_text()
    other = tmp_path / "brats_xl_authors" / "eval"
    other.mkdir(parents=True)
    (other / "metrics.json").write_text(
        json.dumps(
            {
                "dataset": "BraTS2021",
                "arch": "unet_xl",
                "pretrained": "runs/xl/encoder.pt",
                "metric_set": "authors",
                "summary": {"all": {"dice": {"mean": 0.1}}},
            }
        )
    )
    assert evaluate.main(["--report", *folders, str(other.parent), "--out", str(tmp_path / "rep3")]) == 0
    md3 = (tmp_path / "rep3" / "report.md").read_text()
    assert (
        "| 3 | 0.8000 +- 0.0816" in md3 and "### BraTS2021, authors metrics" in md3 and "| 1 | 0.1000 +- 0.0000" in md3
    )
