"""The authors' evaluation protocol, so numbers sit next to the AMAES paper's Table 2:
their test splits (scikit-learn's train_test_split, reproduced with numpy), the WMH task
as their default (FLAIR only, label 2 a class), their evaluator's metrics, Yucca's
thick-slice transpose, and the pretraining leakage guard."""

import json

import nibabel as nib
import numpy as np
import pytest

import evaluate
import preprocess

train_test_split = pytest.importorskip("sklearn.model_selection").train_test_split  # test-only (requirements-dev)
confusion_matrix = pytest.importorskip("sklearn.metrics").confusion_matrix

SHAPE = (20, 22, 18)


def save(path, arr, affine=np.eye(4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def head(seed):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    return (((g**2).sum(0) < 0.75) * rng.uniform(50, 100, SHAPE)).astype(np.float32)


def blob(values=(1,)):
    lab = np.zeros(SHAPE, np.uint8)
    for i, v in enumerate(values):
        lab[8 + 2 * i : 11 + 2 * i, 9:13, 7:10] = v
    return lab


# -----------------------------------------------------------------------------
# Test splits


@pytest.mark.parametrize("fmt, n", [("brats21", 1251), ("isles22", 250), ("brats21", 20), ("isles22", 16)])
def test_authors_split_equals_scikit_learn(fmt, n):
    """On name lists of the real downloads' length (BraTS 2021: 1251 ids out of 00000..01666,
    not contiguous; ISLES 2022: sub-strokecase0001..0250) and on small ones."""
    seed = preprocess.AUTHORS_SPLITS[fmt][0]
    rng = np.random.default_rng(n)
    if fmt == "brats21":
        names = sorted(f"BraTS2021_{i:05d}" for i in rng.choice(1667, n, replace=False))
    else:
        names = [f"sub-strokecase{i:04d}" for i in range(1, n + 1)]
    train, test = train_test_split(names, random_state=seed)
    got = preprocess.sklearn_test_names(names, seed)
    assert got == test and len(got) == -(-n // 4)  # ceil(0.25 n)
    assert sorted(set(names) - set(got)) == sorted(train)


def test_converted_brats_and_isles_trees_hold_the_authors_test_cases(tmp_path):
    brats = tmp_path / "brats" / "training_data"
    ids = [f"BraTS2021_{i:05d}" for i in (0, 2, 3, 5, 6, 8, 9, 11, 12)]
    for k, name in enumerate(ids):
        for m in ("flair", "t1", "t1ce", "t2"):
            save(brats / name / f"{name}_{m}.nii.gz", head(k))
        save(brats / name / f"{name}_seg.nii.gz", blob((1, 2, 4)))
    out = tmp_path / "brats_pre"
    done, _, failed = preprocess.run(brats.parent, out, workers=1, quiet=True, fmt="brats21")
    assert done == len(ids) and not failed
    ds = json.loads((out / "dataset.json").read_text())
    _, test = train_test_split(sorted(ids), random_state=4215532)
    assert sorted(c["case"] for c in ds["cases"] if c["split"] == "test") == sorted(test) and len(test) == 3
    assert ds["test_split"]["random_state"] == 4215532 and ds["test_split"]["method"] == "authors"

    isles = tmp_path / "ISLES-2022"
    subs = [f"sub-strokecase{i:04d}" for i in range(1, 8)]
    for k, sub in enumerate(subs):
        save(isles / sub / "ses-0001" / "anat" / f"{sub}_ses-0001_FLAIR.nii.gz", head(k))
        save(isles / sub / "ses-0001" / "dwi" / f"{sub}_ses-0001_dwi.nii.gz", head(k + 10))
        save(isles / sub / "ses-0001" / "dwi" / f"{sub}_ses-0001_adc.nii.gz", head(k + 20))
        save(isles / "derivatives" / sub / "ses-0001" / f"{sub}_ses-0001_msk.nii.gz", blob())
    cases, _, meta = preprocess.find_isles22(isles)
    _, test = train_test_split(subs, random_state=859032)
    assert sorted(c["case"] for c in cases if c["split"] == "test") == sorted(test)


# -----------------------------------------------------------------------------
# WMH as the authors' default task


def wmh_tree(raw):
    for part, site, case in (
        ("training", "Utrecht", "0"),
        ("training", "Amsterdam/GE3T", "100"),
        ("test", "Singapore", "50"),
    ):
        d = raw / part / site / case
        save(d / "pre" / "FLAIR.nii.gz", head(int(case)))
        save(d / "pre" / "T1.nii.gz", head(int(case) + 1))
        save(d / "pre" / "wmh.nii.gz", blob((1, 2)))


def test_wmh_default_is_flair_only_with_label_2_a_class_and_the_opt_ins_give_the_challenge_set_up(tmp_path):
    import torch

    import finetune

    raw = tmp_path / "raw"
    wmh_tree(raw)
    out = tmp_path / "wmh"
    assert preprocess.run(raw, out, workers=1, quiet=True, fmt="wmh")[2] == []
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["n_channels"] == 1 and ds["channels"] == {"0": "FLAIR"} and ds["label_values"] == [0, 1, 2]
    assert ds["ignore_label"] is None and ds["label_names"]["2"] == "other pathology"
    assert np.load(out / "images" / "training_Utrecht_0.npy").shape[0] == 1
    assert set(np.unique(np.load(out / "labels" / "training_Utrecht_0.npy"))) == {0, 1, 2}
    ft = tmp_path / "ft"
    assert (
        finetune.main(
            [
                "--arch",
                "unet_b",
                "--patch",
                "32",
                "--batch",
                "1",
                "--steps",
                "1",
                "--n-train",
                "2",
                "--workers",
                "0",
                "--quiet",
                "--pretrained",
                "none",
                "--data",
                str(out),
                "--out",
                str(ft),
            ]
        )
        == 0
    )
    ck = torch.load(ft / "ckpt.pt", weights_only=True)
    assert ck["in_channels"] == 1 and ck["n_outputs"] == 3 and ck["label_values"] == [0, 1, 2]

    opt = tmp_path / "wmh_t1"
    assert preprocess.run(raw, opt, workers=1, quiet=True, fmt="wmh", wmh_t1=True, wmh_label2_ignore=True)[2] == []
    ds = json.loads((opt / "dataset.json").read_text())
    assert ds["channels"] == {"0": "FLAIR", "1": "T1"} and ds["ignore_label"] == 2 and ds["evaluation_ignore"] == 2
    assert ds["evaluation_regions"] == {"white matter hyperintensities": [1]} and ds["metric_rules"] == "wmh"


# -----------------------------------------------------------------------------
# The authors' metrics


def counts(pred, ref, a, b):
    return int(((ref == a) & (pred == b)).sum())


def test_authors_metrics_by_an_independent_confusion_matrix():
    """Labels 0..3: 1 partly confused with 2 (so 'all' differs from a union-mask Dice),
    2 never predicted where it is (precision of 2 is 0/0 = NaN, as the authors' numpy
    division gives), 3 absent from both (NaN)."""
    ref = np.zeros((12, 12, 12), np.int64)
    ref[2:6, 2:6, 2:6] = 1  # 64 voxels
    ref[7:9, 7:9, 7:9] = 2  # 8 voxels
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, 2:5] = 1  # 48 right
    pred[2:6, 2:6, 5] = 2  # 16 voxels of label 1 called 2
    pred[0, 0, 0:3] = 1  # 3 false positives of 1
    values = [0, 1, 2, 3]
    got = evaluate.authors_case_metrics(pred, ref, values)
    cm = confusion_matrix(ref.ravel(), pred.ravel(), labels=values)
    for i, v in enumerate(values):
        tp = counts(pred, ref, v, v)
        fp = int((pred == v).sum()) - tp
        fn = int((ref == v).sum()) - tp
        assert (tp, fp, fn) == (cm[i, i], cm[:, i].sum() - cm[i, i], cm[i, :].sum() - cm[i, i])
        d = got[str(v)]
        assert (d["tp"], d["fp"], d["fn"]) == (tp, fp, fn)
        if 2 * tp + fp + fn:
            assert d["dice"] == round(2 * tp / (2 * tp + fp + fn), 4)
    assert got["1"]["dice"] == round(2 * 48 / (2 * 48 + 3 + 16), 4)
    assert got["2"]["dice"] == 0.0 and got["2"]["sensitivity"] == 0.0 and got["2"]["fp"] == 16
    assert np.isnan(got["3"]["dice"]) and np.isnan(got["3"]["precision"])
    # 'all': TP / FP / FN summed over labels 1, 2, 3 (not 0)
    tp, fp, fn = 48 + 0, 3 + 16, 16 + 8
    assert got["all"]["dice"] == round(2 * tp / (2 * tp + fp + fn), 4)
    union_p, union_r = pred > 0, ref > 0
    union = 2 * (union_p & union_r).sum() / (union_p.sum() + union_r.sum())
    assert abs(union - got["all"]["dice"]) > 0.1  # a micro-average, not the union mask
    # an ignore value (not among the label values) is left out of every count, as sklearn's labels=
    ref2 = ref.copy()
    ref2[0, 0, 0] = 9
    g2 = evaluate.authors_case_metrics(pred, ref2, values)
    assert g2["1"]["fp"] == got["1"]["fp"] - 1


def test_authors_summary_nanmean_rounding_and_all_nan_zero():
    rows = [
        {
            "case": c,
            "metrics": {
                "1": dict.fromkeys(evaluate.AUTHORS_METRICS, v),
                "3": dict.fromkeys(evaluate.AUTHORS_METRICS, float("nan")),
            },
        }
        for c, v in (("a", 0.12345), ("b", float("nan")), ("c", 0.5))
    ]
    s = evaluate.authors_summary(rows, ["1", "3"])
    assert s["1"]["dice"]["mean"] == round((0.12345 + 0.5) / 2, 4) and s["1"]["dice"]["nan_excluded"] == 1
    assert s["3"]["dice"]["mean"] == 0.0 and s["3"]["dice"]["n"] == 0  # NaN in every case reports 0


# -----------------------------------------------------------------------------
# Yucca's planner: thick-slice data stored thick axis first


def test_plan_transpose_fires_for_thick_slices_only():
    wmh_like = (
        [((240, 240, 48), (0.96, 0.96, 3.0))] * 20
        + [((232, 256, 48), (0.98, 0.98, 3.0))] * 20
        + [((132, 256, 83), (1.2, 0.98, 1.2))] * 20
    )
    assert preprocess.plan_transpose(wmh_like) == [2, 0, 1]  # median sizes (232, 256, 48): the 48 first
    assert preprocess.plan_transpose([((240, 240, 155), (1.0, 1.0, 1.0))] * 5) == [0, 1, 2]  # BraTS
    assert preprocess.plan_transpose([((200, 200, 40), (1.0, 1.0, 1.4))] * 5) == [0, 1, 2]  # thin enough slices


def test_transposed_case_maps_back_to_the_same_native_grid():
    """A thick-slice case preprocessed with the plan [2, 0, 1] holds the RAS result's axes
    in that order, and to_native of either gives the same native label map."""
    data = np.zeros((30, 34, 12), np.float32)
    data[3:27, 4:30, 2:10] = np.random.default_rng(0).uniform(50, 100, (24, 26, 8))
    lab = np.zeros(data.shape, np.uint8)
    lab[10:15, 12:18, 4:7] = 1
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    img0, lab0, meta0 = preprocess.preprocess_arrays([data], aff, lab)
    img1, lab1, meta1 = preprocess.preprocess_arrays([data], aff, lab, transpose=[2, 0, 1])
    assert lab1.shape == tuple(np.array(lab0.shape)[[2, 0, 1]]) and meta1["transpose"] == [2, 0, 1]
    assert np.array_equal(lab1, lab0.transpose(2, 0, 1))
    assert np.array_equal(preprocess.to_native(lab1, meta1), preprocess.to_native(lab0, meta0))
    import torch

    logits = torch.from_numpy(np.stack([1 - lab0, lab0]).astype(np.float32))
    assert np.array_equal(
        preprocess.native_argmax(logits.permute(0, 3, 1, 2), meta1), preprocess.native_argmax(logits, meta0)
    )


# -----------------------------------------------------------------------------
# Leakage guard


def test_a_challenge_download_as_pretraining_data_leaves_its_test_cases_out(tmp_path):
    raw = tmp_path / "raw"
    wmh_tree(raw)
    out = tmp_path / "pre"
    assert preprocess.run(raw, out, workers=1, quiet=True, fmt="wmh", wmh_t1=True, pretraining=True)[2] == []
    ds = json.loads((out / "dataset.json").read_text())
    assert not ds["labelled"] and ds["left_out_test_cases"] == ["test_Singapore_50"]
    assert sorted(c["case"] for c in ds["cases"]) == [
        "training_Amsterdam_GE3T_100_FLAIR",
        "training_Amsterdam_GE3T_100_T1",
        "training_Utrecht_0_FLAIR",
        "training_Utrecht_0_T1",
    ]
    assert not (out / "labels").exists() and np.load(out / "images" / "training_Utrecht_0_T1.npy").shape[0] == 1


def test_pretraining_on_a_test_case_is_named(tmp_path, capsys):
    import pretrain

    raw = tmp_path / "raw"
    wmh_tree(raw)
    labelled, everything, clean = tmp_path / "wmh", tmp_path / "all", tmp_path / "clean"
    preprocess.run(raw, labelled, workers=1, quiet=True, fmt="wmh")
    preprocess.run(raw, everything, workers=1, quiet=True)  # the whole download as unlabelled volumes: leaks
    preprocess.run(raw, clean, workers=1, quiet=True, fmt="wmh", pretraining=True)
    import data

    assert data.leaked_test_files(everything, [labelled]) == {str(labelled): ["FLAIR.nii.gz", "wmh.nii.gz"]}
    assert data.leaked_test_files(clean, [labelled]) == {}
    assert (
        pretrain.main(
            [
                "--arch",
                "unet_b",
                "--patch",
                "32",
                "--batch",
                "1",
                "--steps",
                "1",
                "--workers",
                "0",
                "--quiet",
                "--data",
                str(everything),
                "--out",
                str(tmp_path / "run"),
                "--test-sets",
                str(labelled),
            ]
        )
        == 0
    )
    assert f"are test cases of {labelled}" in capsys.readouterr().out


def test_crop_keeps_one_voxel_past_the_foreground_by_hand():
    """Yucca's box on a 20 x 24 x 16 RAS volume whose voxels > 0 span x 5..9, y 0..23 and
    z 3..15: [5, 11), [0, 24) (the volume ends there) and [3, 16)."""
    x = np.zeros((20, 24, 16), np.float32)
    x[5:10, :, 3:16] = np.random.default_rng(0).uniform(1, 2, (5, 24, 13))
    _, _, meta = preprocess.preprocess_arrays([x], np.eye(4))
    assert meta["crop_box"] == [[5, 11], [0, 24], [3, 16]]
