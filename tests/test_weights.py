"""Released pretrained weights: each format built here with its exact key names and
shapes (written from the authors' code: amaes src/models/networks, nnssl's ResEnc-L in
dynamic-network-architectures, MONAI's SwinUNETR / SSLHead), loaded by finetune.py and
pretrain.py, compared with the reference implementation where it is installed (MONAI;
dynamic-network-architectures, which is not a test requirement: it pulls another torch),
and every way a file can be wrong."""

import json
import pickle

import pytest
import torch

import finetune
import models
import pretrain
import training
from models import build_model

TINY = [
    "--patch",
    "32",
    "--batch",
    "1",
    "--workers",
    "0",
    "--quiet",
    "--log-every",
    "1",
    "--steps",
    "1",
    "--lr",
    "0",
    "--n-train",
    "2",
]


def amaes_unet_state(width=32, prefix="model."):
    """AMAES U-Net encoder + lightweight decoder keys (amaes src/models/networks/unet.py:
    in_conv / encoder_conv1-4, each conv1 / conv2 of conv + InstanceNorm; rec_head)."""
    g = torch.Generator().manual_seed(0)
    chans = [width * 2**i for i in range(5)]
    state = {}
    for i, (ci, co) in enumerate(zip([1] + chans[:-1], chans)):
        name = "in_conv" if i == 0 else f"encoder_conv{i}"
        for j, cin in ((1, ci), (2, co)):
            state[f"{prefix}encoder.{name}.conv{j}.conv.weight"] = torch.randn(co, cin, 3, 3, 3, generator=g)
            for p in ("conv.bias", "norm.weight", "norm.bias"):
                state[f"{prefix}encoder.{name}.conv{j}.{p}"] = torch.randn(co, generator=g)
    for i in range(1, 5):
        hi, lo = chans[5 - i], chans[4 - i]
        state[f"{prefix}rec_head.upsample{i}.weight"] = torch.randn(hi, lo, 2, 2, 2, generator=g)
        state[f"{prefix}rec_head.upsample{i}.bias"] = torch.randn(lo, generator=g)
        state[f"{prefix}rec_head.decoder_conv{i}.conv1.conv.weight"] = torch.randn(lo, lo, 3, 3, 3, generator=g)
        for p in ("conv.bias", "norm.weight", "norm.bias"):
            state[f"{prefix}rec_head.decoder_conv{i}.conv1.{p}"] = torch.randn(lo, generator=g)
    state[f"{prefix}rec_head.out_conv.weight"] = torch.randn(1, width, 1, 1, 1, generator=g)
    state[f"{prefix}rec_head.out_conv.bias"] = torch.randn(1, generator=g)
    return state


