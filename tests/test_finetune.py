"""finetune.py and the chain pretrain -> finetune -> evaluate on the demo data."""

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate
import finetune
import pretrain
import training

TINY = ["--arch", "unet_b", "--patch", "32", "--batch", "2", "--workers", "0", "--quiet", "--log-every", "1"]


@pytest.fixture(scope="module")
def encoder(demo, tmp_path_factory):
    run = tmp_path_factory.mktemp("pre") / "run"
    assert pretrain.main(TINY + ["--data", str(demo / "preprocessed"), "--out", str(run), "--steps", "2"]) == 0
    return run / "encoder.pt"


def test_paper_defaults():
    a = finetune.get_args(["--pretrained", "none"])
    assert (
        a.epochs,
        a.steps_per_epoch,
        a.batch,
        a.patch,
        a.lr,
        a.wd,
        a.t_max,
        a.eta_min,
        a.fg_p,
        a.loss,
        a.n_train,
    ) == (500, 100, 8, 128, 1e-4, 3e-5, 575, 1e-9, 0.33, "dice_ce", "20")
    assert a.aug == "all"  # from scratch: the full recipe
    a.lr = 1e-4
    assert finetune.lr_at(0, 100, 500, 50000, a) == pytest.approx(1e-4)
    assert finetune.lr_at(99, 100, 500, 50000, a) == pytest.approx(1e-4)  # stepped per epoch
    for e in (1, 230, 499):  # epoch e of 500, cosine with T_max 575 epochs, eta_min 1e-9
        want = 1e-9 + (1e-4 - 1e-9) * (1 + math.cos(math.pi * e / 575)) / 2
        assert finetune.lr_at(e * 100 + 7, 100, 500, 50000, a) == pytest.approx(want)


def test_seg_loss():
    seg = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    seg[:, 2:5, 2:5, 2:5] = 1
    perfect = torch.nn.functional.one_hot(seg, 2).movedim(-1, 1).float() * 40 - 20
    assert finetune.seg_loss(perfect, seg).item() == pytest.approx(0, abs=1e-3)
    # soft Dice by hand for uniform predictions (p = 0.5 everywhere), smooth 1
    flat = torch.zeros(2, 2, 8, 8, 8)
    n1 = 27
    d0 = (2 * 0.5 * (512 - n1) + 1) / (0.5 * 512 + (512 - n1) + 1)
    d1 = (2 * 0.5 * n1 + 1) / (0.5 * 512 + n1 + 1)
    assert finetune.seg_loss(flat, seg, "dice").item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-5)
    assert finetune.seg_loss(flat, seg, "ce").item() == pytest.approx(math.log(2), rel=1e-5)


