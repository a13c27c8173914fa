"""torchvision and timm classifiers as dual-route models: ``--arch torchvision:NAME`` / ``timm:NAME``.

The library's own model is built with ``num_classes`` (and ``in_channels``) adapted, every norm
layer becomes the chosen dual-route norm through :func:`robust.nn.convert.convert_norms` (BatchNorm2d,
timm's BatchNormAct2d, LayerNorm and GroupNorm; a model with any other norm is refused naming it), and
input normalization sits in front as for our architectures, so the model takes [0, 1] inputs.

A model whose input size is fixed when it is built (timm's and torchvision's ViTs) is built for the
data's image size (timm ``img_size``, torchvision ``image_size``), and a timm ViT takes another patch
side (``patch_size``): a 16-pixel patch does not fit a 28-pixel image. Both are kept in the build
arguments when the model takes them, so a checkpoint rebuilds the same model.

The wrapper is invisible in the state_dict: its keys are the library model's own (``conv1.weight``,
``bn1.stats.adv.running_mean``, ...), and the normalization's mean/std live in the build arguments
(``model.build_args``), not in the weights. So an exported route (the library's own norm classes) loads
unchanged into ``torchvision.models.NAME(num_classes=...)`` or ``timm.create_model(NAME,
num_classes=...)``, with ``(x - mean) / std`` applied by the caller.
"""

from __future__ import annotations

import difflib
import importlib.util
from typing import Sequence

import torch
import torch.nn as nn
import torchvision.models as tvm

from robust.errors import ModelError
from robust.nn.convert import convert_norms, is_norm, unconverted_norms
from robust.nn.resnet import InputNormalization

LIBRARIES = ("torchvision", "timm")


def split_arch(arch: str) -> tuple[str | None, str]:
    """``"torchvision:resnet18"`` -> ``("torchvision", "resnet18")``; our own names -> ``(None, name)``."""
    library, sep, name = str(arch).partition(":")
    return (library, name) if sep else (None, str(arch))


def is_external(arch: str) -> bool:
    return split_arch(arch)[0] is not None


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_arch(arch: str) -> str:
    """Return ``arch`` when it names a buildable torchvision/timm classifier, else raise ModelError."""
    library, name = split_arch(arch)
    if library not in LIBRARIES:
        raise ModelError(f"unknown architecture library {library!r} in {arch!r}; write torchvision:NAME or timm:NAME")
    if not name:
        raise ModelError(f"{arch!r} names no model; write e.g. {library}:resnet18")
    if library == "torchvision":

        known = tvm.list_models(module=tvm)  # the classification models
        if name not in known:
            raise ModelError(f"torchvision has no classification model {name!r}{_suggest(name, known)}; "
                             "see torchvision.models.list_models()")
    else:
        if importlib.util.find_spec("timm") is None:
            raise ModelError(f"--arch {arch} needs timm, which is not installed; pip install 'robust[timm]' "
                             "(or pip install timm), or use a torchvision:NAME architecture")
        import timm

        if not timm.is_model(name):
            raise ModelError(f"timm has no model {name!r}{_suggest(name, timm.list_models())}; see timm.list_models()")
    return arch


def _first_rgb_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    """(parent, attribute, conv) of the first Conv2d that reads 3 channels: the stem."""
    for parent in net.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                return parent, attr, child
    return None


ImageSize = int | tuple[int, int]


def _torchvision_net(name: str, num_classes: int, in_channels: int, image_size: ImageSize | None,
                     patch_size: int | None) -> tuple[nn.Module, dict]:
    """The torchvision model and the input-size keywords it took (its ViTs take ``image_size``)."""
    if patch_size is not None:
        raise ModelError(f"torchvision:{name} fixes its patch size in its builder; drop --patch-size, or use a timm "
                         "ViT (e.g. timm:vit_tiny_patch16_224), which takes one")
    size = {"image_size": image_size} if image_size is not None else {}
    net, used = _build_taking(lambda **kw: tvm.get_model(name, weights=None, num_classes=num_classes, **kw), size)
    if in_channels != 3:
        found = _first_rgb_conv(net)
        if found is None:
            raise ModelError(f"torchvision:{name} has no 3-channel stem convolution to adapt to {in_channels} channels")
        parent, attr, conv = found
        setattr(parent, attr, nn.Conv2d(
            in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode))
    return net, used


