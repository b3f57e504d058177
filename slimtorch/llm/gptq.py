r"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): round a Linear's weight to its grid one input column at a time and
push each column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs, so that ``||X W^T - X Q^T||^2`` over the calibration tokens stays small. Pure functions: no model, no hooks.

The Hessian of the layer-wise loss is ``H = 2/n * sum_t x_t x_t^T`` ([in, in], float32) over the n calibration tokens
``x_t`` reaching the Linear (:class:`HessianAccumulator`). :func:`gptq_quantize` then follows the reference algorithm
(IST-DASLab/gptq, as in AutoGPTQ and llm-compressor):

1. dead inputs (``H_ii == 0``: the column never saw a non-zero input) get ``H_ii = 1`` and ``W[:, i] = 0``;
2. dampening: ``H += dampening * mean(diag(H)) * I``;
3. ``U = cholesky(H^-1, upper)``, ``H^-1`` from the Cholesky factor of H (``cholesky_inverse``);
4. column by column (in blocks of ``block_size`` whose updates to the later columns are applied lazily, one matmul
   per block): ``q = quant(w_j)``, ``e = (w_j - q) / U_jj``, ``W[:, k] -= e * U_jk`` for k > j; the loss
   ``error = 1/2 * sum e^2`` equals ``1/2 * tr((W - Q) H_damped (W - Q)^T)`` (not with ``preserve_zeros``).

Group scales (our choice, documented because implementations differ):

- default (``static_groups=False``): a group's scale and zero point come from the CURRENT weights, error updates
  included, when its first column is reached, as the GPTQ paper and the reference do. The reference reads them from
  the weights as of the start of the current lazy block, so for groups smaller than ``block_size`` its result depends
  on ``block_size``; we apply the pending in-block updates first, so ``block_size`` only changes float rounding;
- ``static_groups=True``: every group's qparams from the weights before any update (= :func:`quantize_rtn`'s), what
  llm-compressor does (its observer runs once, before the loop) and AutoGPTQ's ``static_groups=True``.

