"""The shared digits-CNN pruning protocol of ``benchmarks/adaptive.py``.

Plain torch + numpy + scikit-learn (no slimtorch import): the same file runs in slimtorch's environment and inside
the Intel Neural Compressor venv (``benchmarks/peers/inc_digits.py``), so that both sides train the same model on
the same data, in the same order, with the same optimizer and schedule, and are measured by the same function.

The protocol (pinned by the constants below; change them only for both sides at once):

* Data: scikit-learn's 8x8 digits (1797 images), pixels 0..16 scaled to [-1, 1], split 75/25 stratified with
  ``random_state=0`` (1347 train, 450 test): the same split as ``tests/quantization/cnn_data.py::digits_data``.
* Model (``DigitsCNN``, no BatchNorm, no dropout): conv1 Conv2d(1,32,3,p1) - ReLU - conv2 Conv2d(32,64,3,p1,s2)
  - ReLU - conv3 Conv2d(64,64,3,p1) - ReLU - flatten - fc1 Linear(1024,128) - ReLU - fc2 Linear(128,10).
  Weights: 288 / 18,432 / 36,864 / 131,072 / 1,280, so a uniform per-layer sparsity hits layers of very different
  size and sensitivity alike. fc2 is the classifier head and is never pruned (both libraries leave the last
  Linear out by default). conv1 has one input channel, so "N:M" patterns cannot apply to it (slimtorch leaves it
  out and says why); "4x1" can (blocks of 4 output channels at one kernel position).
* Seed s: ``torch.manual_seed(s)`` before the model is built (initial weights), and the batch order from
  ``torch.Generator().manual_seed(s)`` (a fresh permutation of the training set per epoch, batches of 64, the
  last short batch of an epoch dropped). One intra-op thread (``torch.set_num_threads(1)``) for determinism.
* Optimizer: Adam, lr 1e-3, torch's default betas/eps, no weight decay, one optimizer for the whole run (its
  state carries over from the dense phase into the pruning phase).
* Schedule, counted in optimizer updates: ``PRETRAIN`` dense updates (no pruning library attached), then the
  pruning library is attached with start_step 0, end_step ``END_STEP``, frequency ``FREQUENCY``, exp decay
  (Intel Neural Compressor's meaning of the steps, which slimtorch shares: masks updated at the beginning of
  pruning-phase updates 0, F, 2F, ..., END_STEP, the first pruning nothing; the target is reached at update
  END_STEP), then the remaining ``FINETUNE`` updates at the final masks. Every method runs exactly
  ``PRETRAIN + END_STEP + FINETUNE`` updates on the same batches.
  The pruning phase is the MiniLM one (``_distill.py``: 60 + 20 updates, masks every 5, exp decay). It was chosen
  on one criterion that does not look at the global-scope results: the dense model reaches ~97-98% and uniform
  80% 4x1 pruning ends clearly below it (seeds 0-2: dense 97.6/97.8/96.9%, uniform 4x1 95.1/94.7/95.8%). A first
  try, 200 + 100 updates with masks every 10, let uniform 4x1 recover to the dense accuracy (96.7/97.8/96.9%),
  leaving no room for allocation to show; 40 + 10 (uniform 92.4-94.9%) and 100 + 0 (93.3-96.7%) were also
  looked at for uniform only.
* Evaluation: accuracy (and mean cross-entropy) on the 450 held-out test images, in eval mode (the model has no
  mode-dependent layer).
"""
from __future__ import annotations

import platform
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEEDS = (0, 1, 2)
BATCH_SIZE = 64
LR = 1e-3
PRETRAIN = 300      # dense updates before the pruning library is attached (~14 epochs)
START_STEP = 0      # pruning phase, counted from the first update after PRETRAIN
END_STEP = 60       # target reached at pruning-phase update 60 (as _distill.py)
FREQUENCY = 5       # masks every 5 updates (as _distill.py)
FINETUNE = 20       # updates at the final masks after END_STEP (as _distill.py)
DECAY = "exp"
PRUNE_UPDATES = END_STEP + FINETUNE
TOTAL_UPDATES = PRETRAIN + PRUNE_UPDATES

