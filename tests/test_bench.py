"""bench.py models / train: rows as documented, FLOPs against the figures counted at 128^3."""

import json

import pytest

import bench


def rows(out):
    return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]


def test_models_flops_match_the_reference(capsys):
    assert (
        bench.main(
            [
                "models",
                "--arch",
                "unet_b",
                "swinunetr",
                "--patch",
                "32",
                "--batch",
                "1",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    got = {r["bench"]: r for r in rows(capsys.readouterr().out)}
    # FlopCounterMode at 128^3: 1.55 / 2.85 TFLOP per sample, forward + backward; FLOPs scale with voxels (1/64 at 32^3)
    assert got["models/unet_b/pretrain"]["tflop_per_sample"] == pytest.approx(1.55 / 64, rel=0.03)
    assert got["models/unet_b/seg"]["tflop_per_sample"] == pytest.approx(2.85 / 64, rel=0.03)
    assert "skipped" in got["models/swinunetr/seg"]  # needs 64^3
    assert got["models/unet_b/seg"]["samples_per_s"] > 0 and got["models/unet_b/seg"]["repeats"] == 1


def test_train_reads_pretrain_logs(demo, capsys):
    assert (
        bench.main(
            [
                "train",
                "--arch",
                "unet_b",
                "--data",
                str(demo / "preprocessed"),
                "--patch",
                "32",
                "--batch",
                "1",
                "--steps",
                "4",
                "--log-every",
                "2",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    (r,) = rows(capsys.readouterr().out)
    assert r["bench"] == "train/unet_b/amaes" and r["repeats"] == 1 and 0 <= r["data_wait"] <= 1 and r["median"] > 0


def test_data_rows_per_preset_and_driver(demo, capsys):
    assert (
        bench.main(
            [
                "data",
                "--data",
                str(demo / "preprocessed"),
                "--patch",
                "16",
                "--batch",
                "2",
                "--presets",
                "none",
                "all",
                "--workers",
                "1",
                "2",
                "--samples",
                "2",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    got = {r["bench"]: r for r in rows(capsys.readouterr().out)}
    for preset in ("none", "all"):
        for what in (
            "torchio driver, 1 process",
            "read + crop-pad, 1 process",
            "batched on cpu, batch 2",
            "torchio driver, 2 workers",
        ):
            r = got.pop(f"data/{preset}/{what}")
            assert r["unit"] == "samples/s" and r["median"] > 0 and r["repeats"] == 1
    assert got.pop("mask/batch 2")["unit"] == "ms"
    assert not got  # no other rows (no CUDA here, no --authors)


def test_preprocess_rows_per_file_and_bad_input(demo, tmp_path, capsys):
    assert bench.main(["preprocess", "--input", str(demo / "raw"), "--files", "2", "--repeats", "1"]) == 0
    got = rows(capsys.readouterr().out)
    assert len(got) == 2 and all(
        r["bench"].startswith("preprocess/ours/") and r["unit"] == "s/volume" and r["median"] > 0 for r in got
    )
    assert bench.main(["preprocess", "--input", str(tmp_path)]) == 2
    assert "no NIfTI files" in capsys.readouterr().err


def test_pictures_rows(capsys):
    assert bench.main(["pictures", "--patch", "16", "--log-lines", "5", "--repeats", "1"]) == 0
    got = rows(capsys.readouterr().out)
    assert [r["bench"].split(",")[0] for r in got] == [
        "pictures/pretrain validation PNG",
        "pictures/progress.png",
        "pictures/evaluation case PNG",
    ]
    assert all(r["unit"] == "ms" and r["median"] > 0 for r in got)