@pytest.mark.slow
def test_chain_predictions_in_native_space(demo, encoder, tmp_path, capsys):
    ft = tmp_path / "ft"
    args = TINY + [
        "--data",
        str(demo / "preprocessed"),
        "--pretrained",
        str(encoder),
        "--n-train",
        "3",
        "--val-cases",
        "1",
        "--steps",
        "4",
        "--steps-per-epoch",
        "2",
        "--val-every",
        "1",
        "--out",
        str(ft),
    ]
    assert finetune.main(args) == 0
    said = capsys.readouterr().out
    n_enc = len(torch.load(encoder, weights_only=True)["encoder"])
    assert f"{n_enc} encoder tensors loaded" in said and "decoder" in said and "freshly initialised" in said
    cases = json.loads((ft / "cases.json").read_text())
    assert len(cases["train"]) == 3 and len(cases["val"]) == 1 and not set(cases["val"]) & set(cases["train"])
    test_cases = [
        c["case"]
        for c in json.loads((demo / "preprocessed" / "dataset.json").read_text())["cases"]
        if c["split"] == "test"
    ]
    assert not set(cases["val"]) & set(test_cases)
    assert (ft / "best.pt").exists() and any("val_dice" in ln for ln in (ft / "log.jsonl").read_text().splitlines())

    assert evaluate.main(["--run", str(ft), "--data", str(demo / "preprocessed"), "--quiet"]) == 0
    out = ft / "eval"
    m = json.loads((out / "metrics.json").read_text())
    assert [r["case"] for r in m["cases"]] == test_cases and m["metric_set"] == "authors"
    assert set(m["summary"]) == {"0", "1", "all"} and (out / "metrics.csv").read_text().startswith("case,label,dice")
    per_case = {}
    for case in test_cases:
        raw = nib.load(demo / "raw" / "imagesTr" / f"{case}_0000.nii.gz")
        pred = nib.load(out / "predictions" / f"{case}.nii.gz")
        assert pred.shape == raw.shape and np.allclose(pred.affine, raw.affine)
        assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(raw.affine)
        assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1}
        # the authors' evaluator (amaes src/evaluator.py process_case) on the files, with sklearn as theirs
        from sklearn.metrics import confusion_matrix

        gt = nib.load(demo / "raw" / "labelsTr" / f"{case}.nii.gz")
        cm = confusion_matrix(
            np.around(gt.get_fdata().flatten()).astype(int),
            np.around(pred.get_fdata().flatten()).astype(int),
            labels=[0, 1],
        )
        tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
        with np.errstate(invalid="ignore"):
            per_case[case] = round(2 * tp / (2 * tp + fp + fn), 4)
    for r in m["cases"]:
        assert r["metrics"]["1"]["dice"] == per_case[r["case"]] == r["metrics"]["all"]["dice"]
    with np.errstate(all="ignore"):
        assert m["summary"]["1"]["dice"]["mean"] == round(np.nanmean(list(per_case.values())), 4)
    assert (
        evaluate.main(
            [
                "--run",
                str(ft),
                "--data",
                str(demo / "preprocessed"),
                "--quiet",
                "--metrics",
                "challenge",
                "--out",
                str(tmp_path / "challenge"),
            ]
        )
        == 0
    )
    assert "lesion" in json.loads((tmp_path / "challenge" / "metrics.json").read_text())["summary"]  # by name

    # raw scans that were never preprocessed
    new = tmp_path / "new"
    new.mkdir()
    for case in test_cases[:2]:
        shutil.copy(demo / "raw" / "imagesTr" / f"{case}_0000.nii.gz", new)
    assert evaluate.main(["--run", str(ft), "--images", str(new), "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    for case in test_cases[:2]:
        pred = nib.load(tmp_path / "pred" / "predictions" / f"{case}.nii.gz")
        raw = nib.load(new / f"{case}_0000.nii.gz")
        assert pred.shape == raw.shape and np.allclose(pred.affine, raw.affine)
        same = nib.load(out / "predictions" / f"{case}.nii.gz")
        assert np.array_equal(np.asanyarray(pred.dataobj), np.asanyarray(same.dataobj))  # same recipe on the fly


def test_transfer_is_exact_and_bad_encoders_are_named(demo, encoder, tmp_path, capsys):
    base = TINY + ["--data", str(demo / "preprocessed"), "--n-train", "2", "--val-cases", "0", "--steps", "1"]
    model = finetune.train(
        finetune.get_args(base + ["--pretrained", str(encoder), "--lr", "0", "--out", str(tmp_path / "a")])
    )
    enc = torch.load(encoder, weights_only=True)["encoder"]
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in enc.items())
    assert finetune.main(base + ["--arch", "unet_xl", "--pretrained", str(encoder), "--out", str(tmp_path / "b")]) == 2
    assert "holds unet_b weights, but --arch is unet_xl" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert finetune.main(base + ["--pretrained", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "junk.pt" in err and "not a readable checkpoint" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        finetune.get_args(base + ["--pretrained", str(tmp_path / "missing.pt")])
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.get_args(base)
    assert "--pretrained is required" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_is_exact(demo, encoder, tmp_path, monkeypatch):
    args = TINY + [
        "--data",
        str(demo / "preprocessed"),
        "--pretrained",
        str(encoder),
        "--n-train",
        "3",
        "--val-cases",
        "1",
        "--steps",
        "6",
        "--steps-per-epoch",
        "2",
        "--val-every",
        "2",
        "--ckpt-every",
        "3",
    ]
    assert finetune.main(args + ["--out", str(tmp_path / "straight")]) == 0
    save = training.save_checkpoint

    def killed_at_step_3(obj, path, keep_prev=True):
        save(obj, path, keep_prev)
        if path.name == "ckpt.pt" and obj["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(args + ["--out", str(tmp_path / "split")])
    monkeypatch.setattr(training, "save_checkpoint", save)
    assert finetune.main(["--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0

    def log(run):
        return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]

    strip = [
        {k: v for k, v in r.items() if k not in ("samples_per_s", "data_wait")} for r in log(tmp_path / "straight")
    ]
    assert strip == [
        {k: v for k, v in r.items() if k not in ("samples_per_s", "data_wait")} for r in log(tmp_path / "split")
    ]
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_run_reads_only_its_n_labelled_cases_and_evaluates_the_last_weights(
    demo, tmp_path, monkeypatch, capsys
):
    """The paper's protocol: --n-train 3 reads the labels of exactly those 3 cases (no
    validation cases, no best.pt), cases.json says so, and evaluate.py uses ckpt.pt."""
    read = []
    real = np.load

    def tracing(path, *args, **kwargs):
        read.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", tracing)
    ft = tmp_path / "ft"
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                "none",
                "--n-train",
                "3",
                "--steps",
                "4",
                "--out",
                str(ft),
            ]
        )
        == 0
    )
    monkeypatch.undo()
    cases = json.loads((ft / "cases.json").read_text())
    assert len(cases["train"]) == 3 and cases["val"] == [] and cases["labelled_cases_read"] == cases["train"]
    labels_read = {p.stem for p in read if p.parent.name == "labels"}
    assert labels_read == set(cases["train"])
    assert not (ft / "best.pt").exists()
    capsys.readouterr()
    assert evaluate.main(["--run", str(ft), "--data", str(demo / "preprocessed"), "--quiet"]) == 0
    assert f"from {ft / 'ckpt.pt'}" in capsys.readouterr().out
