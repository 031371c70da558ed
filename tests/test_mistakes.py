"""What a user's mistakes get (issue 25): each mistake is made here and its outcome
asserted -- the exit code, the one line, what is on disk, nothing lost, the right
dataset scored. Tiny runs on the session's demo data."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import bench
import data
import evaluate
import finetune
import preprocess
import pretrain
import training

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "unet_b", "--patch", "32", "--batch", "2", "--workers", "0", "--quiet", "--log-every", "1"]


def one_line(err):
    """The error output is one line, without traceback or usage block."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def ft(demo, tmp_path_factory):
    """A 2-step finetune run on the demo data, in a folder whose name has a space."""
    run = tmp_path_factory.mktemp("mistakes") / "my runs" / "ft"
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                "none",
                "--n-train",
                "2",
                "--steps",
                "2",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    return run


@pytest.fixture(scope="module")
def pre(demo, tmp_path_factory):
    """A 1-step pretraining run on the demo data."""
    run = tmp_path_factory.mktemp("mistakes_pre") / "pre"
    assert pretrain.main(TINY + ["--data", str(demo / "preprocessed"), "--out", str(run), "--steps", "1"]) == 0
    return run


def copy_dataset(demo, dst, drop=None):
    """A copy of the demo's preprocessed data, less the case `drop` (from dataset.json)."""
    shutil.copytree(demo / "preprocessed", dst)
    if drop is not None:
        ds = json.loads((dst / "dataset.json").read_text())
        ds["cases"] = [c for c in ds["cases"] if c["case"] != drop]
        (dst / "dataset.json").write_text(json.dumps(ds))
    return dst


# -----------------------------------------------------------------------------
# Defaults that could point at the wrong thing read it from the run