def amaes_mednext_state(blocks=(3, 4, 4, 4, 4), exp=(2, 3, 4, 4, 4)):
    """AMAES MedNeXt encoder keys (amaes src/models/networks/mednext.py: stem,
    enc_block_0-3, down_0-3 (exp_r of the level below), bottleneck; blocks of conv1
    (depthwise), norm (GroupNorm), conv2, conv3, res_conv in down blocks)."""
    g = torch.Generator().manual_seed(1)
    s = {
        "model.encoder.stem.weight": torch.randn(32, 1, 1, 1, 1, generator=g),
        "model.encoder.stem.bias": torch.randn(32, generator=g),
    }

    def block(name, c, r, cout=None, down=False):
        cout = cout or c
        s[f"{name}.conv1.weight"], s[f"{name}.conv1.bias"] = (
            torch.randn(c, 1, 3, 3, 3, generator=g),
            torch.randn(c, generator=g),
        )
        s[f"{name}.norm.weight"], s[f"{name}.norm.bias"] = torch.randn(c, generator=g), torch.randn(c, generator=g)
        s[f"{name}.conv2.weight"], s[f"{name}.conv2.bias"] = (
            torch.randn(r * c, c, 1, 1, 1, generator=g),
            torch.randn(r * c, generator=g),
        )
        s[f"{name}.conv3.weight"], s[f"{name}.conv3.bias"] = (
            torch.randn(cout, r * c, 1, 1, 1, generator=g),
            torch.randn(cout, generator=g),
        )
        if down:
            s[f"{name}.res_conv.weight"] = torch.randn(cout, c, 1, 1, 1, generator=g)
            s[f"{name}.res_conv.bias"] = torch.randn(cout, generator=g)

    for lvl in range(5):
        c = 32 * 2**lvl
        if lvl:
            block(f"model.encoder.down_{lvl - 1}", c // 2, exp[lvl], c, down=True)
        for b in range(blocks[lvl]):
            block(f"model.encoder.{'bottleneck' if lvl == 4 else f'enc_block_{lvl}'}.{b}", c, exp[lvl])
    # mednext_*3_lw_dec sets rec_head = light_weight_decoder(starting_filters=32): U-Net B's lightweight decoder
    s.update({k: v for k, v in amaes_unet_state(32).items() if k.startswith("model.rec_head.")})
    return s


def nnssl_file(network_weights):
    """The dict an nnssl / OpenMind checkpoint holds around its ResidualEncoderUNet weights."""
    plan = {
        "architecture_plans": {"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": None},
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": [160, 160, 160],
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv"],
    }
    return {
        "network_weights": network_weights,
        "nnssl_adaptation_plan": plan,
        "trainer_name": "BaseMAETrainer_BS8",
        "current_epoch": 1000,
    }


def nnssl_resenc_state():
    """nnssl / OpenMind ResEnc-L (dynamic-network-architectures ResidualEncoderUNet,
    nnssl architecture_registry.get_res_enc_l), with its aliases: every
    conv-norm block also under all_modules.0 / .1, and the decoder's copy of the encoder."""
    g = torch.Generator().manual_seed(2)
    feats, blocks = [32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6]
    s = {}

    def cnr(name, cin, cout, k=3, bias=True):
        w = torch.randn(cout, cin, k, k, k, generator=g) * 0.05
        s[f"{name}.conv.weight"] = s[f"{name}.all_modules.0.weight"] = w
        if bias:
            s[f"{name}.conv.bias"] = s[f"{name}.all_modules.0.bias"] = torch.randn(cout, generator=g) * 0.05
        s[f"{name}.norm.weight"] = s[f"{name}.all_modules.1.weight"] = 1 + torch.randn(cout, generator=g) * 0.05
        s[f"{name}.norm.bias"] = s[f"{name}.all_modules.1.bias"] = torch.randn(cout, generator=g) * 0.05

    cnr("encoder.stem.convs.0", 1, 32)
    cin = 32
    for st, (c, n) in enumerate(zip(feats, blocks)):
        for b in range(n):
            name = f"encoder.stages.{st}.blocks.{b}"
            cnr(f"{name}.conv1", cin if b == 0 else c, c)
            cnr(f"{name}.conv2", c, c)
            if b == 0 and cin != c:
                cnr(f"{name}.skip.1", cin, c, k=1, bias=False)  # after the AvgPool3d of a strided block
        cin = c
    for k in [k for k in s if k.startswith("encoder.")]:
        s["decoder." + k] = s[k]
    for i, (hi, lo) in enumerate(zip(feats[:0:-1], feats[-2::-1])):
        s[f"decoder.transpconvs.{i}.weight"] = torch.randn(hi, lo, 2, 2, 2, generator=g) * 0.05
        s[f"decoder.transpconvs.{i}.bias"] = torch.randn(lo, generator=g) * 0.05
        cnr(f"decoder.stages.{i}.convs.0", 2 * lo, lo)
        s[f"decoder.seg_layers.{i}.weight"] = torch.randn(1, lo, 1, 1, 1, generator=g)
        s[f"decoder.seg_layers.{i}.bias"] = torch.randn(1, generator=g)
    return nnssl_file(s)


def legacy_monai(monkeypatch):
    """MONAI's SwinUNETR with the PatchMerging order of MONAI 0.9 .. 1.4 (before PR 8285),
    written out from that code: x0..x7 = (0,0,0) (1,0,0) (0,1,0) (0,0,1) (1,0,1) (0,1,0) (0,0,1) (1,1,1)."""
    swin = pytest.importorskip("monai.networks.nets.swin_unetr")

    def old_forward(self, x):
        x = torch.nn.functional.pad(x, (0, 0, 0, x.shape[3] % 2, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        parts = [
            x[:, 0::2, 0::2, 0::2],
            x[:, 1::2, 0::2, 0::2],
            x[:, 0::2, 1::2, 0::2],
            x[:, 0::2, 0::2, 1::2],
            x[:, 1::2, 0::2, 1::2],
            x[:, 0::2, 1::2, 0::2],
            x[:, 0::2, 0::2, 1::2],
            x[:, 1::2, 1::2, 1::2],
        ]
        return self.reduction(self.norm(torch.cat(parts, -1)))

    monkeypatch.setattr(swin.PatchMerging, "forward", old_forward)
    return swin


def hidden(ref_vit, ours_enc, x):
    with torch.no_grad():
        a = ref_vit(x, normalize=True)
        b = ours_enc(x)[1:]
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(a, b))


# -----------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True])
def test_amaes_unet_release_through_finetune(demo, tmp_path, compiled):
    state = amaes_unet_state(prefix="model._orig_mod." if compiled else "model.")
    torch.save(state, tmp_path / "unet_b_lw_dec_fullaug.pth")
    out = tmp_path / "ft"
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                str(tmp_path / "unet_b_lw_dec_fullaug.pth"),
                "--out",
                str(out),
            ]
        )
        == 0
    )  # no --arch: taken from the file
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["arch"] == "unet_b"
    m = ck["model"]
    p = "model._orig_mod." if compiled else "model."
    pairs = {
        "encoder.stages.0.0.conv.weight": "encoder.in_conv.conv1.conv.weight",  # hand-written correspondences
        "encoder.stages.0.1.norm.bias": "encoder.in_conv.conv2.norm.bias",
        "encoder.stages.3.0.conv.weight": "encoder.encoder_conv3.conv1.conv.weight",
        "encoder.stages.4.1.norm.weight": "encoder.encoder_conv4.conv2.norm.weight",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(m[ours], state[p + theirs]), ours
    enc = {k: v for k, v in m.items() if k.startswith("encoder.")}
    assert len(enc) == 40 and all(any(torch.equal(v, t) for t in state.values()) for v in enc.values())


def test_amaes_mednext_release_into_pretrain_init(demo, tmp_path, capsys):
    torch.save(amaes_mednext_state(), tmp_path / "mednext_m3_lw_dec_fullaug.pth")
    pre = training.load_pretrained_file(tmp_path / "mednext_m3_lw_dec_fullaug.pth", "--init")
    assert pre["format"] == "amaes" and pre["arch"] == "mednext_m" and pre["in_channels"] == 1
    model = build_model("mednext_m", 1, mode="pretrain")
    fresh = pretrain.load_weights_by_name(model, pre, "x")
    assert not fresh  # the whole encoder and the lightweight decoder came from the file
    s = amaes_mednext_state()
    assert torch.equal(model.decoder.out.weight, s["model.rec_head.out_conv.weight"])
    assert torch.equal(model.encoder.stages[1][0].res_conv.weight, s["model.encoder.down_0.res_conv.weight"])
    assert torch.equal(model.encoder.stages[2][2].conv2.weight, s["model.encoder.enc_block_2.1.conv2.weight"])
    assert torch.equal(model.encoder.stages[4][4].conv3.bias, s["model.encoder.bottleneck.3.conv3.bias"])
    l_state = amaes_mednext_state(blocks=(3, 4, 8, 8, 8), exp=(3, 4, 8, 8, 8))
    assert models.read_pretrained(l_state)["arch"] == "mednext_l"


@pytest.mark.slow
def test_nnssl_resenc_release(demo, tmp_path):
    ck = nnssl_resenc_state()
    torch.save(ck, tmp_path / "openmind_resenc_l.pt")
    out = tmp_path / "ft"
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                str(tmp_path / "openmind_resenc_l.pt"),
                "--patch",
                "64",
                "--no-preflight",  # its measurement is one more 64^3 step; test_preflight.py tests it
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    s = ck["network_weights"]
    pairs = {
        "encoder.stem.conv.weight": "encoder.stem.convs.0.conv.weight",
        "encoder.stages.1.0.conv2.1.bias": "encoder.stages.1.blocks.0.conv2.norm.bias",
        "encoder.stages.2.0.skip.1.weight": "encoder.stages.2.blocks.0.skip.1.conv.weight",
        "encoder.stages.2.0.skip.2.weight": "encoder.stages.2.blocks.0.skip.1.norm.weight",
        "encoder.stages.5.5.conv1.conv.weight": "encoder.stages.5.blocks.5.conv1.conv.weight",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(m[ours], s[theirs]), ours
    enc = [k for k in m if k.startswith("encoder.")]
    assert len(enc) == len({k for k in s if k.startswith("encoder.") and "all_modules" not in k})
    pre = models.read_pretrained(ck)  # the whole network maps, decoder included, for pretrain --init
    assert pre["arch"] == "resenc_l" and {k for k in pre["model"] if k.startswith("decoder.")} == {
        k for k in build_model("resenc_l", 1, mode="pretrain").state_dict() if k.startswith("decoder.")
    }


def test_nnssl_resenc_release_equals_dynamic_network_architectures(tmp_path):
    """Where dynamic-network-architectures is installed (not in requirements-dev.txt: its
    timm / torchvision dependencies pull another torch), the OpenMind file written from
    its ResidualEncoderUNet (nnssl architecture_registry.get_res_enc_l's settings) gives
    the same encoder features in the kit's ResEnc-L."""
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    torch.manual_seed(6)
    ref = dna.ResidualEncoderUNet(
        input_channels=1,
        n_stages=6,
        features_per_stage=[32, 64, 128, 256, 320, 320],
        conv_op=torch.nn.Conv3d,
        kernel_sizes=3,
        strides=[1, 2, 2, 2, 2, 2],
        n_blocks_per_stage=[1, 3, 4, 6, 6, 6],
        num_classes=1,
        n_conv_per_stage_decoder=1,
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    ).eval()
    with torch.no_grad():  # non-trivial norm affines, so a swapped weight / bias would show
        for m in ref.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ck = nnssl_file(ref.state_dict())
    torch.save(ck, tmp_path / "openmind_resenc_l.pt")
    pre = training.load_pretrained_file(tmp_path / "openmind_resenc_l.pt", "--pretrained")
    assert pre["format"] == "nnssl" and pre["arch"] == "resenc_l"
    ours = build_model("resenc_l", 1, 2).eval()
    models.load_encoder(ours, pre)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        want, got = ref.encoder(x), ours.encoder(x)
    assert len(want) == len(got) == 6
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(want, got)) <= 1e-5
    mine = build_model("resenc_l", 1, 1, mode="pretrain").eval()  # the whole network, decoder too (pretrain --init)
    assert not pretrain.load_weights_by_name(mine, pre, "x")
    with torch.no_grad():
        assert ((mine(x) - ref(x)).abs().max() / ref(x).abs().max()).item() <= 1e-5


@pytest.mark.slow
def test_tang_model_swinvit_release_equals_monai_with_the_old_merging(demo, tmp_path, monkeypatch, capsys):
    swin = legacy_monai(monkeypatch)
    torch.manual_seed(3)
    ref = swin.SwinUNETR(in_channels=1, out_channels=2, feature_size=48, use_v2=False).eval()
    vit = {
        "module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
        for k, v in ref.swinViT.state_dict().items()
    }
    vit["module.norm.weight"], vit["module.norm.bias"] = (
        torch.ones(768),
        torch.zeros(768),
    )  # the release's extra LayerNorm
    torch.save({"state_dict": vit, "epoch": 100}, tmp_path / "model_swinvit.pt")
    out = tmp_path / "ft"
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                str(tmp_path / "model_swinvit.pt"),
                "--patch",
                "64",
                "--no-preflight",  # its measurement is one more 64^3 step; test_preflight.py tests it
                "--out",
                str(out),
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert "MONAI SwinUNETR-SSL" in said and "not used from the file: 2 tensors (module.norm)" in said
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["legacy_merge"] is True
    ours = build_model("swinunetr", 1, 2, legacy_merge=True).eval()
    ours.load_state_dict(ck["model"])
    assert hidden(ref.swinViT, ours.encoder, torch.randn(1, 1, 64, 64, 64)) <= 1e-5


def test_brainsegfounder_two_channel_release_into_a_four_channel_task(tmp_path, monkeypatch):
    swin = legacy_monai(monkeypatch)
    torch.manual_seed(4)
    ref = swin.SwinUNETR(in_channels=2, out_channels=2, feature_size=48, use_v2=False).eval()
    heads = build_model("swinunetr", 2, mode="pretrain").decoder.state_dict()  # rotation / contrastive / vae conv heads
    state = {"module.swinViT." + k: v for k, v in ref.swinViT.state_dict().items()}
    state.update({"module." + k: v for k, v in heads.items()})
    torch.save({"global_step": 10, "epoch": 1, "state_dict": state, "optimizer": {}}, tmp_path / "bsf.pt")
    pre = training.load_pretrained_file(tmp_path / "bsf.pt", "--pretrained")
    assert (pre["format"], pre["arch"], pre["in_channels"], pre["legacy_merge"]) == (
        "brainsegfounder",
        "swinunetr",
        2,
        True,
    )
    two = build_model("swinunetr", 2, 2, legacy_merge=True).eval()
    models.load_encoder(two, pre)
    assert hidden(ref.swinViT, two.encoder, torch.randn(1, 2, 64, 64, 64)) <= 1e-5
    four = build_model("swinunetr", 4, 3, legacy_merge=True)
    rep = models.load_encoder(four, pre)
    # BrainSegFounder's 4-channel finetuning (main_FinetuningSwinUNETR_4Channels.py) replaces the whole conv
    assert (
        rep["fresh"] == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
        and "patch_embed.norm.weight" not in rep["fresh"]
    )
    # a file saved from one process (no DistributedDataParallel "module." prefix) is the same format
    plain = models.read_pretrained({"state_dict": {k[len("module.") :]: v for k, v in state.items()}})
    assert plain["format"] == "brainsegfounder" and plain["model"].keys() == pre["model"].keys()
    assert all(
        k.startswith(("decoder.rotation_head", "decoder.contrastive_head", "decoder.conv")) for k in rep["unused"]
    )
    assert models.load_encoder(build_model("swinunetr", 4, 3, legacy_merge=True), pre, adapt_stem=True)["adapted"] == [
        "patch_embed.proj.weight"
    ]


def test_legacy_patch_merging_equals_the_old_monai_and_default_equals_the_new(monkeypatch):
    """models.py's SwinUNETR against the public implementation (MONAI's), key for key and output for output,
    with today's PatchMerging and with the one Tang's and BrainSegFounder's weights were trained with."""
    swin = pytest.importorskip("monai.networks.nets.swin_unetr")
    torch.manual_seed(5)
    x = torch.randn(1, 1, 64, 64, 96)  # 96: padded windows and a mix of shifted/unshifted axes
    new = swin.SwinUNETR(in_channels=1, out_channels=2, feature_size=48, use_v2=False).eval()
    mapped = {models.swinunetr_key_map(k): v for k, v in new.state_dict().items()}
    ours_new = build_model("swinunetr", 1, 2).eval()
    assert set(mapped) == set(ours_new.state_dict())
    ours_new.load_state_dict(mapped)
    ours_old = build_model("swinunetr", 1, 2, legacy_merge=True).eval()
    ours_old.load_state_dict(mapped)
    with torch.no_grad():
        want_new = new(x)
        legacy_monai(monkeypatch)
        want_old = new(x)
        assert torch.allclose(ours_new(x), want_new, atol=1e-5) and torch.allclose(ours_old(x), want_old, atol=1e-5)
        assert not torch.allclose(want_new, want_old, atol=1e-3)


def test_convert_writes_the_kits_encoder(tmp_path):
    torch.save({"state_dict": amaes_unet_state()}, tmp_path / "release.ckpt")  # a Lightning checkpoint works too
    out = models.convert(tmp_path / "release.ckpt", tmp_path / "encoder.pt")
    enc = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert enc["arch"] == out["arch"] == "unet_b" and len(enc["encoder"]) == 40 and enc["format"] == "amaes"
    with pytest.raises(ValueError, match="holds unet_b weights, not unet_xl"):
        models.convert(tmp_path / "release.ckpt", tmp_path / "x.pt", arch="unet_xl")


class Payload:
    """Unpickling this would run code: it must never be unpickled."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


MARKER = None


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_files_are_one_line_and_nothing_runs(demo, tmp_path, capsys):
    global MARKER
    MARKER = tmp_path / "payload_ran"
    files = {"junk.pt": b"\x00" * 64}
    torch.save({"foo": torch.zeros(3), "bar": torch.ones(2)}, tmp_path / "other.pt")
    torch.save(amaes_unet_state(), tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:5000])
    torch.save({"state_dict": Payload()}, tmp_path / "evil.pt")  # a torch file whose unpickling would open a file
    with open(tmp_path / "evil.pkl", "wb") as f:  # the same as a plain pickle
        pickle.dump({"state_dict": Payload()}, f)
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    cases = {
        "junk.pt": "not a readable checkpoint",
        "other.pt": "matches no layout this kit reads",
        "truncated.pt": "not a readable checkpoint",
        "evil.pt": "refused: the file holds pickled Python objects",
        "evil.pkl": "not a readable checkpoint",
        "missing.pt": "no such file",
    }
    base = TINY + ["--data", str(demo / "preprocessed")]
    for name, words in cases.items():
        code = (
            finetune.main(base + ["--pretrained", str(tmp_path / name), "--out", str(tmp_path / ("o_" + name))])
            if name != "missing.pt"
            else pretrain.main(
                [
                    "--data",
                    str(demo / "preprocessed"),
                    "--patch",
                    "32",
                    "--workers",
                    "0",
                    "--quiet",
                    "--init",
                    str(tmp_path / name),
                    "--out",
                    str(tmp_path / "p"),
                ]
            )
        )
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert not MARKER.exists()
    assert (
        finetune.main(
            base + ["--arch", "mednext_s", "--pretrained", str(tmp_path / "full.pt"), "--out", str(tmp_path / "w")]
        )
        == 2
    )
    assert "holds unet_b weights, but --arch is mednext_s" in capsys.readouterr().err
    formats = json.dumps(list(models.FORMATS.values()))
    assert all(w in formats for w in ("AMAES", "nnssl", "model_swinvit", "BrainSegFounder"))