def _timm_net(name: str, num_classes: int, in_channels: int, image_size: ImageSize | None,
              patch_size: int | None) -> tuple[nn.Module, dict]:
    """The timm model and the input-size keywords it took (ViT-style models take ``img_size`` and ``patch_size``)."""
    import timm

    def create(**kw):
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)

    if patch_size is not None:
        size = {"img_size": image_size} if image_size is not None else {}
        try:
            return create(**size, patch_size=patch_size), {**size, "patch_size": patch_size}
        except TypeError as exc:
            if "patch_size" in str(exc) or "img_size" in str(exc):
                raise ModelError(f"timm:{name} takes no patch size; drop --patch-size") from None
            raise
    return _build_taking(create, {"img_size": image_size} if image_size is not None else {})


def _build_taking(build, size: dict) -> tuple[nn.Module, dict]:
    """``build(**size)`` when the model's constructor takes the input size, else ``build()`` (it takes any size)."""
    if size:
        try:
            return build(**size), size
        except TypeError as exc:
            if next(iter(size)) not in str(exc):
                raise
    return build(), {}


def _check_patches(arch: str, net: nn.Module) -> None:
    """A ViT whose patches do not tile the image would drop the pixels at its edges: refuse it."""
    embed = getattr(net, "patch_embed", None)
    image, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if image is None or patch is None:
        return
    image, patch = tuple(image), tuple(patch)
    if any(i % p or i < p for i, p in zip(image, patch, strict=True)):
        fits = [p for p in (2, 4, 7, 8, 14, 16) if image[0] % p == 0 and image[1] % p == 0 and p < min(image)]
        hint = f" such as {', '.join(map(str, fits))}" if fits else ""
        raise ModelError(f"{arch} has {patch[0]}-pixel patches, which do not tile {image[0]} x {image[1]} images; "
                         f"pass --patch-size P with P dividing the image side{hint}")


