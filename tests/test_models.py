"""models.py: exact parameter counts (the published architectures), shapes, transfer, copyability."""

import ast
import pathlib

import pytest
import torch

from models import ARCHS, build_model, count_parameters, load_encoder

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Built once per run: some of these networks have 100 M parameters.
_CACHE = {}


def get(arch, mode, cin=1, cout=2, **kw):
    key = (arch, mode, cin, cout, tuple(sorted(kw.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = build_model(arch, cin, cout if mode == "seg" else None, mode=mode, **kw)
    return _CACHE[key]


def small_input(arch, cin=1, batch=1):
    # the smallest training input with >= 2 bottleneck voxels
    side = (32, 32, 64) if ARCHS[arch]["family"] in ("swin", "resenc") else (32, 32, 32)
    return torch.randn(batch, cin, *side)


def test_models_py_imports_only_torch_and_stdlib():
    import sys

    tree = ast.parse((ROOT / "models.py").read_text())
    roots = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            roots |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            assert n.level == 0, "models.py must not use relative imports"
            roots.add(n.module.split(".")[0])
    assert roots - {"torch"} <= set(sys.stdlib_module_names), roots


# Counts of the reference implementations (MedNeXt v1, MONAI SwinUNETR, nnU-Net ResEnc-L), typed in by hand.
EXACT = [
    ("mednext_s", "seg", dict(decoder="native"), 1, 2, 5_550_914),
    ("mednext_b", "seg", dict(decoder="native"), 1, 2, 10_526_306),
    ("mednext_m", "seg", dict(decoder="native"), 1, 2, 17_548_962),
    ("mednext_l", "seg", dict(decoder="native"), 1, 2, 61_779_266),
    ("swinunetr", "seg", {}, 1, 2, 62_186_708),
    ("swinunetr", "seg", {}, 4, 3, 62_191_941),
    ("swinunetr", "pretrain", {}, 1, None, 19_097_191),
    ("resenc_l", "seg", {}, 1, 1, 102_348_965),
    ("resenc_l", "pretrain", {}, 1, None, 102_348_965),
]


@pytest.mark.parametrize("arch,mode,kw,cin,cout,n", EXACT)
def test_exact_parameter_counts(arch, mode, kw, cin, cout, n):
    assert count_parameters(get(arch, mode, cin, cout, **kw)) == n


# (arch, mode, whole model in millions, encoder in millions), two decimals as published
ROUNDED = [
    ("unet_b", "seg", 22.58, 14.13),
    ("unet_xl", "seg", 90.30, 56.53),
    ("mednext_m", "seg", 20.94, None),
    ("mednext_l", "seg", 55.20, None),
    ("resenc_l", "seg", None, 90.30),
]


@pytest.mark.parametrize("arch,mode,total,enc", ROUNDED)
def test_rounded_parameter_counts(arch, mode, total, enc):
    m = get(arch, mode, 1, 2)
    if total is not None:
        assert round(count_parameters(m) / 1e6, 2) == total
    if enc is not None:
        assert round(count_parameters(m.encoder) / 1e6, 2) == enc


def test_resenc_encoder_exact():
    assert count_parameters(get("resenc_l", "pretrain").encoder) == 90_296_576


@pytest.mark.parametrize("arch,millions", [("unet_b", 3.74), ("unet_xl", 14.97)])
def test_lightweight_pretraining_decoder(arch, millions):
    m = get(arch, "pretrain")
    assert round(count_parameters(m.decoder) / 1e6, 2) == millions
    assert not m.decoder.skips and all(len(s) == 1 for s in m.decoder.stages)


def test_mednext_pretrains_with_the_f32_lightweight_decoder():
    assert count_parameters(get("mednext_m", "pretrain").decoder) == count_parameters(get("unet_b", "pretrain").decoder)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", ["seg", "pretrain"])
def test_forward_backward_shapes(arch, mode):
    m = get(arch, mode)
    m.train()
    x = small_input(arch) if not (arch == "swinunetr" and mode == "pretrain") else torch.randn(2, 1, 32, 32, 64)
    y = m(x)
    if arch == "swinunetr" and mode == "pretrain":
        rot, con, rec = y
        assert rot.shape == (2, 4) and con.shape == (2, 512) and rec.shape == x.shape
        loss = rot.sum() + con.sum() + rec.mean()
    else:
        assert y.shape == (x.shape[0], 2 if mode == "seg" else 1, *x.shape[2:])
        loss = y.float().mean()
    m.zero_grad()
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", ["mednext_s", "mednext_l"])
def test_mednext_native_decoder(arch):
    m = get(arch, "seg", decoder="native")
    y = m(torch.randn(1, 1, 32, 32, 32))
    assert y.shape == (1, 2, 32, 32, 32)


def test_multichannel_io():
    m = build_model("mednext_s", 4, 3)
    assert m(torch.randn(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    p = build_model("unet_b", 2, mode="pretrain")
    assert p(torch.randn(1, 2, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_encoder_transfer_pretrain_to_seg():
    torch.manual_seed(1)
    pre = build_model("unet_b", 1, mode="pretrain")
    seg = build_model("unet_b", 1, 3)
    dec_before = {k: v.clone() for k, v in seg.decoder.state_dict().items()}
    report = load_encoder(seg, {"arch": "unet_b", "encoder": pre.encoder.state_dict()})
    assert report["adapted"] == [] and set(report["loaded"]) == set(pre.encoder.state_dict())
    for k, v in pre.encoder.state_dict().items():
        assert torch.equal(seg.encoder.state_dict()[k], v), k
    for k, v in seg.decoder.state_dict().items():
        assert torch.equal(dec_before[k], v), k


def test_transfer_of_every_arch_encoder():
    for arch in ARCHS:
        pre, seg = get(arch, "pretrain"), get(arch, "seg")
        load_encoder(seg, {"arch": arch, "encoder": pre.encoder.state_dict()})
        assert all(torch.equal(seg.encoder.state_dict()[k], v) for k, v in pre.encoder.state_dict().items())


def test_transfer_wrong_arch_is_a_clear_error():
    pre = get("unet_b", "pretrain")
    with pytest.raises(ValueError, match="pretrained as 'unet_b'.*'unet_xl'"):
        load_encoder(get("unet_xl", "seg"), {"arch": "unet_b", "encoder": pre.encoder.state_dict()})
    # without metadata the key check names what does not fit
    with pytest.raises(ValueError, match="missing .*unexpected"):
        load_encoder(get("mednext_s", "seg"), pre.encoder.state_dict())
    with pytest.raises(ValueError, match=r"has shape \(32, 1, 3, 3, 3\), model expects \(64, 1, 3, 3, 3\)"):
        load_encoder(get("unet_xl", "seg"), pre.encoder.state_dict())


def test_first_conv_with_more_channels_stays_fresh_or_is_tiled():
    torch.manual_seed(2)
    pre = build_model("unet_b", 1, mode="pretrain").eval()
    seg = build_model("unet_b", 4, 2).eval()
    fresh = seg.encoder.stages[0][0].conv.weight.clone()
    report = load_encoder(seg, {"arch": "unet_b", "encoder": pre.encoder.state_dict()})  # the authors': left fresh
    assert report["fresh"] == ["stages.0.0.conv.weight"] and report["adapted"] == []
    assert torch.equal(seg.encoder.stages[0][0].conv.weight, fresh)
    assert torch.equal(seg.encoder.stages[0][0].conv.bias, pre.encoder.stages[0][0].conv.bias)  # name and shape match
    report = load_encoder(seg, {"arch": "unet_b", "encoder": pre.encoder.state_dict()}, adapt_stem=True)  # ours
    assert report["adapted"] == ["stages.0.0.conv.weight"]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():  # four copies of one image must give the pretrained features
        a, b = pre.encoder(x)[-1], seg.encoder(x.repeat(1, 4, 1, 1, 1))[-1]
    assert torch.allclose(a, b, atol=1e-4)


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(3)
    m = build_model("mednext_s", 1, 2)
    x = torch.randn(1, 1, 32, 32, 32)
    m(x).square().mean().backward()
    g0 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_checkpointing(True)
    m(x).square().mean().backward()
    for a, p in zip(g0, m.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)


def test_resenc_deep_supervision():
    m = get("resenc_l", "seg")
    aux = [p for p in m.decoder.aux.parameters()]
    assert aux and not any(p.requires_grad for p in aux)  # DDP must not wait for them
    m.decoder.set_deep_supervision(True)
    try:
        outs = m(torch.randn(1, 1, 64, 64, 64))
        assert [tuple(o.shape[2:]) for o in outs] == [(64,) * 3, (32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3]
        assert all(p.requires_grad for p in aux)
    finally:
        m.decoder.set_deep_supervision(False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch 'unet_z'"):
        build_model("unet_z", 1, 2)
    with pytest.raises(ValueError, match="out_channels"):
        build_model("unet_b", 1)
    with pytest.raises(ValueError, match="divisible by 16"):
        get("unet_b", "seg")(torch.randn(1, 1, 24, 32, 32))
    with pytest.raises(ValueError, match="decoder"):
        build_model("unet_b", 1, 2, decoder="native")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_initialisation_is_torch_default(arch):
    """The authors' networks keep PyTorch's default initialisation (Yucca:
    weightInitializer None; nnssl's MAE path none either): kaiming_uniform with
    a = sqrt(5) gives weights U(-b, b), b = 1 / sqrt(fan_in), so std 1 / sqrt(3 fan_in),
    and biases U(-b, b) -- not He-normal with zero biases."""
    m = get(arch, "seg")
    convs = [
        c
        for c in m.modules()
        if isinstance(c, torch.nn.Conv3d) and c.weight[0].numel() >= 27 and c.weight.numel() > 5000
    ]
    assert convs
    for c in convs[:6]:
        fan_in = c.weight[0].numel()
        assert c.weight.std().item() == pytest.approx(1 / (3 * fan_in) ** 0.5, rel=0.1), c
        assert c.weight.abs().max().item() <= 1 / fan_in**0.5 + 1e-7
        if c.bias is not None:
            assert c.bias.abs().max().item() > 0 and c.bias.abs().max().item() <= 1 / fan_in**0.5 + 1e-7
