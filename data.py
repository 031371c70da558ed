"""
Datasets, patch sampling, the AMAES augmentation recipe, masking and few-shot splits.

    from data import PretrainDataset, SegDataset, StepSampler, random_mask, read_dataset
    ds = PretrainDataset("demo/preprocessed", patch=128, preset="all", seed=0)
    loader = DataLoader(ds, batch_size=8, sampler=StepSampler(start_step=0, steps=1000, batch=8),
                        num_workers=8)
    for inp, target in loader:            # (B, C, P, P, P) each, on the CPU
        inp, mask = random_mask(inp.cuda())  # masking happens on the device, no gradients

Randomness: sample number k (0, 1, 2, ...) is a pure function of (seed, k): which case
(each pass over the data is a seeded permutation), where the patch lies, and every
augmentation draw come from numpy's default_rng([seed, k]). The training scripts give
rank r of W at step s the numbers k = (s * W + r) * batch + b (StepSampler), so ranks
and workers never draw the same augmentation, a rerun gives the same samples, and
resume continues at the next step without replaying a batch, whatever the number of
DataLoader workers. StepSampler is the distributed sampler: torch's DistributedSampler
would hand out the same indices 0..n-1 every epoch and so repeat every augmentation.

Augmentation presets (Munk et al. 2024 and their Yucca transforms; probabilities per sample):
  none     crop only (plain MAE)
  spatial  rotation (p 0.2, then 0.66 per axis, +-30 deg), scaling (p 0.2, 0.9..1.1)
           (the finetuning preset)
  all      elastic (p 0.33) + the spatial rows, then on the input only and in this
           order: additive noise, blur, multiplicative noise, ghosting, Gibbs ringing,
           low resolution, bias field, gamma; each result clipped to its input's range.
The spatial rows are one resampling: rotation, scaling and the elastic field are
composed into a single coordinate grid and applied with one trilinear grid_sample
(nearest for labels), reading from the memory-mapped volume only the box the grid
touches. That replaces the authors' crop-181^3-then-transform pipeline with the same
geometry at a fraction of the cost (README: speed).
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from scipy import ndimage

PRESETS = ("none", "spatial", "all")


# -----------------------------------------------------------------------------
# The preprocessed dataset (preprocess.py's output)

def read_dataset(root):
    """dataset.json of a preprocessed folder, with a clear error when it is not one."""
    root = Path(root)
    f = root / "dataset.json"
    if not f.exists():
        raise FileNotFoundError(f"{root} is not a preprocessed dataset (no dataset.json); "
                                "run preprocess.py --input RAW --output " + str(root) + " first")
    ds = json.loads(f.read_text())
    if not ds.get("cases"):
        raise ValueError(f"{f} lists no usable cases; see {root / 'failed.json'}")
    return ds


def case_names(root, split=None):
    return [c["case"] for c in read_dataset(root)["cases"] if split is None or c["split"] == split]


def select_few_shot(train_cases, n, seed):
    """n cases drawn from the train split by seed: sorted names, reproducible. n may be
    "all". Raises ValueError when n exceeds the split."""
    cases = sorted(train_cases)
    if n == "all":
        return cases
    n = int(n)
    if not 1 <= n <= len(cases):
        raise ValueError(f"--n-train {n}: the train split has {len(cases)} cases; choose 1..{len(cases)} or 'all'")
    rng = np.random.default_rng([seed, 20])
    return sorted(rng.choice(cases, size=n, replace=False).tolist())


# -----------------------------------------------------------------------------
# Sampling order

class StepSampler(torch.utils.data.Sampler):
    """Sample numbers for rank `rank` of `world`: step s, slot b -> (s * world + rank) * batch + b."""

    def __init__(self, start_step, steps, batch, rank=0, world=1):
        self.start, self.steps, self.batch, self.rank, self.world = start_step, steps, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.start + self.steps):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self):
        return self.steps * self.batch


# -----------------------------------------------------------------------------
# Spatial augmentation: one coordinate grid, one resampling

def spatial_params(rng, preset):
    """Draw the spatial rows. Returns {} when nothing fires."""
    p = {}
    if preset == "all" and rng.random() < 0.33:
        p["elastic"] = (rng.uniform(200, 600), rng.uniform(20, 30))  # alpha, sigma (voxels)
    if preset in ("spatial", "all"):
        if rng.random() < 0.2:
            p["rotation"] = [rng.uniform(-30, 30) if rng.random() < 0.66 else 0.0 for _ in range(3)]
        if rng.random() < 0.2:
            p["scale"] = rng.uniform(0.9, 1.1)
    return p


def elastic_field(rng, shape, alpha, sigma, coarse=8):
    """Displacement (3, *shape) in voxels with the statistics of the authors' form,
    gaussian_filter(U(-1, 1) noise, sigma) * alpha, computed on a grid `coarse` times
    smaller: white noise on a grid f times coarser, scaled by f^-1.5, filtered with
    sigma / f has the same variance and correlation length; a trilinear upsampling of
    so smooth a field loses nothing (sigma / f >= 2.5 coarse voxels)."""
    cshape = [max(2, math.ceil(s / coarse)) for s in shape]
    out = []
    for _ in range(3):
        noise = rng.uniform(-1, 1, cshape) * coarse ** -1.5
        out.append(ndimage.gaussian_filter(noise, sigma / coarse, mode="constant", cval=0) * alpha)
    field = torch.from_numpy(np.stack(out).astype(np.float32))[None]
    return F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def rotation_matrix(angles_deg):
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def patch_grid(centre, patch, params, rng):
    """Where in the volume each voxel of the output patch comes from: voxel coordinates
    (3, *patch) with rotation, scaling and the elastic field composed, or None when
    no spatial row fired (a plain crop). Computed once per sample, so an image and
    its label share it."""
    if not params:
        return None
    # voxel offsets of the output grid from its centre: (3, P, P, P)
    g = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in patch], indexing="ij"))
    m = np.eye(3)
    if "rotation" in params:
        m = rotation_matrix(params["rotation"]) @ m
    if "scale" in params:
        m = m * params["scale"]
    coords = torch.einsum("ij,j...->i...", torch.from_numpy(m).float(), g)
    if "elastic" in params:
        coords = coords + elastic_field(rng, patch, *params["elastic"])
    return coords + torch.tensor(np.asarray(centre) - 0.5, dtype=torch.float32).view(3, 1, 1, 1)


def read_patch(vol, centre, patch, coords, order="linear"):
    """A patch of `vol` ((C, X, Y, Z) array, memory-mapped): the integer box around
    `centre` when coords is None, else `vol` resampled at `coords` (patch_grid).
    Outside the volume = the volume minimum, which is the background (0 after
    preprocessing). Returns a float32 tensor (C, *patch)."""
    if coords is None:  # pure crop: integer box, padded
        lo = np.floor(np.asarray(centre) - np.array(patch) / 2).astype(int)
        src = tuple(slice(max(a, 0), min(a + p, n)) for a, p, n in zip(lo, patch, vol.shape[1:]))
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
        out = np.zeros((vol.shape[0], *patch), np.float32)
        out[(slice(None),) + dst] = vol[(slice(None),) + src]
        return torch.from_numpy(out)
    # read only the box the grid touches
    lo = [max(int(math.floor(coords[i].min())) - 1, 0) for i in range(3)]
    hi = [min(int(math.ceil(coords[i].max())) + 2, n) for i, n in enumerate(vol.shape[1:])]
    if any(h <= l for l, h in zip(lo, hi)):
        return torch.zeros((vol.shape[0], *patch))
    box = torch.from_numpy(np.ascontiguousarray(vol[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32))
    # grid_sample wants (x, y, z) = (last, middle, first) axis, normalised to [-1, 1]
    size = torch.tensor([h - l for l, h in zip(lo, hi)], dtype=torch.float32).view(3, 1, 1, 1)
    norm = (coords - torch.tensor(lo, dtype=torch.float32).view(3, 1, 1, 1)) / (size - 1).clamp(min=1) * 2 - 1
    grid = norm.flip(0).permute(1, 2, 3, 0)[None]  # (1, P, P, P, 3)
    vmin = box.min()
    out = F.grid_sample((box - vmin)[None], grid, mode="bilinear" if order == "linear" else "nearest",
                        padding_mode="zeros", align_corners=True)[0]
    return out + vmin


def sample_patch(vol, centre, patch, params, rng, order="linear"):
    """read_patch at the grid of the spatial transform `params` (spatial_params)."""
    patch = tuple(patch)
    return read_patch(vol, centre, patch, patch_grid(centre, patch, params, rng), order)


# -----------------------------------------------------------------------------
# Intensity augmentation (input only). Each function takes x (C, X, Y, Z), the rng,
# and returns (x, params).

def additive_noise(x, rng):
    sigma = rng.uniform(1e-4, 1e-3)  # TorchIO Noise: x + N(0, sigma)
    return tio.Noise(mean=0.0, std=sigma, seed=int(rng.integers(2 ** 31)))(x), {"sigma": sigma}


def blur(x, rng):
    sig = [rng.uniform(0, 1) if rng.random() < 0.5 else None for _ in range(len(x))]
    for c, s in enumerate(sig):  # TorchIO Blur: scipy gaussian_filter, std in voxels (1 mm)
        if s is not None:
            x[c] = tio.Blur(std=s)(x[c:c + 1])[0]
    return x, {"sigma": sig}


def multiplicative_noise(x, rng):
    sigma = rng.uniform(1e-4, 1e-3)
    n = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    return x + x * n * sigma, {"sigma": sigma}


def ghosting(x, rng):
    """Every r-th plane (0, r, 2r, ...) of the unshifted spectrum along a random axis times alpha."""
    alpha, reps, axis = rng.uniform(0.85, 0.95), int(rng.integers(2, 11)), int(rng.integers(0, 3))
    shift = min(0.0, float(x.min()))
    k = torch.fft.fftn(x - shift, dim=(1, 2, 3))
    idx = [slice(None)] * 4
    idx[axis + 1] = slice(0, None, reps)
    k[tuple(idx)] *= alpha
    return torch.fft.ifftn(k, dim=(1, 2, 3)).abs().float() + shift, {"alpha": alpha, "reps": reps, "axis": axis}


def gibbs(x, rng):
    """Keep only the central n frequencies (n in 96..128, at most the side) along a random axis."""
    axis = int(rng.integers(0, 3))
    side = x.shape[axis + 1]
    n = min(int(rng.integers(96, 129)), side)
    k = torch.fft.fftshift(torch.fft.fftn(x, dim=(1, 2, 3)), dim=axis + 1)
    keep = torch.zeros(side, dtype=torch.bool)
    start = (side - n) // 2
    keep[start:start + n] = True
    shape = [1, 1, 1, 1]
    shape[axis + 1] = side
    k = k * keep.view(shape)
    return torch.fft.ifftn(torch.fft.ifftshift(k, dim=axis + 1), dim=(1, 2, 3)).abs().float(), {"axis": axis, "n": n}


def low_resolution(x, rng):
    """Per channel (p 0.5): nearest-neighbour down to zoom U(0.5, 1) along each axis
    picked with p 0.33 (all axes when none is picked), cubic back up."""
    zooms = []
    for c in range(len(x)):
        if rng.random() >= 0.5:
            zooms.append(None)
            continue
        z = rng.uniform(0.5, 1.0)
        axes = [rng.random() < 0.33 for _ in range(3)]
        axes = axes if any(axes) else [True] * 3
        small = [max(1, round(s * z)) if a else s for s, a in zip(x.shape[1:], axes)]
        down = F.interpolate(x[c][None, None], size=small, mode="nearest")[0, 0].numpy()
        up = ndimage.zoom(down, [t / s for t, s in zip(x.shape[1:], small)], order=3, grid_mode=True, mode="nearest")
        x[c] = torch.from_numpy(up[:x.shape[1], :x.shape[2], :x.shape[3]])
        zooms.append((z, axes))
    return x, {"zoom": zooms}


def bias_field(x, rng):
    """x * (1 - sum_d (i_d - c_d)^2 / n_d^2), c a random voxel: built from 1-D terms."""
    g = torch.ones(x.shape[1:])
    centre = [int(rng.integers(0, n)) for n in x.shape[1:]]
    for d, (n, c) in enumerate(zip(x.shape[1:], centre)):
        shape = [1, 1, 1]
        shape[d] = n
        g = g - ((torch.arange(n, dtype=torch.float32) - c) ** 2 / n ** 2).view(shape)
    return x * g, {"centre": centre}


def gamma(x, rng):
    invert = rng.random() < 0.05
    gam = rng.uniform(0.5, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 2.0)
    y = -x if invert else x
    lo, hi = y.min(), y.max()
    rng_ = (hi - lo).clamp(min=1e-8)
    y = ((y - lo) / rng_) ** gam * rng_ + lo
    return (-y if invert else y), {"gamma": gam, "invert": invert}


INTENSITY = [  # (name, probability, function), applied in this order
    ("additive_noise", 0.2, additive_noise), ("blur", 0.2, blur), ("multiplicative_noise", 0.2, multiplicative_noise),
    ("ghosting", 0.2, ghosting), ("gibbs", 0.2, gibbs), ("low_resolution", 0.2, low_resolution),
    ("bias_field", 0.33, bias_field), ("gamma", 0.2, gamma),
]


def intensity_augment(x, rng):
    """The intensity rows of `all`, in order, each clipped to its input's range."""
    fired = {}
    x = x.clone()  # once: the functions may work in place, the caller's tensor (the target) may not change
    for name, p, fn in INTENSITY:
        if rng.random() < p:
            lo, hi = x.min(), x.max()
            x, fired[name] = fn(x, rng)
            x = x.clamp(lo, hi)
    return x, fired