``act_order``: columns are processed by descending ``H_ii`` (the most active inputs first, while many columns are
still free to absorb their error). With groups and ``static_groups=False`` a group is ``group_size`` consecutive
columns of that ORDER (AutoGPTQ ``desc_act=True``, llm-compressor ``actorder="group"``); the groups are then no runs
of input columns, so the result carries ``g_idx`` (int32 [in], each original column's group). With
``static_groups=True`` groups stay runs of input columns in their ORIGINAL order (llm-compressor's default
``actorder="static"``, AutoGPTQ ``static_groups=True``) and ``g_idx`` is None: same runtime cost as no act order.
``q``, ``scale``, ``zero`` and ``quantized`` are always in the original column order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import CalibrationError, ConfigError
from ..quantization.grid import WeightGrid, check_group_size, dequantize_groups, round_to_grid, row_qparams


def min_tokens_for(in_features: int) -> int:
    """Calibration tokens GPTQ needs for a Linear with ``in_features`` inputs: ``in_features``.

    The Hessian of n tokens has rank <= n. Below ``in_features`` tokens it is singular: dampening alone keeps it
    invertible, and GPTQ then fits the few input directions it saw, no better than RTN (worse on other text).
    ``in_features`` tokens is the least that can give a full-rank Hessian; more is better (128 samples x 512 tokens
    = 65536 tokens is typical, above every width of a 70B model's Linears).
    """
    return int(in_features)


def check_enough_tokens(tokens: int, in_features: int, where: str = "", *, algorithm: str = "GPTQ",
                        fallback: str = "use algorithm 'rtn' here") -> None:
    """Raise :class:`CalibrationError` when ``tokens < min_tokens_for(in_features)``, saying how many are needed.
    ``algorithm`` / ``fallback`` name what needs them and what works with fewer (SparseGPT: Wanda)."""
    need = min_tokens_for(in_features)
    if tokens < need:
        raise CalibrationError(
            f"{where or 'a Linear'} saw {tokens} calibration tokens; {algorithm} needs at least {need} (its "
            f"in_features): the Hessian of n tokens has rank <= n, and a rank-deficient one makes {algorithm} fit the "
            f"few tokens seen. Calibrate with more or longer samples, or {fallback}")


class HessianAccumulator:
    """Running ``H = 2/n * sum_t x_t x_t^T`` over every token row seen by :meth:`add`, in float32.

    Memory: one [in, in] float32 matrix per Linear (4 * in^2 bytes: 64 MiB for in = 4096, 784 MiB for 14336), on
    the device of the first input unless ``device`` is given. Linears that read the same input (q/k/v, gate/up)
    can share one accumulator; :func:`gptq_quantize` does not modify the Hessian it is given. ``in_features`` may
    be left to the first input.
    """

    def __init__(self, in_features: Optional[int] = None, *, device: Union[str, torch.device, None] = None,
                 where: str = ""):
        self.where = where
        self._in_features = None if in_features is None else int(in_features)
        self._device = None if device is None else torch.device(device)
        self._hessian: Optional[Tensor] = None  # allocated by the first add(), on its input's device
        self._tokens = 0

    @property
    def in_features(self) -> Optional[int]:
        return self._in_features

    @property
    def tokens(self) -> int:
        """Token rows seen so far (``x.reshape(-1, in).shape[0]`` summed over :meth:`add`)."""
        return self._tokens

    def add(self, x: Tensor) -> None:
        """Fold in the rows of ``x`` ([..., in]: every leading index is one token)."""
        if x.dim() == 0 or (self._in_features is not None and x.shape[-1] != self._in_features):
            raise CalibrationError(f"{self.where or 'HessianAccumulator'}: input of shape {tuple(x.shape)} does not "
                                   f"end in in_features {self._in_features}")
        if self._hessian is None:
            self._in_features = x.shape[-1]
            self._hessian = torch.zeros(self._in_features, self._in_features, dtype=torch.float32,
                                        device=self._device or x.device)
        rows = x.detach().reshape(-1, x.shape[-1]).to(device=self._hessian.device, dtype=torch.float32)
        added = rows.shape[0]
        if added == 0:
            return
        total = self._tokens + added
        # H_new = n/(n+m) * H + 2/(n+m) * X^T X: a running mean, so H keeps the scale of one token whatever n is
        self._hessian.mul_(self._tokens / total).addmm_(rows.T, rows, alpha=2.0 / total)
        self._tokens = total

    @property
    def hessian(self) -> Tensor:
        """The [in, in] float32 Hessian (the accumulator's own tensor, not a copy); zeros before any token when
        ``in_features`` was given."""
        if self._hessian is None:
            if self._in_features is None:
                raise CalibrationError(f"{self.where or 'HessianAccumulator'}: no input seen yet (0 tokens), so "
                                       f"in_features is unknown; calibration data never reached this Linear")
            return torch.zeros(self._in_features, self._in_features, dtype=torch.float32,
                               device=self._device or torch.device("cpu"))
        return self._hessian


@dataclass
class GPTQResult:
    """``q`` (grid.storage_dtype [out, in]), ``scale`` (float32 [out, groups]), ``zero`` (int32 [out, groups]),
    ``g_idx`` (int32 [in] or None: see the module docstring), ``quantized`` (the dequantized weight, the input's
    dtype) and ``error``, the GPTQ loss ``1/2 * sum_j (w_j - q_j)^2 / U_jj^2`` summed over rows and columns."""

    q: Tensor
    scale: Tensor
    zero: Tensor
    g_idx: Optional[Tensor]
    quantized: Tensor
    error: float


def prepared_hessian(hessian: Tensor, device: torch.device, where: str = "") -> Tuple[Tensor, Tensor]:
    """``(H, dead)``: a float32 copy of ``hessian`` on ``device`` with ``H_ii = 1`` for every dead input (one that
    never fired: nothing to compensate with it, and its weight does not matter: the caller zeroes it), and the
    indices of those inputs. CalibrationError when every input is dead."""
    H = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    dead = torch.nonzero(H.diagonal() == 0).squeeze(1)
    if dead.numel() == H.shape[0]:
        raise CalibrationError(f"{where or 'a Linear'}: its Hessian is all zeros: no calibration token (or only zero "
                               "inputs) reached it; check that the calibration data runs through this Linear")
    H[dead, dead] = 1.0
    return H, dead


def upper_inverse_factor(H: Tensor, dampening: float, where: str = "") -> Tensor:
    """``U = cholesky((H + dampening * mean(diag H) * I)^-1, upper)``, the factor GPTQ and SparseGPT walk along.
    Dampens ``H`` in place; each [in, in] intermediate is dropped as soon as the next exists (two at a time)."""
    damp = dampening * float(H.diagonal().mean())
    H.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise _not_positive_definite(where, H.shape[0], dampening, damp)
    inverse = torch.cholesky_inverse(lower)
    del lower
    U, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        raise _not_positive_definite(where, H.shape[0], dampening, damp)
    return U


def _check_finite(tensor: Tensor, what: str, where: str) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise CalibrationError(f"{where or 'a Linear'}: the {what} (shape {tuple(tensor.shape)}) has "
                               f"{int((~finite).sum())} NaN/inf values; GPTQ needs finite ones (a NaN in the Hessian "
                               f"comes from a NaN/inf in the layer's calibration inputs)")


def _not_positive_definite(where: str, in_features: int, dampening: float, damp: float) -> CalibrationError:
    return CalibrationError(
        f"{where or 'a Linear'}: the Hessian of its inputs ({in_features} x {in_features}) is not positive definite "
        f"even after dampening {dampening} (adds {damp:.3g} to its diagonal); calibrate with more tokens (at least "
        f"{min_tokens_for(in_features)}, more is better) or a larger dampening (e.g. 0.1)")


def _static_qparams(weight: Tensor, grid: WeightGrid, groups: int):
    """Per-group (scale, zero) [out, groups] of ``weight`` as it is (= quantize_rtn's)."""
    size = weight.shape[1] // groups
    pairs = [row_qparams(weight[:, g * size:(g + 1) * size], grid) for g in range(groups)]
    return torch.stack([s for s, _ in pairs], dim=1), torch.stack([z for _, z in pairs], dim=1)


def gptq_quantize(weight: Tensor, hessian: Tensor, grid: WeightGrid, *, dampening: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                  preserve_zeros: bool = False, tokens: Optional[int] = None, where: str = "") -> GPTQResult:
    """GPTQ of ``weight [out, in]`` given the inputs' ``hessian [in, in]`` (see the module docstring).

    ``dampening``: fraction of mean(diag H) added to the diagonal. ``block_size``: columns whose updates are
    batched (speed only). ``act_order`` / ``static_groups``: order and group scales, module docstring.
    ``preserve_zeros``: zero weights (a pruned model's) receive no error updates, so they stay exactly 0.
    ``tokens``: calibration tokens behind the Hessian; when given, fewer than :func:`min_tokens_for` raise.
    Computes in float32 on the weight's device; the inputs are not modified.

    Raises :class:`ConfigError` (group size, block size, dampening) and :class:`CalibrationError` (too few tokens,
    NaN/inf, no token at all, a Hessian not positive definite), naming ``where``.
    """
    name = where or "a Linear"
    if weight.dim() != 2:
        raise CalibrationError(f"{name}: expected a 2-d [out, in] weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if tuple(hessian.shape) != (in_features, in_features):
        raise CalibrationError(f"{name}: the Hessian must be [{in_features}, {in_features}] for a weight of shape "
                               f"{tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"{name}: GPTQ block_size must be a positive number of columns, got {block_size!r}")
    if not (isinstance(dampening, (int, float)) and math.isfinite(dampening) and dampening >= 0):
        raise ConfigError(f"{name}: GPTQ dampening must be a finite fraction >= 0 (0.01 is usual), got {dampening!r}")
    check_group_size(in_features, grid, where)
    if tokens is not None:
        check_enough_tokens(tokens, in_features, where)
    _check_finite(weight, "weight", where)
    _check_finite(hessian, "Hessian", where)

    device = weight.device
    W = weight.detach().to(dtype=torch.float32, copy=True)
    H, dead = prepared_hessian(hessian, device, where)
    W[:, dead] = 0.0
    keep = (W != 0).to(torch.float32) if preserve_zeros else None

    size = in_features if grid.group_size is None else grid.group_size
    groups = in_features // size
    dynamic = grid.group_size is not None and not static_groups
    if dynamic:
        scale = torch.empty(out_features, groups, dtype=torch.float32, device=device)
        zero = torch.empty(out_features, groups, dtype=torch.int32, device=device)
    else:
        scale, zero = _static_qparams(W, grid, groups)

    perm: Optional[Tensor] = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    # the group of the column processed at position p: runs of the processing order, except static act order whose
    # groups are runs of the original columns
    position_group: List[int] = ((perm // size).tolist() if (act_order and not dynamic) else
                                 [p // size for p in range(in_features)])

    U = upper_inverse_factor(H, dampening, where)
    del H

    # per-column work reads contiguous rows: the block and the integers transposed ([columns, out]), each group's
    # scale and zero as a float32 row
    QT = torch.empty(in_features, out_features, dtype=torch.float32, device=device)  # integers, processing order
    scale_rows = scale.t().contiguous()
    zero_rows = zero.t().to(torch.float32)
    squared_errors = torch.zeros(out_features, dtype=torch.float32, device=device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        # each column's update is then a contiguous row update, several times faster than a strided column update on
        # a CPU and the same float operations, so the same bits
        W1T = W[:, i1:i2].t().contiguous()
        U1 = U[i1:i2, i1:i2]
        pivots = U1.diagonal()
        keep1T = None if keep is None else keep[:, i1:i2].t().contiguous()
        errorsT = torch.zeros_like(W1T)
        for i in range(i2 - i1):
            p = i1 + i
            if dynamic and p % size == 0:
                # the group's columns as they are now: those in this block carry every update already; those after
                # it still wait for this block's lazy update from the columns done so far
                end = p + size
                current = W1T[i:min(end, i2) - i1].t()
                if end > i2:
                    pending = errorsT[:i].t() @ U[i1:p, i2:end]
                    if keep is not None:
                        pending = pending * keep[:, i2:end]
                    current = torch.cat([current, W[:, i2:end] - pending], dim=1)
                g = p // size
                scale[:, g], zero[:, g] = row_qparams(current, grid)
                scale_rows[g] = scale[:, g]
                zero_rows[g] = zero[:, g]
            g = position_group[p]
            s, z = scale_rows[g], zero_rows[g]
            w = W1T[i]
            q = round_to_grid(w, s, z, grid.dtype)  # a fresh tensor (rounded in place there)
            QT[p] = q
            e = w.sub((q - z).mul_(s)).div_(pivots[i])
            update = torch.outer(U1[i, i + 1:], e)
            if keep1T is not None:
                update = update * keep1T[i + 1:]
            W1T[i + 1:] -= update
            errorsT[i] = e
            squared_errors += e * e
        if i2 < in_features:
            update = errorsT.t() @ U[i1:i2, i2:]
            if keep is not None:
                update = update * keep[:, i2:]
            W[:, i2:] -= update

    Q = QT.t()
    g_idx: Optional[Tensor] = None
    if perm is not None:
        inverse = torch.argsort(perm)
        Q = Q[:, inverse]
        if dynamic:
            g_idx = (torch.arange(in_features, device=device) // size)[inverse].to(torch.int32)
    q_int = Q.to(grid.storage_dtype)
    quantized = dequantize_groups(q_int, scale, zero, grid.group_size, g_idx=g_idx).to(weight.dtype)
    return GPTQResult(q=q_int, scale=scale, zero=zero, g_idx=g_idx, quantized=quantized,
                      error=float(squared_errors.sum()) / 2)
