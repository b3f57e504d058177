"""SmoothQuant: the scale formula, discovery of foldable groups, the float-exactness guarantee, the int8 gain."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import CalibrationError, ConfigError
from slimtorch.quantization.calibrate import calibrate
from slimtorch.quantization.observers import MinMaxObserver
from slimtorch.quantization.qdq import QDQLinear, qdq_class_for
from slimtorch.quantization.smoothquant import ALPHA_GRID, ChannelStats, find_smoothing_groups, smooth, smoothing_scales
from tests.conftest import token_batches


# -- a small pre-LN transformer with planted activation outliers --------------------------------------------------
class Block(nn.Module):
    def __init__(self, d=32, heads=4, ff=64):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        h = self.ln1(x)
        b, t, d = h.shape
        q, k, v = (m(h).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PreLN(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


OUTLIERS = [3, 11, 20]


def planted_model():
    """Pre-LN blocks whose norm outputs and value outputs have a few channels x100 (the LLM outlier pattern), with
    the matching weight columns /100 so the float function stays ordinary."""
    torch.manual_seed(0)
    model = PreLN().eval()
    with torch.no_grad():
        for blk in model.blocks:
            for ln, lins in ((blk.ln1, (blk.q, blk.k, blk.v)), (blk.ln2, (blk.fc1,))):
                ln.weight[OUTLIERS] *= 100.0
                ln.bias[OUTLIERS] *= 100.0
                for lin in lins:
                    lin.weight[:, OUTLIERS] /= 100.0
            blk.v.weight[OUTLIERS] *= 100.0
            blk.v.bias[OUTLIERS] *= 100.0
            blk.o.weight[:, OUTLIERS] /= 100.0
    return model


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 16, 32, generator=g) for _ in range(n)]


def linear_names(model):
    return [n for n, m in model.named_modules() if qdq_class_for(m) is not None]


def static_int8(model, calib, act_dtype="int8", act_symmetric=True):
    """Every Linear as a static QDQLinear: minmax per-tensor activations from ``calib``, per-channel int8 weights."""
    q = copy.deepcopy(model)
    names = linear_names(q)
    obs = calibrate(q, calib, num_batches=len(calib), module_filter=names, progress=False,
                    observer_factory=lambda n, m: MinMaxObserver(act_dtype, act_symmetric))
    modules = dict(q.named_modules())
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, QDQLinear.from_float(modules[name], act_qparams=obs[name].qparams(),
                                                             act_dtype=act_dtype, act_symmetric=act_symmetric))
    return q


def rel_mse(model, reference, batches):
    with torch.no_grad():
        num = sum(float(((model(x) - reference(x)) ** 2).sum()) for x in batches)
        return num / sum(float((reference(x) ** 2).sum()) for x in batches)


def input_absmax(model, names, batches):
    obs = calibrate(model, batches, num_batches=len(batches), module_filter=names, progress=False,
                    observer_factory=lambda n, m: ChannelStats())
    return {n: float(o.absmax.max()) for n, o in obs.items()}


# -- smoothing_scales ---------------------------------------------------------------------------------------------
def test_scales_hand_computed():
    act, w = torch.tensor([4.0, 1.0, 9.0]), torch.tensor([1.0, 4.0, 1.0])
    # s = sqrt(act) / sqrt(w) = [2/1, 1/2, 3/1]
    assert torch.allclose(smoothing_scales(act, w, 0.5), torch.tensor([2.0, 0.5, 3.0]))
    # alpha 0.25: act^0.25 / w^0.75 = [4^.25, 1/4^.75, 9^.25]
    assert torch.allclose(smoothing_scales(act, w, 0.25), torch.tensor([4 ** 0.25, 4 ** -0.75, 9 ** 0.25]))


def test_scales_alpha_limits():
    act, w = torch.tensor([8.0, 0.5, 2.0]), torch.tensor([0.25, 2.0, 1.0])
    assert torch.allclose(smoothing_scales(act, w, 1.0), act)  # all of the range goes to the weights: X / s = 1
    assert torch.allclose(smoothing_scales(act, w, 0.0), 1.0 / w)  # W * s has max |W_j| = 1 in every column


def test_scales_zero_and_extreme_channels():
    act = torch.tensor([0.0, 3.0, 4.0, 1e30, 1e-30])
    w = torch.tensor([2.0, 0.0, 1.0, 1e-30, 1.0])
    s = smoothing_scales(act, w, 0.5)
    assert s[0] == 1.0 and s[1] == 1.0  # dead activation / dead weight: untouched
    assert s[2] == 2.0
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[3] == 1.0 and s[4] == 1.0  # below eps on one side counts as dead, whatever the other side


def test_scales_bad_input():
    with pytest.raises(ConfigError, match="alpha"):
        smoothing_scales(torch.ones(3), torch.ones(3), 1.5)
    with pytest.raises(ConfigError, match="one entry per input channel"):
        smoothing_scales(torch.ones(3), torch.ones(4), 0.5)
    with pytest.raises(CalibrationError, match="NaN"):
        smoothing_scales(torch.tensor([1.0, float("nan")]), torch.ones(2), 0.5)


def test_channel_stats_minmax_and_seeded_sample():
    xs = [torch.randn(3, 50, 6) * torch.arange(1, 7) for _ in range(4)]
    a, b = ChannelStats(max_rows=64), ChannelStats(max_rows=64)
    for x in xs:
        a.observe(x)
        b.observe(x)
    flat = torch.cat([x.reshape(-1, 6) for x in xs])
    assert torch.equal(a.absmax, flat.abs().amax(0)) and torch.equal(a.min, flat.amin(0))
    assert a.rows.shape == (64, 6) and torch.equal(a.rows, b.rows)  # capped, and the same every run
    assert all(any(torch.equal(r, f) for f in flat) for r in a.rows[:8])  # real rows, not mixtures
    assert a.rows[:, 0].abs().mean() < a.rows[:, 5].abs().mean()  # the channels stay apart
    with pytest.raises(CalibrationError, match="1 NaN"):
        a.observe(torch.tensor([[1.0, float("nan"), 0, 0, 0, 0]]))


# -- discovery and the exactness guarantee ------------------------------------------------------------------------
def test_discovery_on_pre_ln_blocks():
    model = planted_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = find_smoothing_groups(model, data(1, 0)[0])
    found = {(g.prev, tuple(g.linears), g.source): g.skip_reason for g in groups}
    for i in range(2):
        b = f"blocks.{i}"
        assert found[(f"{b}.ln1", (f"{b}.q", f"{b}.k", f"{b}.v"), "identity")] is None
        assert found[(f"{b}.ln2", (f"{b}.fc1",), "identity")] is None
        assert found[(f"{b}.v", (f"{b}.o",), "pair")] is None  # through softmax(q k^T) @ v: exact per channel
        reason = found[("", (f"{b}.fc2",), "none")]  # GELU between fc1 and fc2
        assert "no earlier Linear" in reason and f"{b}.fc1" in reason
    assert len(groups) == 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # probes were reverted bit-exactly


class PostLN(nn.Module):
    """BERT-style: the LayerNorm output feeds the Linear and the residual add."""

    def __init__(self, d=16):
        super().__init__()
        self.ln, self.fc, self.ln_out = nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.ln(x)
        return self.ln_out(h + self.fc(h))


def test_post_ln_group_is_not_folded():
    torch.manual_seed(0)
    model = PostLN().eval()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 2.0)
    x = [b[:, :, :16] for b in data(2, 1)]
    ref = model(x[0]).detach()
    report = smooth(model, x, linear_names=["fc"], alpha=0.5, num_batches=2)
    assert report.groups == []
    assert [g.prev for g in report.skipped] == ["ln"] and "residual" in report.skipped[0].skip_reason
    assert torch.equal(model(x[0]), ref)


def test_conv1d_and_rmsnorm_fold():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.c_fc, self.rms, self.fc = nn.LayerNorm(16), Conv1D(24, 16), nn.RMSNorm(24), nn.Linear(24, 8)

        def forward(self, x):
            return self.fc(self.rms(self.c_fc(self.ln(x))))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.ln.weight[[1, 5]] = 50.0
        model.rms.weight.uniform_(0.5, 2.0)
    x = [torch.randn(2, 8, 16) for _ in range(2)]
    ref, w_before = model(x[0]).detach(), model.c_fc.weight.detach().clone()
    report = smooth(model, x, linear_names=["c_fc", "fc"], alpha=0.5, num_batches=2)
    assert sorted(g.prev for g in report.groups) == ["ln", "rms"], str(report)
    assert torch.allclose(model(x[0]), ref, rtol=1e-4, atol=1e-5)
    ratio = model.c_fc.weight.detach() / w_before  # Conv1D stores [in, out]: whole input rows scaled by s_j
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5) and ratio[1, 0] > 2.0


# -- the entry point ----------------------------------------------------------------------------------------------
def test_smooth_keeps_float_and_cuts_int8_error():
    model, calib, held = planted_model(), data(6, 0), data(4, 1)
    names = linear_names(model)
    smoothed = copy.deepcopy(model)
    report = smooth(smoothed, calib, linear_names=names, alpha=0.5, num_batches=6)
    print(report)
    assert len(report.groups) == 6 and len(report.skipped) == 2
    with torch.no_grad():
        for x in held:
            ref = model(x)
            assert (smoothed(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    before, after = input_absmax(model, names, calib), input_absmax(smoothed, names, calib)
    for g in report.groups:
        assert after[g.linears[0]] < 0.2 * before[g.linears[0]], (g.prev, before, after)
        assert g.act_absmax_after < 0.2 * g.act_absmax_before
    for act_dtype, sym in (("int8", True), ("uint8", False)):
        err_plain = rel_mse(static_int8(model, calib, act_dtype, sym), model, held)
        err_smooth = rel_mse(static_int8(smoothed, calib, act_dtype, sym), model, held)
        print(f"{act_dtype}: relative MSE without SmoothQuant {err_plain:.3e}, with {err_smooth:.3e}")
        assert err_smooth * 3 <= err_plain


def test_auto_alpha_is_on_the_grid_and_deterministic():
    model, calib = planted_model(), data(3, 0)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        report = smooth(m, calib, linear_names=linear_names(m), alpha="auto", num_batches=3, max_rows=256)
        runs.append(([g.alpha for g in report.groups], m.state_dict()))
    alphas = runs[0][0]
    assert len(alphas) == 6 and all(a in ALPHA_GRID for a in alphas)
    assert alphas == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    assert any(a > 0.0 for a in alphas)  # the outliers are worth migrating


def test_explicit_pairs_and_one_shot_loader():
    model = planted_model()
    ref = model(data(1, 0)[0]).detach()
    report = smooth(model, iter(data(2, 0)), linear_names=["blocks.0.o", "blocks.0.fc2"], alpha=0.5, num_batches=2,
                    auto_pairs=False, extra_pairs=[("blocks.0.v", ["blocks.0.o"]), ("blocks.0.fc1", ["blocks.0.fc2"])])
    assert [(g.prev, g.source) for g in report.groups] == [("blocks.0.v", "explicit")]
    assert [g.prev for g in report.skipped] == ["blocks.0.fc1"] and "not linear" in report.skipped[0].skip_reason
    assert torch.allclose(model(data(1, 0)[0]), ref, rtol=1e-4, atol=1e-4)
    assert "blocks.0.v" in str(report) and "skipped" in str(report)
    with pytest.raises(ConfigError, match="blocks.0.nope"):
        smooth(model, data(1, 0), linear_names=["blocks.0.o"], alpha=0.5, num_batches=1,
               extra_pairs=[("blocks.0.nope", ["blocks.0.o"])])


def test_no_groups_is_an_empty_report():
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    w = model[0].weight.detach().clone()
    report = smooth(model, [torch.randn(2, 8)], linear_names=["0"], alpha=0.5, num_batches=1)
    assert report.groups == [] and [g.linears for g in report.skipped] == [["0"]]
    assert torch.equal(model[0].weight, w)
    assert "0 groups smoothed" in str(report)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), "alpha must be a number in"), (dict(alpha=-0.1), "alpha"), (dict(alpha="best"), "alpha"),
    (dict(alpha=True), "alpha"), (dict(alpha=0.5, act_dtype="int4"), "activation scheme"),
    (dict(alpha=0.5, num_batches=0), ">= 1"),
])
def test_config_errors(kwargs, match):
    kwargs = {"num_batches": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        smooth(planted_model(), data(1, 0), linear_names=["blocks.0.q"], **kwargs)


def test_nan_activations_name_the_module():
    model, calib = planted_model(), data(3, 0)
    calib[2] = calib[2].clone()
    calib[2][0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"batch 2: input of module 'blocks\.0\.(q|fc1|o)'"):
        smooth(model, calib, linear_names=linear_names(model), alpha=0.5, num_batches=3)
    with pytest.raises(CalibrationError, match=r"input of module 'blocks\.0\.q'"):  # on the discovery batch
        smooth(model, calib[2:], linear_names=linear_names(model), alpha=0.5, num_batches=1)


# -- the real model -----------------------------------------------------------------------------------------------
def _embed(model, batches):
    with torch.no_grad():
        out = []
        for b in batches:
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)


def test_minilm_float_embeddings_unchanged(minilm, paragraphs):
    model, tok = minilm
    batches = list(token_batches(tok, paragraphs[:16], 8, 64))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    assert len(names) == 36
    ref = _embed(model.eval(), batches)
    report = smooth(model, batches, linear_names=names, alpha=0.5, num_batches=2)
    print(report)
    # post-LN BERT: every LayerNorm output also feeds a residual add, so only value -> attention output folds
    assert sorted(g.prev for g in report.groups) == [f"encoder.layer.{i}.attention.self.value" for i in range(6)]
    assert all(g.linears == [g.prev.replace("self.value", "output.dense")] for g in report.groups)
    skipped = {g.prev or g.linears[0]: g.skip_reason for g in report.skipped}
    assert len(skipped) == 18
    assert "residual" in skipped["encoder.layer.0.attention.output.LayerNorm"]
    assert "residual" in skipped["embeddings.LayerNorm"]
    assert "intermediate.dense" in skipped["encoder.layer.3.output.dense"]
    assert all(g.act_absmax_after < g.act_absmax_before for g in report.groups)
    cos = (_embed(model, batches) * ref).sum(-1)
    assert float(cos.min()) > 1 - 1e-5
    assert torch.allclose(_embed(model, batches), ref, atol=1e-4)