LAYERS = ("conv1", "conv2", "conv3", "fc1")  # prunable (fc2 is the head)
HEAD = "fc2"


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)  # 8x8 -> 4x4
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def digits_data() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (x_train [1347,1,8,8], y_train, x_test [450,1,8,8], y_test): scaled to [-1, 1], 75/25 stratified split,
    random_state 0 (as tests/quantization/cnn_data.py::digits_data)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0  # pixels are 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=d.target)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def batch_order(seed: int, n_train: int, n_updates: int = TOTAL_UPDATES) -> List[torch.Tensor]:
    """Index tensors of the ``n_updates`` training batches of one seed (a new permutation per epoch)."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = n_train // BATCH_SIZE
    out: List[torch.Tensor] = []
    while len(out) < n_updates:
        perm = torch.randperm(n_train, generator=g)
        out.extend(perm[i * BATCH_SIZE:(i + 1) * BATCH_SIZE] for i in range(per_epoch))
    return out[:n_updates]


def setup(seed: int):
    """Seeded model, optimizer, data and batch order -> (model, optimizer, data, batches). One thread."""
    torch.set_num_threads(1)
    data = digits_data()
    torch.manual_seed(seed)
    model = DigitsCNN()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    return model, opt, data, batch_order(seed, len(data[1]))


def train(model: nn.Module, opt: torch.optim.Optimizer, data, batches, first: int, last: int,
          *, after_update: Optional[Callable[[int], None]] = None) -> List[float]:
    """Updates ``first``..``last - 1`` of the protocol (indices into ``batches``) -> losses.

    One forward, backward and ``opt.step()`` per update; a hands-free pruning library hooks those itself."""
    x, y = data[0], data[1]
    losses = []
    model.train()
    for i in range(first, last):
        idx = batches[i]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if after_update is not None:
            after_update(i)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data) -> Dict[str, float]:
    """Held-out accuracy and mean cross-entropy (the model is put in eval mode and left there)."""
    model.eval()
    logits = model(data[2])
    return {"accuracy": float((logits.argmax(1) == data[3]).float().mean()),
            "test_loss": float(F.cross_entropy(logits, data[3]))}


def pretrain(seed: int):
    """The dense phase of seed ``seed`` -> (model, optimizer, data, batches, dense metrics, losses)."""
    model, opt, data, batches = setup(seed)
    losses = train(model, opt, data, batches, 0, PRETRAIN)
    dense = evaluate(model, data)
    model.train()
    return model, opt, data, batches, dense, losses


# --------------------------------------------------------------------------------------------------------------------
# checks on the final weights (matrix view [out, kh*kw*in] for convs, as both libraries use)
# --------------------------------------------------------------------------------------------------------------------
def matrix(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach()
    if w.dim() == 4:
        w = w.permute(0, 2, 3, 1)
    return w.reshape(w.shape[0], -1)


def pattern_check(weight: torch.Tensor, pattern: str) -> Dict[str, object]:
    """For ``pattern`` "RxC" (R output rows x C inputs, kept or dropped whole) or "N:M" (at most N kept of M
    along the input, NVIDIA's convention; a group may also stay fully dense, the partial N:M of a density above
    N/M): counts of units that break the pattern, units pruned, units in all."""
    w = matrix(weight) != 0
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        if w.shape[1] % m:
            return {"violations": -1, "units": 0, "pruned_units": 0}
        kept = w.reshape(-1, m).sum(1)
        return {"violations": int(((kept > n) & (kept < m)).sum()), "units": kept.numel(),
                "pruned_units": int((kept <= n).sum())}
    r, c = (int(v) for v in pattern.split("x"))
    o, i = w.shape
    if o % r or i % c:
        return {"violations": -1, "units": 0, "pruned_units": 0}
    nz = w.reshape(o // r, r, i // c, c).sum((1, 3))
    return {"violations": int(((nz != 0) & (nz != r * c)).sum()), "units": nz.numel(),
            "pruned_units": int((nz == 0).sum())}


def layer_sparsities(model: nn.Module, names) -> Dict[str, Dict[str, object]]:
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        w = mods[n].weight.detach()
        out[n] = {"shape": list(w.shape), "weights": w.numel(), "zeros": int((w == 0).sum()),
                  "sparsity": float((w == 0).sum()) / w.numel()}
    return out


def track_sparsity(model: nn.Module, names) -> Tuple[List[float], object]:
    """Record, at every forward of ``model`` from now on, the fraction of zeros in the named layers' weights: the
    sparsity the update's forward actually sees. Register it AFTER the pruning library's own hooks (a library
    that prunes in a forward pre-hook, as INC does, then runs first). -> (the list it appends to, hook handle)."""
    mods = dict(model.named_modules())
    weights = [mods[n].weight for n in names]
    total = sum(w.numel() for w in weights)
    seen: List[float] = []

    def hook(module, args):
        if module.training:
            with torch.no_grad():
                seen.append(round(sum(int((w == 0).sum()) for w in weights) / total, 6))

    return seen, model.register_forward_pre_hook(hook)


def environment() -> Dict[str, str]:
    import sklearn

    return {"python": platform.python_version(), "torch": torch.__version__, "sklearn": sklearn.__version__,
            "numpy": np.__version__, "threads": str(torch.get_num_threads()), "machine": platform.machine()}


def protocol() -> Dict[str, object]:
    return {"model": "DigitsCNN conv1(1-32) conv2(32-64,s2) conv3(64-64) fc1(1024-128) fc2(128-10, head)",
            "data": "sklearn load_digits, [-1,1], 75/25 stratified random_state 0", "batch": BATCH_SIZE,
            "optimizer": "Adam", "lr": LR, "pretrain_updates": PRETRAIN,
            "start_step": START_STEP, "end_step": END_STEP, "frequency": FREQUENCY, "finetune_updates": FINETUNE,
            "total_updates": TOTAL_UPDATES, "decay": DECAY}


