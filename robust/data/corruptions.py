"""The 15 common corruptions of CIFAR-10-C / ImageNet-C at 5 severities, and readers of the official files.

:func:`corrupt` takes a batch of float images in [0, 1], shape (N, C, H, W) with C 1 or 3, and
returns the corrupted batch with the same shape, dtype and range. The severity parameters are
Hendrycks and Dietterich's for CIFAR-10-C (32 px); the parameters that are lengths in pixels (blur
radii and sigmas, glass blur's shuffle distance, elastic distances, snow streaks) are scaled by
``min(H, W) / 32``, so a 28 px image gets the same blur relative to its size. Each image draws its
randomness from its own generator, seeded by (seed, corruption, severity, image index), so the same
image is corrupted the same way whatever the batch it arrives in.

Differences from the original code (written anew here in torch, PIL for JPEG and pixelate):
frost blends a procedural frost texture made with a fixed seed instead of the six photographs
of the original; motion blur (and snow's streaks) use a one-sided Gaussian line kernel, our
reading of ImageMagick's motion blur; glass blur's local shuffle follows the original's order.
The figures are therefore close to, not equal to, CIFAR-10-C's: read the official files with
:func:`read_official` when they are at hand.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import io
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from robust.errors import ConfigError, DataError
from robust.outputs import atomic_output

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 32  # the image size the severity parameters are given for (CIFAR)
CACHE_VERSION = 1

# CIFAR-10-C's parameters per severity 1..5 (Hendrycks & Dietterich 2019, make_cifar_c.py)
PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # sd of the noise
    "shot_noise": [500, 250, 100, 75, 50],  # photons per unit intensity
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # fraction of values set to 0 or 1
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # disk radius, anti-alias sigma
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],  # sigma, max shift, passes
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],  # radius, sigma
    "zoom_blur": [1.06, 1.11, 1.16, 1.21, 1.26],  # zooms 1, 1.01, ... below this, averaged
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    # snow: flake mean, sd, zoom, threshold, streak radius, streak sigma, image weight
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],  # image weight, frost weight
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],  # fog strength, fractal decay
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],  # added to HSV value
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # factor around the channel mean
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    # elastic: displacement size, its smoothing sigma, affine jitter; all times the image size
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],  # size factor of the box down-sampling
    "jpeg_compression": [80, 65, 58, 50, 40],  # JPEG quality
}


# ---------------------------------------------------------------- names


def check_corruption_names(names: Iterable[str] | str) -> list[str]:
    """The corruption names asked for ('all' means the 15), in the standard order; ConfigError naming the nearest."""
    items = names.split(",") if isinstance(names, str) else list(names)
    keys = [str(n).strip().lower().replace("-", "_") for n in items]
    if any(not k for k in keys):
        raise ConfigError("an empty corruption name in the list; pass e.g. --corruptions all or "
                          "--corruptions gaussian_noise,fog")
    if "all" in keys:
        return list(CORRUPTIONS)
    for key in keys:
        if key not in CORRUPTIONS:
            near = difflib.get_close_matches(key, CORRUPTIONS, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(f"unknown corruption {key!r}; {hint}use all or some of {', '.join(CORRUPTIONS)}")
    return [c for c in CORRUPTIONS if c in keys]


def check_severities(values: Iterable[int | str] | str) -> list[int]:
    """The severities asked for, sorted and de-duplicated; ConfigError for an empty item or one outside 1..5."""
    items = values.split(",") if isinstance(values, str) else list(values)
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        if not text:
            raise ConfigError("an empty severity in the list; pass e.g. --severities 1,2,3,4,5")
        if not text.isdigit() or int(text) not in SEVERITIES:
            raise ConfigError(f"severity {text!r} is not one of 1..5; pass e.g. --severities 1,2,3,4,5")
        out.add(int(text))
    if not out:
        raise ConfigError("no severity given; pass e.g. --severities 1,2,3,4,5")
    return sorted(out)


# ---------------------------------------------------------------- helpers


def image_seed(seed: int, name: str, severity: int, index: int) -> int:
    """The generator seed of one image: independent of the batch it is corrupted in."""
    digest = hashlib.sha256(f"{seed}/{name}/{severity}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = max(1, int(truncate * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(img: torch.Tensor, sigma: float, mode: str = "replicate", truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W) or (N, C, H, W); sigma 0 returns the input."""
    if sigma <= 0:
        return img
    batch = img if img.dim() == 4 else img[None]
    k = gaussian_kernel1d(sigma, truncate)
    r = len(k) // 2
    c = batch.shape[1]
    mode = mode if r < min(batch.shape[-2:]) or mode != "reflect" else "replicate"
    out = F.conv2d(F.pad(batch, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.conv2d(F.pad(out, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return out if img.dim() == 4 else out[0]


def filter2d(img: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """(C, H, W) convolved channel by channel with a 2-D kernel (odd sides), borders padded by ``mode``."""
    c = img.shape[0]
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    if mode == "reflect" and (ry >= img.shape[1] or rx >= img.shape[2]):
        mode = "replicate"
    padded = F.pad(img[None], (rx, rx, ry, ry), mode=mode)
    return F.conv2d(padded, kernel.flip(0, 1).view(1, 1, *kernel.shape).repeat(c, 1, 1, 1), groups=c)[0]


def gray(img: torch.Tensor) -> torch.Tensor:
    """(1, H, W) luma of an RGB image (ITU-R 601, as OpenCV), the image itself when it has one channel."""
    if img.shape[0] == 1:
        return img
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def motion_kernel(radius: float, sigma: float, angle: float) -> torch.Tensor:
    """A one-sided line kernel: weights exp(-i^2 / 2 sigma^2) at distances i = 0..radius along ``angle`` degrees."""
    length = max(1, int(math.ceil(radius)))
    size = 2 * length + 1
    kernel = torch.zeros(size, size)
    a = math.radians(angle)
    for i in range(length + 1):
        dx, dy = round(i * math.cos(a)), round(i * math.sin(a))
        kernel[length + dy, length + dx] += math.exp(-(i * i) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def clipped_zoom(img: torch.Tensor, zoom: float) -> torch.Tensor:
    """(C, H, W) zoomed in by ``zoom`` about its centre (bilinear), same size."""
    if zoom == 1:
        return img
    theta = torch.tensor([[1 / zoom, 0, 0], [0, 1 / zoom, 0]], dtype=img.dtype)[None]
    grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def plasma_fractal(size: int, decay: float, gen: torch.Generator) -> torch.Tensor:
    """A (size, size) diamond-square height map in [0, 1] (size a power of two), for fog."""
    grid = torch.zeros(size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def jitter(values: torch.Tensor) -> torch.Tensor:
        noise = (torch.rand(values.shape, generator=gen, dtype=torch.float64) * 2 - 1) * wibble
        return values / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]
        square = corners + corners.roll(-1, 0)
        square = square + square.roll(-1, 1)
        grid[half::step, half::step] = jitter(square)
        centres = grid[half::step, half::step]
        corners = grid[0::step, 0::step]
        grid[0::step, half::step] = jitter(centres + centres.roll(1, 0) + corners + corners.roll(-1, 1))
        grid[half::step, 0::step] = jitter(centres + centres.roll(1, 1) + corners + corners.roll(-1, 0))
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return (grid / grid.max()).float()


@functools.lru_cache(maxsize=1)
def frost_texture() -> torch.Tensor:
    """A (3, 192, 192) procedural frost texture in [0, 1], the same every time (fixed seed): needle-like
    crystals (thresholded noise streaked in several directions) over a pale, blotchy haze, tinted blue."""
    gen = torch.Generator().manual_seed(20190101)
    size = 192
    crystals = torch.zeros(1, size, size)
    for angle in (0, 45, 90, 135, 20, 110):
        seeds = (torch.rand(1, size, size, generator=gen) > 0.985).float()
        crystals += filter2d(seeds, motion_kernel(9, 6, angle), mode="circular") * 6
    haze = torch.nn.functional.interpolate(plasma_fractal(64, 1.6, gen)[None, None], size=(size, size),
                                           mode="bilinear", align_corners=False)[0]
    texture = (0.55 * haze + crystals.clamp(0, 1) * 0.8).clamp(0, 1)
    texture = gaussian_blur(texture, 0.6, mode="circular")
    tint = torch.tensor([0.86, 0.93, 1.0]).view(3, 1, 1)
    return (texture * tint).clamp(0, 1)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------- the corruptions, one image (C, H, W) each


def gaussian_noise(img, p, gen, scale):
    return img + torch.randn(img.shape, generator=gen) * p


def shot_noise(img, p, gen, scale):
    return torch.poisson(img * p, generator=gen) / p


def impulse_noise(img, p, gen, scale):
    hit = torch.rand(img.shape, generator=gen) < p
    salt = (torch.rand(img.shape, generator=gen) < 0.5).to(img.dtype)
    return torch.where(hit, salt, img)


def disk_kernel(radius: float, exact: bool) -> torch.Tensor:
    """A normalized disk of ``radius`` pixels: the pixels whose centre lies inside (``exact``, the original at
    32 px), else each pixel weighted by the share of it inside the disk (8 x 8 samples), so a radius scaled
    to another image size does not jump at whole pixels."""
    half = max(1, int(math.ceil(radius))) + 1
    if exact:
        t = torch.arange(-half, half + 1, dtype=torch.float32)
        disk = ((t[None] ** 2 + t[:, None] ** 2) <= radius ** 2).float()
    else:
        t = torch.arange(-half - 0.5 + 1 / 16, half + 0.5, 1 / 8, dtype=torch.float32)
        inside = ((t[None] ** 2 + t[:, None] ** 2) <= radius ** 2).float()
        disk = F.avg_pool2d(inside[None, None], 8)[0, 0]
        if disk.sum() == 0:  # a radius under a sixteenth of a pixel: no blur
            disk[half, half] = 1
    return disk / disk.sum()


def defocus_blur(img, p, gen, scale):
    radius, alias = p[0] * scale, p[1] * scale
    disk = disk_kernel(radius, exact=scale == 1)
    smooth = torch.exp(-0.5 * (torch.arange(-1.0, 2.0) / alias) ** 2)  # the original's 3 x 3 anti-alias blur
    smooth = torch.outer(smooth, smooth) / smooth.sum() ** 2
    disk = F.conv2d(disk[None, None], smooth[None, None], padding=1)[0, 0]
    return filter2d(img, disk / disk.sum())


def glass_blur(img, p, gen, scale):
    sigma, delta, passes = p[0] * scale, max(1, round(p[1] * scale)), p[2]
    x = to_uint8(gaussian_blur(img, sigma))
    c, h, w = x.shape
    shifts = torch.randint(-delta, delta, (passes, h, w, 2), generator=gen).tolist()
    pixels = [tuple(v) for v in x.reshape(c, h * w).T.tolist()]  # a flat list: python swaps are fast
    for k in range(passes):  # the original's order: bottom-right to top-left, each pixel swapped with a neighbour
        for i in range(h - delta, delta, -1):
            for j in range(w - delta, delta, -1):
                dy, dx = shifts[k][i][j]
                a, b = i * w + j, min(max(i + dy, 0), h - 1) * w + min(max(j + dx, 0), w - 1)
                pixels[a], pixels[b] = pixels[b], pixels[a]
    x = torch.tensor(pixels, dtype=torch.float32).T.reshape(c, h, w)
    return gaussian_blur(x / 255, sigma)


def motion_blur(img, p, gen, scale):
    angle = float(torch.empty(1).uniform_(-45, 45, generator=gen))
    return filter2d(img, motion_kernel(p[0] * scale, p[1] * scale, angle), mode="replicate")


def zoom_blur(img, p, gen, scale):
    zooms = torch.arange(1, p, 0.01).tolist()
    total = img + sum(clipped_zoom(img, z) for z in zooms)
    return total / (len(zooms) + 1)


def snow(img, p, gen, scale):
    mean, sd, zoom, threshold, radius, sigma, weight = p
    h, w = img.shape[1:]
    flakes = clipped_zoom(torch.randn(1, h, w, generator=gen) * sd + mean, zoom)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)
    flakes = torch.from_numpy(to_uint8(flakes)).float() / 255
    angle = float(torch.empty(1).uniform_(-135, -45, generator=gen))
    flakes = filter2d(flakes, motion_kernel(radius * scale, sigma * scale, angle), mode="replicate")
    x = weight * img + (1 - weight) * torch.maximum(img, gray(img) * 1.5 + 0.5)
    return x + flakes + flakes.flip(1, 2)


def frost(img, p, gen, scale):
    texture = frost_texture()
    c, h, w = img.shape
    size = max(h, w, round(texture.shape[1] * scale))  # the texture keeps its grain relative to the image
    if size != texture.shape[1]:
        texture = F.interpolate(texture[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    top = int(torch.randint(0, size - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, size - w + 1, (1,), generator=gen))
    crop = texture[:, top:top + h, left:left + w]
    return p[0] * img + p[1] * (gray(crop) if c == 1 else crop)


def fog(img, p, gen, scale):
    h, w = img.shape[1:]
    size = 1 << max(1, math.ceil(math.log2(max(h, w))))
    top = img.max()
    x = img + p[0] * plasma_fractal(size, p[1], gen)[:h, :w]
    return x * top / (top + p[0])


def brightness(img, p, gen, scale):
    value = img.max(0, keepdim=True).values
    new = (value + p).clamp(0, 1)
    ratio = torch.where(value > 0, new / value.clamp_min(1e-12), torch.zeros_like(value))
    return torch.where(value > 0, img * ratio, new.expand_as(img))  # same hue and saturation, new value


def contrast(img, p, gen, scale):
    mean = img.mean((1, 2), keepdim=True)
    return (img - mean) * p + mean


def elastic_transform(img, p, gen, scale):
    c, h, w = img.shape
    size = min(h, w)
    alpha, sigma, jitter = p[0] * size, p[1] * size, p[2] * size
    centre, side = torch.tensor([w // 2, h // 2], dtype=torch.float64), size // 3
    src = torch.stack([centre + side, torch.stack([centre[0] + side, centre[1] - side]), centre - side])
    dst = src + (torch.rand(3, 2, generator=gen, dtype=torch.float64) * 2 - 1) * jitter
    # output pixel q samples the input at A^-1 (q - b), where A, b map src to dst
    a = torch.linalg.solve(torch.cat([src, torch.ones(3, 1, dtype=torch.float64)], 1), dst).T  # (2, 3)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    q = torch.stack([xs, ys], -1) - a[:, 2]
    where = q @ torch.linalg.inv(a[:, :2]).T
    shifts = [gaussian_blur((torch.rand(1, h, w, generator=gen) * 2 - 1), sigma, mode="reflect", truncate=3)[0] * alpha
              for _ in range(2)] if alpha > 0 else [torch.zeros(h, w), torch.zeros(h, w)]
    warped = sample(img, where.float())
    base = torch.stack([xs, ys], -1).float()
    return sample(warped, base + torch.stack([shifts[0], shifts[1]], -1))


def sample(img: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(C, H, W) read at pixel coordinates ``where`` (H, W, 2 as x, y), bilinear, borders mirrored."""
    h, w = img.shape[1:]
    grid = torch.stack([(where[..., 0] + 0.5) / w * 2 - 1, (where[..., 1] + 0.5) / h * 2 - 1], -1)[None]
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def pixelate(img, p, gen, scale):
    c, h, w = img.shape
    small = (max(1, int(w * p)), max(1, int(h * p)))
    planes = []
    for plane in img.numpy().astype(np.float32):
        im = Image.fromarray(plane, mode="F").resize(small, Image.BOX).resize((w, h), Image.BOX)
        planes.append(np.asarray(im))
    return torch.from_numpy(np.stack(planes))


def jpeg_compression(img, p, gen, scale):
    pixels = to_uint8(img)
    im = Image.fromarray(pixels[0]) if img.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=p)
    out = np.asarray(Image.open(buffer)).astype(np.float32) / 255
    return torch.from_numpy(out[None] if out.ndim == 2 else out.transpose(2, 0, 1).copy())


FUNCTIONS: dict[str, Callable] = {name: globals()[name] for name in CORRUPTIONS}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """``x`` (N, C, H, W) floats in [0, 1], corrupted by ``name`` at ``severity``; image i of the batch uses the
    generator of image index ``start + i``. Same shape, dtype and device; values clipped to [0, 1]."""
    if name not in FUNCTIONS:
        check_corruption_names([name])
    check_severities([severity])
    if x.dim() != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
        raise ConfigError(f"corrupt takes float images (N, C, H, W) with 1 or 3 channels, got {tuple(x.shape)} {x.dtype}")
    scale = min(x.shape[-2:]) / REFERENCE_SIZE
    params = PARAMS[name][severity - 1]
    out = torch.empty_like(x)
    with torch.no_grad():
        for i, img in enumerate(x.detach().cpu().float()):
            gen = torch.Generator().manual_seed(image_seed(seed, name, severity, start + i))
            out[i] = FUNCTIONS[name](img, params, gen, scale).clamp(0, 1).to(x.dtype)
    return out


# ---------------------------------------------------------------- the cache of generated copies


def cache_root() -> Path:
    """``$ROBUST_CACHE/corruptions``, else under ``$XDG_CACHE_HOME`` or ``~/.cache``/robust."""
    root = os.environ.get("ROBUST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "robust"
    return Path(root) / "corruptions"


def images_hash(x: torch.Tensor) -> str:
    """A digest of the clean images (their uint8 values, shape), part of a cached copy's key."""
    data = x if x.dtype == torch.uint8 else (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(data.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def cache_path(name: str, severity: int, seed: int, digest: str) -> Path:
    return cache_root() / f"v{CACHE_VERSION}-{name}-s{severity}-seed{seed}-{digest}.pt"


def corrupted_copy(x: torch.Tensor, name: str, severity: int, seed: int = 0, chunk: int = 256) -> torch.Tensor:
    """The uint8 corrupted copy of ``x`` (uint8 or floats in [0, 1], on the CPU), made ``chunk`` images at a time
    (image i draws from its own generator whatever the chunk), rounded to uint8 as the cache stores it."""
    parts = []
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk]
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb.float()
        parts.append((corrupt(xb, name, severity, seed, start) * 255).round().to(torch.uint8))
    return torch.cat(parts) if parts else torch.empty_like(x, dtype=torch.uint8)


def generated(x: torch.Tensor, name: str, severity: int, seed: int = 0, digest: str | None = None,
              chunk: int = 256) -> tuple[torch.Tensor, bool]:
    """The uint8 corrupted copy of ``x`` (uint8 or floats in [0, 1]) and whether it came from the cache.

    Stored as uint8, like the official files; written atomically, so a crash never leaves half a copy, and a
    cache that cannot be written (read-only home) only means generating again next time.
    """
    path = cache_path(name, severity, seed, digest or images_hash(x))
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if isinstance(cached, torch.Tensor) and cached.shape == x.shape and cached.dtype == torch.uint8:
                return cached, True
        except (OSError, RuntimeError, EOFError):
            pass  # a damaged entry is generated again and replaced
    out = corrupted_copy(x, name, severity, seed, chunk)
    try:
        with atomic_output(path) as fh:
            torch.save(out, fh)
    except OSError:
        pass
    return out, False


# ---------------------------------------------------------------- the official files


def official_layout(folder: str | os.PathLike[str], names: Iterable[str]) -> str:
    """'cifar' (``<name>.npy`` and ``labels.npy``) or 'imagenet' (``<name>/<severity>/<class>/``) for ``folder``;
    DataError naming what is missing."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--corruptions-dir {folder} is not a folder; pass the folder of CIFAR-10-C's .npy files "
                        "or of ImageNet-C's corruption folders")
    names = list(names)
    if all((root / f"{n}.npy").is_file() for n in names):
        if not (root / "labels.npy").is_file():
            raise DataError(f"{root} has the corruptions' .npy files but no labels.npy; copy CIFAR-10-C's labels.npy there")
        return "cifar"
    if all((root / n).is_dir() for n in names):
        return "imagenet"
    missing = [n for n in names if not (root / f"{n}.npy").is_file() and not (root / n).is_dir()]
    raise DataError(f"{root} has neither {missing[0]}.npy (CIFAR-10-C) nor {missing[0]}/ (ImageNet-C); pass the folder "
                    "that holds them, or leave out --corruptions-dir to generate the corruptions")


def read_cifar_c(folder: str | os.PathLike[str], name: str, severity: int,
                 limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (uint8, N x C x H x W) and labels of one severity of CIFAR-10-C / CIFAR-100-C.

    ``<name>.npy`` holds five blocks of equal length (10,000 each in the official files), severity 1 first;
    ``labels.npy`` the labels of every image. The first ``limit`` images of the block are read (all of it by
    default: RobustBench's protocol takes the 10,000 test images per severity, unshuffled).
    """
    root = Path(folder)
    try:
        images = np.load(root / f"{name}.npy", mmap_mode="r")
        labels = np.load(root / "labels.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {root / (name + '.npy')} or its labels.npy: {exc}") from None
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) % 5:
        raise DataError(f"{root / (name + '.npy')} should hold uint8 images N x H x W x C in five equal severity blocks; "
                        f"found {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise DataError(f"{root / 'labels.npy'} has {len(labels)} labels for {len(images)} images in {name}.npy")
    block = len(images) // 5
    count = block if limit is None else min(limit, block)
    lo = (severity - 1) * block
    x = torch.from_numpy(np.array(images[lo:lo + count])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.asarray(labels[lo:lo + count]).astype(np.int64))
    return x, y


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def read_imagenet_c(folder: str | os.PathLike[str], name: str, severity: int, size: int,
                    classes: list[str] | None = None, limit: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """``limit`` images of one ImageNet-C corruption and severity (``<name>/<severity>/<class>/<file>``), uint8.

    The images are spread evenly over the files in (class, file name) order, so every class is represented;
    each is resized (shorter side to size * 256 / 224) and centre-cropped to ``size``, RobustBench's
    Res256Crop224 at 224. Labels are positions in ``classes`` (the checkpoint's) or in the sorted class folders.
    """
    base = Path(folder) / name / str(severity)
    if not base.is_dir():
        raise DataError(f"{base} is missing; ImageNet-C keeps each severity in <corruption>/<1..5>/<class>/")
    folders = sorted(p.name for p in base.iterdir() if p.is_dir())
    order = list(classes) if classes else folders
    unknown = [f for f in folders if f not in order]
    if unknown:
        raise DataError(f"{base} has class folder {unknown[0]!r}, not one of the model's classes; pass the "
                        "ImageNet-C folder of the data the model was trained on")
    files = [(order.index(c), p) for c in folders for p in sorted((base / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{base} holds no images")
    count = min(limit, len(files))
    picked = [files[(i * len(files)) // count] for i in range(count)]
    images = [load_center_crop(p, size) for _, p in picked]
    return torch.stack(images), torch.tensor([c for c, _ in picked], dtype=torch.long)


def load_center_crop(path: Path, size: int) -> torch.Tensor:
    """An RGB image resized (shorter side to size * 256 / 224, bilinear) and centre-cropped to size x size, uint8."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            short = round(size * 256 / 224)
            w, h = im.size
            im = im.resize((max(short, round(w * short / h)), max(short, round(h * short / w))) if w != h
                           else (short, short), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