def _strip_wrapper(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: ``net.x`` -> ``x``; the input normalization is not a weight."""
    inner = prefix + "net."
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict.pop(key)
        if key.startswith(inner):
            state_dict[prefix + key[len(inner):]] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k.startswith(inner) or k == inner[:-1]]:
            metadata[prefix + key[len(inner):] if key.startswith(inner) else prefix[:-1]] = metadata.pop(key)


def _add_wrapper(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: ``x`` -> ``net.x``, the inverse of :func:`_strip_wrapper`."""
    inner = prefix + "net."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


class ExternalModel(nn.Module):
    """A torchvision/timm classifier with our input normalization in front: ``net((x - mean) / std)``.

    ``state_dict()`` holds the classifier's own keys only (see the module docstring) and
    ``load_state_dict`` takes them; mean and std come from the build arguments.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], arch: str = "the model",
                 num_classes: int | None = None) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std, persistent=False)  # build arguments, not weights
        self.net = net
        self.arch, self.num_classes = arch, num_classes
        self.register_state_dict_post_hook(_strip_wrapper)
        self.register_load_state_dict_pre_hook(_add_wrapper)

    def forward(self, x):
        try:
            out = self.net(self.normalize(x))
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # most often: inputs too small for its pooling
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            if "size" not in first.lower() and "shape" not in first.lower():
                raise
            raise ModelError(f"{self.arch} cannot take inputs of shape {tuple(x.shape[1:])} (C, H, W): {first}; "
                             "pick an architecture that takes this size (ours take any, e.g. preact_resnet18), or "
                             "train on your own images (--dataset imagefolder) with a larger --image-size") from None
        problem = logits_problem(out, x.shape[0], self.num_classes)
        if problem:  # every call: a tuple in training mode only (googlenet) must not reach the loss
            raise ModelError(not_logits(self.arch, problem, self.training))
        return out


def logits_problem(out, batch: int, num_classes: int | None) -> str | None:
    """What makes ``out`` not a (batch, num_classes) logits tensor, in words; None when it is one."""
    if not isinstance(out, torch.Tensor):
        return f"a {type(out).__name__}" + (" (a tuple)" if isinstance(out, tuple) and type(out) is not tuple else "")
    if out.dim() != 2 or out.shape[0] != batch or (num_classes is not None and out.shape[1] != num_classes):
        want = f"({batch}, {num_classes})" if num_classes is not None else f"({batch}, classes)"
        return f"a tensor of shape {tuple(out.shape)}, not {want}"
    return None


def not_logits(arch: str, problem: str, training: bool) -> str:
    mode = "training" if training else "eval"
    return (f"{arch} returns {problem} in {mode} mode, not a logits tensor (batch, classes); robust trains and attacks "
            "models whose forward returns logits: pick another architecture, e.g. torchvision:resnet18")


DUMMY_SIDE = 32  # the build check's input: 2 images of 32 x 32 (or of the size the model is built for)


def check_logits(model: ExternalModel, arch: str, in_channels: int, image_size: ImageSize | None = None) -> None:
    """Run ``model`` once on a dummy batch in training and in eval mode; ModelError when its forward returns
    anything but logits. A model that cannot take the dummy inputs is checked at its first real batch instead.
    Nothing changes: the RNG, the BatchNorm statistics and the mode are restored."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    h, w = _pair(image_size if image_size is not None else DUMMY_SIDE)
    x = torch.rand(2, in_channels, h, w, generator=torch.Generator().manual_seed(0))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for training in (True, False):
                model.train(training)
                try:
                    out = model.net(model.normalize(x))
                except (RuntimeError, ValueError, AssertionError, TypeError, IndexError):
                    return  # too small an input for it, say: the forward's own check sees the real batches
                problem = logits_problem(out, len(x), model.num_classes)
                if problem:
                    raise ModelError(not_logits(arch, problem, training))
    finally:
        for buffer, saved in buffers:
            buffer.copy_(saved)
        model.train(was_training)


def _pair(size: ImageSize) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_external(arch: str, norm: str, num_classes: int, in_channels: int, mean: Sequence[float],
                   std: Sequence[float], image_size: ImageSize | None = None,
                   patch_size: int | None = None) -> ExternalModel:
    """The torchvision/timm model ``arch`` with dual-route ``norm`` layers and input normalization.

    ``image_size`` is the input the model is built for where its constructor fixes one (ViTs), and
    ``patch_size`` a timm ViT's patch side; ``model.input_args`` holds those of the two the model took.
    """
    library, name = split_arch(check_arch(arch))
    build = _torchvision_net if library == "torchvision" else _timm_net
    try:
        net, used = build(name, num_classes, in_channels, image_size, patch_size)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        sizes = f", image size {image_size}" if image_size is not None else ""
        sizes += f", patch size {patch_size}" if patch_size is not None else ""
        raise ModelError(f"{arch} cannot be built with num_classes={num_classes}, in_channels={in_channels}{sizes}: "
                         f"{first}") from None
    _check_patches(arch, net)
    net = convert_norms(net, norm)
    left = unconverted_norms(net)
    if left:
        found = ", ".join(f"{kind} x{count}" for kind, count in left.most_common())
        raise ModelError(f"{arch} has norm layers that cannot be made dual-route: {found} (BatchNorm2d, timm's "
                         "BatchNormAct2d, LayerNorm and GroupNorm convert); pick an architecture with those, such as "
                         "timm:resnet18, timm:convnext_atto or timm:vit_tiny_patch16_224")
    if not any(is_norm(m) for m in net.modules()):
        raise ModelError(f"{arch} has no norm layer to make dual-route; pick one with BatchNorm, LayerNorm or GroupNorm "
                         "layers, such as torchvision:resnet18")
    model = ExternalModel(net, mean, std, arch, num_classes)
    model.input_args = {"image_size": image_size} if used and image_size is not None else {}
    if "patch_size" in used:
        model.input_args["patch_size"] = patch_size
    check_logits(model, arch, in_channels, image_size if used else None)
    return model


def constructor_call(arch: str, num_classes: int, in_channels: int, image_size: ImageSize | None = None,
                     patch_size: int | None = None) -> str:
    """The library call whose model takes an exported state_dict, in words (recorded in export files)."""
    library, name = split_arch(arch)
    size = image_size if image_size is None or isinstance(image_size, int) else tuple(image_size)
    if library == "timm":
        chans = f", in_chans={in_channels}" if in_channels != 3 else ""
        chans += f", img_size={size!r}" if size is not None else ""
        chans += f", patch_size={patch_size}" if patch_size is not None else ""
        return f"timm.create_model({name!r}, num_classes={num_classes}{chans})"
    sized = f", image_size={size!r}" if size is not None else ""
    call = f"torchvision.models.{name}(num_classes={num_classes}{sized})"
    if in_channels != 3:
        call += f" with its first 3-channel Conv2d replaced by one taking {in_channels} channels"
    return call