def test_evaluate_scores_the_runs_own_dataset_without_data(demo, ft, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no demo/preprocessed here: the old default would have failed or scored another one
    assert evaluate.main(["--run", str(ft), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0].startswith("evaluate.py: run ")
        and str(ft / "ckpt.pt") in out[0]
        and str(demo / "preprocessed") in out[0]
    )
    m = json.loads((ft / "eval" / "metrics.json").read_text())
    assert m["data"] == str((demo / "preprocessed").resolve()) and len(m["cases"]) == 2


def test_evaluate_on_another_dataset_says_so_in_one_line(demo, ft, tmp_path, capsys):
    test_cases = [c["case"] for c in data.read_dataset(demo / "preprocessed")["cases"] if c["split"] == "test"]
    other = copy_dataset(demo, tmp_path / "other", drop=test_cases[0])
    assert evaluate.main(["--run", str(ft), "--data", str(other), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "is not the dataset the run trained on" in notes[0]
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["data"] == str(other.resolve()) and [r["case"] for r in m["cases"]] == test_cases[1:]


def test_training_scripts_name_run_and_data_first(demo, ft, pre, tmp_path, capsys):
    assert finetune.main(["--out", str(ft), "--resume"]) == 0  # finished: says so, after naming what it works on
    out = capsys.readouterr().out
    assert f"finetune.py: run {ft} (resumed at step 2), data {demo / 'preprocessed'}" in out
    assert (
        pretrain.main(TINY + ["--data", str(demo / "preprocessed"), "--out", str(tmp_path / "p"), "--steps", "1"]) == 0
    )
    assert f"pretrain.py: run {tmp_path / 'p'} (new), data {demo / 'preprocessed'}" in capsys.readouterr().out


def test_next_command_quotes_a_path_with_spaces(demo, tmp_path, capsys):
    run = tmp_path / "a b" / "ft"
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                "none",
                "--n-train",
                "2",
                "--steps",
                "1",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    nxt = capsys.readouterr().out.split("next: ")[1].strip()
    assert nxt == f"python evaluate.py --run '{run}'"
    assert json.loads((run / "cases.json").read_text())["n_train"] == 2  # a number, not "2"


# -----------------------------------------------------------------------------
# --report: one row per configuration, a run counted once


def write_eval(folder, dice, **fields):
    d = folder / "eval"
    d.mkdir(parents=True)
    m = {
        "dataset": "Demo",
        "metric_set": "authors",
        "arch": "unet_b",
        "pretrained": "runs/pre/encoder.pt",
        "summary": {"all": {"dice": {"mean": dice}}},
        **fields,
    }
    (d / "metrics.json").write_text(json.dumps(m))
    return folder


def test_report_keeps_configurations_apart_and_counts_a_run_once(tmp_path, capsys):
    a = write_eval(tmp_path / "s0", 0.8, pretrained_file="/abs/runs/pre/encoder.pt", train_args={"lr": 1e-4, "seed": 0})
    b = write_eval(
        tmp_path / "s1",
        0.6,
        pretrained="./runs/pre/encoder.pt",
        pretrained_file="/abs/runs/pre/encoder.pt",
        train_args={"lr": 1e-4, "seed": 1},
    )  # the same file named another way: the same configuration
    c = write_eval(tmp_path / "s2", 0.1, pretrained_file="/abs/runs/pre/encoder.pt", train_args={"lr": 1e-2, "seed": 2})
    d = write_eval(tmp_path / "other_enc", 0.3, pretrained_file="/abs/runs/mae/encoder.pt", train_args={"lr": 1e-4})
    (tmp_path / "alias").symlink_to(a)  # the same run given twice, by two names
    assert (
        evaluate.main(
            [
                "--report",
                str(a),
                str(a / "eval"),
                str(tmp_path / "alias"),
                str(b),
                str(c),
                str(d),
                "--out",
                str(tmp_path / "rep"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    rows = list(__import__("csv").DictReader(open(tmp_path / "rep" / "report.csv")))
    by = {(r["from"], r["differs_in"]): r for r in rows}
    assert len(rows) == 3
    assert by[("/abs/runs/pre/encoder.pt", "lr 0.0001")]["runs"] == "2"  # s0 and s1 once each: mean 0.7
    assert float(by[("/abs/runs/pre/encoder.pt", "lr 0.0001")]["dice_mean"]) == pytest.approx(0.7)
    assert by[("/abs/runs/pre/encoder.pt", "lr 0.01")]["runs"] == "1"  # another learning rate: not averaged in
    assert by[("/abs/runs/mae/encoder.pt", "")]["runs"] == "1"  # another encoder: a row of its own
    assert "differ in more than the seed" in captured.err and "lr 0.01" in captured.err


def test_report_counts_a_run_evaluated_twice_once(ft, tmp_path, capsys):
    assert evaluate.main(["--run", str(ft), "--out", str(tmp_path / "e1"), "--quiet"]) == 0
    assert evaluate.main(["--run", str(ft), "--out", str(tmp_path / "e2"), "--quiet"]) == 0
    capsys.readouterr()
    assert evaluate.main(["--report", str(tmp_path / "e1"), str(tmp_path / "e2"), "--out", str(tmp_path / "rep")]) == 0
    assert "counted once" in capsys.readouterr().err
    rows = list(__import__("csv").DictReader(open(tmp_path / "rep" / "report.csv")))
    assert rows and all(r["runs"] == "1" for r in rows)


def test_report_says_when_matplotlib_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert evaluate.main(["--report", str(write_eval(tmp_path / "r", 0.5)), "--out", str(tmp_path / "rep")]) == 0
    assert capsys.readouterr().err.count("matplotlib is not installed") == 1
    assert not (tmp_path / "rep" / "report.png").exists()


# -----------------------------------------------------------------------------
# Impossible or trimmed requests are refused in one line


def test_val_cases_beyond_what_is_left(demo, tmp_path, capsys):
    out = tmp_path / "ft"  # 6 train cases: 5-shot leaves 1
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                "none",
                "--n-train",
                "5",
                "--val-cases",
                "3",
                "--steps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    line = one_line(capsys.readouterr().err)
    assert line.startswith("finetune.py: error: --val-cases 3: only 1 train case(s) are left after --n-train 5 of 6")
    assert not out.exists()


@pytest.mark.parametrize("how", ["format", "empty"])
def test_preprocess_finds_nothing(demo, tmp_path, capsys, how):
    inp = demo / "raw" if how == "format" else tmp_path / "empty"
    inp.mkdir(exist_ok=True)
    out = tmp_path / "out"
    argv = ["--input", str(inp), "--output", str(out), "--workers", "1", "--quiet"]
    assert preprocess.main(argv + (["--format", "brats21"] if how == "format" else [])) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("preprocess.py: error: --input") and "nothing written" in line
    assert ("--format brats21 found no brats21 case" in line) if how == "format" else ("no case found" in line)
    assert not (out / "dataset.json").exists()


def test_resume_with_data_of_another_case_list(demo, pre, tmp_path, capsys):
    cases = data.case_names(demo / "preprocessed")
    other = copy_dataset(demo, tmp_path / "other", drop=cases[0])
    before = (pre / "ckpt.pt").read_bytes()
    assert pretrain.main(["--out", str(pre), "--resume", "--data", str(other), "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "does not give the run its cases" in line and cases[0] in line
    assert (pre / "ckpt.pt").read_bytes() == before  # nothing lost
    same = copy_dataset(demo, tmp_path / "moved")  # a moved copy of the run's own data is welcome
    assert pretrain.main(["--out", str(pre), "--resume", "--data", str(same), "--quiet"]) == 0


def test_a_non_finite_volume_is_named_before_the_first_step(demo, tmp_path, capsys):
    bad = copy_dataset(demo, tmp_path / "bad")
    case = data.case_names(bad, "train")[1]
    x = np.load(bad / "images" / f"{case}.npy")
    x[0, 5, 5, 5] = np.nan
    np.save(bad / "images" / f"{case}.npy", x)
    assert pretrain.main(TINY + ["--data", str(bad), "--out", str(tmp_path / "p"), "--steps", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "holds NaN or inf" in line and case in line and not (tmp_path / "p" / "ckpt.pt").exists()
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(bad),
                "--pretrained",
                "none",
                "--n-train",
                "all",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 2
    )
    assert case in one_line(capsys.readouterr().err)


@pytest.mark.slow
def test_a_non_finite_volume_in_a_distributed_run(demo, tmp_path):
    """Each process checks its share; the one that finds the case tells all, so both stop."""
    bad = copy_dataset(demo, tmp_path / "bad")
    cases = sorted(data.case_names(bad, "train")) or sorted(data.case_names(bad))
    case = cases[1]  # in rank 1's share (cases[1::2])
    x = np.load(bad / "images" / f"{case}.npy")
    x[0, 5, 5, 5] = np.inf
    np.save(bad / "images" / f"{case}.npy", x)
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "pretrain.py"]
        + TINY
        + ["--data", str(bad), "--out", str(tmp_path / "p"), "--steps", "1"]
    )
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("pretrain.py: error:")]  # rank 0 alone says it
    assert r.returncode != 0 and len(said) == 1 and case in said[0] and "holds NaN or inf" in said[0], r.stderr[-2000:]
    # torchrun's report: the first rank to stop exited 2, as for a user error. The other exits 2 as well, or, on a
    # loaded machine, is still on its way out when torchrun sees the first failure: torchrun then stops it itself
    # and lists the first failure alone (or the other with its SIGTERM: 3 or -15)
    codes = re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", r.stderr, re.M)  # one per failed rank in the report
    assert 1 <= len(codes) <= 2 and "2" in codes and set(codes) <= {"2", "3", "-15"}, r.stderr[-3000:]


# -----------------------------------------------------------------------------
# User errors: one line, exit 2


def test_read_only_output_folder(demo, ft, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = preprocess.os.access
    monkeypatch.setattr(
        preprocess.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode)
    )  # root writes anyway
    for script, call in (
        (
            "pretrain.py",
            lambda: pretrain.main(
                TINY + ["--data", str(demo / "preprocessed"), "--out", str(ro / "run"), "--steps", "1"]
            ),
        ),
        (
            "finetune.py",
            lambda: finetune.main(
                TINY
                + [
                    "--data",
                    str(demo / "preprocessed"),
                    "--pretrained",
                    "none",
                    "--out",
                    str(ro / "run"),
                    "--steps",
                    "1",
                ]
            ),
        ),
        ("evaluate.py", lambda: evaluate.main(["--run", str(ft), "--out", str(ro / "eval"), "--quiet"])),
        (
            "preprocess.py",
            lambda: preprocess.main(["--input", str(demo / "raw"), "--output", str(ro / "p"), "--quiet"]),
        ),
        ("evaluate.py", lambda: evaluate.main(["--report", str(ft), "--out", str(ro / "rep")])),
    ):
        assert call() == 2, script
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"{script}: error: --out") or line.startswith(f"{script}: error: --output"), line
        assert "not writable" in line
    assert list(ro.iterdir()) == []
    # a write refused later (a read-only mount seen only when writing): still one line
    monkeypatch.undo()
    monkeypatch.setattr(
        training, "save_json", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
    )
    assert (
        pretrain.main(TINY + ["--data", str(demo / "preprocessed"), "--out", str(tmp_path / "r2"), "--steps", "1"]) == 2
    )
    assert "cannot write there (Permission denied)" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("script", [pretrain, finetune])
def test_negative_learning_rate(demo, tmp_path, capsys, script):
    init = ["--pretrained", "none"] if script is finetune else []
    with pytest.raises(SystemExit) as e:
        script.main(TINY + init + ["--data", str(demo / "preprocessed"), "--lr", "-1", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and not (tmp_path / "r").exists()
    line = one_line(capsys.readouterr().err)
    assert "--lr and --wd must be >= 0" in line and "--help" in line


def test_resume_a_run_of_the_other_script(ft, pre, capsys):
    before = (pre / "ckpt.pt").read_bytes(), (ft / "ckpt.pt").read_bytes()
    assert finetune.main(["--out", str(pre), "--resume", "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "holds a pretrain.py run, not a finetune.py one" in line and "--pretrained" in line
    assert pretrain.main(["--out", str(ft), "--resume", "--quiet"]) == 2
    assert "holds a finetune.py run, not a pretrain.py one" in one_line(capsys.readouterr().err)
    assert ((pre / "ckpt.pt").read_bytes(), (ft / "ckpt.pt").read_bytes()) == before


def models_convert(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "models.py", "convert", *map(str, args)], cwd=cwd, capture_output=True, text=True
    )


def test_models_convert_mistakes(pre, tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint\n")
    r = models_convert(junk, tmp_path / "enc.pt")
    assert (
        r.returncode == 2
        and "not a torch checkpoint" in one_line(r.stderr)
        and r.stderr.startswith("models.py: error:")
    )
    r = models_convert(pre / "encoder.pt", tmp_path / "missing" / "enc.pt")
    line = one_line(r.stderr)
    assert (
        r.returncode == 2
        and "does not exist" in line
        and str(tmp_path / "missing") in line
        and "encoder.pt:" not in line
    )
    r = models_convert(pre / "encoder.pt", tmp_path / "enc.pt")  # and the right way round still works
    assert r.returncode == 0 and (tmp_path / "enc.pt").exists(), r.stderr
    r = subprocess.run([sys.executable, "models.py", "convrt", "a", "b"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--help" in one_line(r.stderr)


def test_data_folder_that_disappears(demo, tmp_path, monkeypatch, capsys):
    gone = copy_dataset(demo, tmp_path / "gone")
    read = data.SegDataset.__getitem__

    def vanish(self, k):  # the folder is removed (or unmounted) while the run reads it
        shutil.rmtree(gone, ignore_errors=True)
        return read(self, k)

    monkeypatch.setattr(data.SegDataset, "__getitem__", vanish)
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(gone),
                "--pretrained",
                "none",
                "--n-train",
                "2",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "ft"),
            ]
        )
        == 2
    )
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"finetune.py: error: --data {gone} disappeared during the run") and "--resume" in line


def test_argparse_errors_are_one_line_with_a_pointer_to_help(capsys):
    for main, argv in (
        (pretrain.main, ["--arch", "nope"]),
        (finetune.main, ["--batch", "x"]),
        (evaluate.main, ["--run"]),
        (preprocess.main, ["--bogus"]),
        (bench.main, ["models", "--patch", "8"]),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        line = one_line(capsys.readouterr().err)
        assert ": error: " in line and "--help" in line, line


# -----------------------------------------------------------------------------
# Misleading lines


def test_a_random_file_as_pretrained(demo, tmp_path, capsys):
    junk = tmp_path / "random.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(3000))
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                str(junk),
                "--n-train",
                "2",
                "--out",
                str(tmp_path / "f"),
            ]
        )
        == 2
    )
    line = one_line(capsys.readouterr().err)
    assert "not a readable checkpoint" in line and "PyTorch 2.6" not in line and line.endswith("released weights file")


def test_a_label_on_a_shifted_affine(demo, tmp_path):
    case = sorted((demo / "raw" / "labelsTr").iterdir())[0]
    lab = nib.load(case)
    aff = lab.affine.copy()
    aff[:3, 3] += 2.0
    shifted = tmp_path / case.name
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), aff), shifted)
    img = demo / "raw" / "imagesTr" / case.name.replace(".nii.gz", "_0000.nii.gz")
    c = {
        "case": "x",
        "files": [str(img)],
        "label": str(shifted),
        "split": "train",
        "root": str(demo / "raw"),
        "transpose": [0, 1, 2],
    }
    with pytest.raises(preprocess.CaseError) as e:
        preprocess.process_case(c, tmp_path / "out", None)
    assert "the image's shape but another affine" in str(e.value) and "has shape" not in str(e.value)


def test_pretrain_on_raw_data(demo, tmp_path, capsys):
    assert pretrain.main(TINY + ["--data", str(demo / "raw"), "--out", str(tmp_path / "p"), "--steps", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "is raw data" in line and "preprocess it first" in line and "failed.json" not in line


def test_evaluate_best_of_a_run_without_validation(ft, capsys):
    assert evaluate.main(["--run", str(ft), "--checkpoint", "best", "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "has no best.pt: it was trained without --val-cases" in line and "run folder" not in line


def test_evaluate_a_pretraining_run(pre, capsys):
    assert evaluate.main(["--run", str(pre), "--quiet"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "is a pretrain.py run: finetune its encoder.pt first" in line


# -----------------------------------------------------------------------------
# args.json keeps the first invocation


def test_args_json_keeps_the_first_invocation_and_appends_resumes(demo, tmp_path):
    run = tmp_path / "p"
    assert (
        pretrain.main(
            TINY + ["--data", str(demo / "preprocessed"), "--out", str(run), "--steps", "2", "--ckpt-every", "1"]
        )
        == 0
    )
    first = json.loads((run / "args.json").read_text())
    assert first["workers"] == 0 and first["resumes"] == []
    assert pretrain.main(["--out", str(run), "--resume", "--quiet", "--workers", "1", "--grad-clip", "3"]) == 0
    now = json.loads((run / "args.json").read_text())
    assert {k: v for k, v in now.items() if k != "resumes"} == {k: v for k, v in first.items() if k != "resumes"}
    assert len(now["resumes"]) == 1 and now["resumes"][0]["given"]["workers"] == 1
    assert now["resumes"][0]["given"]["grad_clip"] == 3.0 and "time" in now["resumes"][0]


# -----------------------------------------------------------------------------
# Smaller things


def test_smaller_things():
    assert any(ln.startswith("scipy") for ln in (ROOT / "requirements.txt").read_text().splitlines())
    assert "report/" in (ROOT / ".gitignore").read_text().splitlines()
    a = bench.get_args(["models", "--arch", "unet_b"])
    assert a.device == ("cuda" if torch.cuda.is_available() else "cpu") and a.dtype in ("bf16", "fp32")
    assert "DataLoader worker processes per training process, 0 =" in (ROOT / "training.py").read_text()
    assert "DataLoader worker process counts" in (ROOT / "bench.py").read_text()