# -----------------------------------------------------------------------------
# Datasets

def random_centre(rng, shape, patch):
    """Uniform patch centre; a volume smaller than the patch lands anywhere inside it."""
    return [rng.uniform(min(p / 2, n / 2), max(n - p / 2, n / 2)) if n != p else n / 2 for n, p in zip(shape, patch)]


class _Base(torch.utils.data.Dataset):
    def __init__(self, root, cases=None, patch=128, preset="all", seed=0, split="train"):
        if preset not in PRESETS:
            raise ValueError(f"--aug {preset!r}: choose from {', '.join(PRESETS)}")
        self.root = Path(root)
        self.cases = sorted(cases) if cases is not None else case_names(root, split)
        if not self.cases:
            raise ValueError(f"{root}: no cases in split {split!r}")
        for c in self.cases:
            if not (self.root / "images" / f"{c}.npy").exists():
                raise FileNotFoundError(f"{self.root / 'images' / (c + '.npy')} is missing; rerun preprocess.py")
        self.patch = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
        self.preset, self.seed = preset, seed

    def __len__(self):
        return len(self.cases)

    def pick(self, k):
        """Case of sample k and its rng: each pass over the data is a seeded permutation."""
        n = len(self.cases)
        perm = np.random.default_rng([self.seed, k // n, 1]).permutation(n)
        return self.cases[perm[k % n]], np.random.default_rng([self.seed, k])

    def image(self, case):
        return np.load(self.root / "images" / f"{case}.npy", mmap_mode="r")


class PretrainDataset(_Base):
    """(input, target) pairs: the spatially augmented patch is the target; the input is
    the target after intensity augmentation (preset "all"). Masking is not done here:
    random_mask() runs on the training device."""

    def sample(self, k):
        case, rng = self.pick(k)
        vol = self.image(case)
        params = spatial_params(rng, self.preset)
        target = sample_patch(vol, random_centre(rng, vol.shape[1:], self.patch), self.patch, params, rng)
        inp, fired = intensity_augment(target, rng) if self.preset == "all" else (target, {})
        return inp, target, {"case": case, "spatial": params, "intensity": fired}

    def __getitem__(self, k):
        inp, target, _ = self.sample(int(k))
        return inp, target


class SegDataset(_Base):
    """(image (C, P, P, P) float32, label (P, P, P) int64) patches. With probability
    fg_p the patch is centred on a labelled voxel (a foreground class drawn uniformly
    among those present); spatial augmentation is applied identically to both (linear
    for the image, nearest for the label, so no new label values appear); intensity
    augmentation only with preset "all", image only."""

    def __init__(self, root, cases=None, patch=128, preset="spatial", seed=0, fg_p=0.33, split="train"):
        super().__init__(root, cases, patch, preset, seed, split)
        self.fg_p = fg_p
        self._fg = {}  # case -> {class: (N, 3) voxel coordinates}, per worker

    def foreground(self, case, lab):
        if case not in self._fg:
            rng = np.random.default_rng(0)
            fg = {}
            for v in np.unique(lab):
                if v == 0:
                    continue
                idx = np.argwhere(lab == v)
                fg[int(v)] = idx[rng.choice(len(idx), min(len(idx), 10000), replace=False)]
            self._fg[case] = fg
        return self._fg[case]

    def sample(self, k):
        case, rng = self.pick(k)
        vol = self.image(case)
        lab = np.load(self.root / "labels" / f"{case}.npy", mmap_mode="r")
        forced = rng.random() < self.fg_p
        fg = self.foreground(case, lab) if forced else {}
        if fg:
            cls = list(fg)[int(rng.integers(len(fg)))]
            centre = fg[cls][int(rng.integers(len(fg[cls])))] + 0.5
        else:
            centre = random_centre(rng, vol.shape[1:], self.patch)
        params = spatial_params(rng, self.preset)
        coords = patch_grid(centre, self.patch, params, rng)  # one grid for image and label
        img = read_patch(vol, centre, self.patch, coords)
        seg = read_patch(lab[None], centre, self.patch, coords, order="nearest")[0]
        fired = {}
        if self.preset == "all":
            img, fired = intensity_augment(img, rng)
        return img, seg.round().long(), {"case": case, "forced_fg": bool(fg), "spatial": params, "intensity": fired}

    def __getitem__(self, k):
        img, seg, _ = self.sample(int(k))
        return img, seg


# -----------------------------------------------------------------------------
# Masking (AMAES) and the SwinUNETR-SSL views, on the training device

@torch.no_grad()
def random_mask(x, ratio=0.6, token=4, generator=None):
    """Mask a batch x (B, C, *S): in each sample independently, exactly
    int(n_tokens * (1 - ratio)) of the token^3 blocks are kept and the rest set to 0.
    Returns (masked x, mask (B, 1, *S) bool, True = masked). S must divide by token."""
    b, _, *s = x.shape
    if any(n % token for n in s):
        raise ValueError(f"patch {s} is not divisible by the mask token size {token}; "
                         f"use a patch that is a multiple of {token} (--patch / --mask-token)")
    grid = [n // token for n in s]
    n = math.prod(grid)
    keep = int(n * (1 - ratio))
    order = torch.rand(b, n, device=x.device, generator=generator).argsort(dim=1)
    tok = torch.ones(b, n, dtype=torch.bool, device=x.device)
    tok.scatter_(1, order[:, :keep], False)
    mask = tok.view(b, 1, grid[0], 1, grid[1], 1, grid[2], 1).expand(b, 1, grid[0], token, grid[1], token, grid[2], token)
    mask = mask.reshape(b, 1, *s)
    return x.masked_fill(mask, 0), mask


@torch.no_grad()
def cutout(x, donor=None, generator=None, max_drop=0.3, max_side=0.25, min_side=0.05):
    """Tang et al.'s drop: fill boxes (sides 5..25 % of the patch) until U(0, max_drop)
    of the volume is covered, with N(0, 1) noise rescaled to [0, 1], or with the
    same box of `donor` (another sample of the batch) when given. x: (C, *S), in place."""
    s = x.shape[1:]
    total = math.prod(s)
    target = torch.rand((), generator=generator, device="cpu").item() * max_drop * total
    lo = [max(1, int(min_side * n)) for n in s]
    hi = [max(l + 1, int(max_side * n)) for l, n in zip(lo, s)]
    done = 0
    while done < target:
        start = [int(torch.randint(0, n - l + 1, (), generator=generator)) for n, l in zip(s, lo)]
        size = [int(torch.randint(l, h + 1, (), generator=generator)) for l, h in zip(lo, hi)]
        box = (slice(None),) + tuple(slice(a, min(a + z, n)) for a, z, n in zip(start, size, s))
        if donor is None:
            noise = torch.randn(x[box].shape, generator=generator).to(x.device)
            x[box] = (noise - noise.min()) / (noise.max() - noise.min()).clamp(min=1e-8)
        else:
            x[box] = donor[box]
        done += x[box][0].numel()
    return x


@torch.no_grad()
def swin_ssl_views(x, generator=None):
    """Two views per sample for SwinUNETR-SSL. Each view: rotate by k*90 degrees in the
    plane of the last two axes (k uniform in 0..3 is the rotation label), keep that as
    the reconstruction target, then cutout with noise and, when another sample of the
    batch is drawn, cutout pasted from it. x: (B, C, *S) with equal last two sides.
    Returns (views (2B, C, *S), targets (2B, C, *S), rotation labels (2B,))."""
    b = x.shape[0]
    views, targets, labels = [], [], []
    for _ in range(2):
        k = torch.randint(0, 4, (b,), generator=generator)
        rot = torch.stack([torch.rot90(x[i], int(k[i]), dims=(2, 3)) for i in range(b)])
        aug = rot.clone()
        for i in range(b):
            cutout(aug[i], generator=generator)
            j = int(torch.randint(0, b, (), generator=generator))
            if j != i:
                cutout(aug[i], donor=aug[j], generator=generator)
        views.append(aug), targets.append(rot), labels.append(k)
    return torch.cat(views), torch.cat(targets), torch.cat(labels).to(x.device)
