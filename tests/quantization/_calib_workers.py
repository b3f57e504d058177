"""Process bodies for the distributed-calibration tests (importable by spawned children).

Every rank loads the same float models (saved by the parent), calibrates on its own shard of the digits data and
saves what it got: the quantized state_dict and a few report fields per case, or the error it raised.
"""
from __future__ import annotations

import copy
import datetime
import traceback
import warnings
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch import nn

import slimtorch as st

BATCH = 32
SHARD_BATCHES = 6  # per rank; the single-process reference sees both shards: 12 batches


# -- data, models, configs (shared with the parent test) ---------------------------------------------------------
def shards():
    """Two disjoint shards of the digits training images ([N, 1, 8, 8]), as lists of batches."""
    from tests.quantization.cnn_data import digits_data

    x = digits_data().x_train[:2 * BATCH * SHARD_BATCHES]
    a, b = x[:BATCH * SHARD_BATCHES], x[BATCH * SHARD_BATCHES:]
    return list(a.split(BATCH)), list(b.split(BATCH))


class LNMLP(nn.Module):
    """Linear -> LayerNorm -> Linear -> ReLU -> Linear on flattened digits: SmoothQuant folds into the LayerNorm."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = self.norm(self.inp(x.flatten(1)))
        return self.fc2(torch.relu(self.fc1(h)))


def train_lnmlp() -> LNMLP:
    from tests.quantization.cnn_data import digits_data

    data = digits_data()
    torch.manual_seed(0)
    model = LNMLP()
    with torch.no_grad():
        model.norm.weight[:3] = 20.0  # outlier channels for SmoothQuant to migrate
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(data.y_train), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    return model.eval()


def config(observer: str = "minmax", *, bias_correction: Any = False, smoothquant: Any = None, **extra) -> dict:
    if observer == "dynamic":
        return {"compression_inference": {"dynamic_quantization": {"enabled": True}}}
    section = {"enabled": True, "num_calibration_batches": 100, "bias_correction": bias_correction,
               "activation": {"dtype": "int8", "observer": observer} if observer != "uint8" else
               {"dtype": "uint8", "observer": "minmax"}, **extra}
    if smoothquant is not None:
        section["smoothquant"] = smoothquant
    return {"compression_inference": {"static_quantization": section}}


# cases run by every rank, in order: (name, model, config kwargs, quantize kwargs)
CASES: List[tuple] = [
    ("minmax", "cnn", {"observer": "minmax"}, {}),
    ("uint8", "cnn", {"observer": "uint8"}, {}),
    ("percentile", "cnn", {"observer": "percentile"}, {}),
    ("entropy", "cnn", {"observer": "entropy"}, {}),
    ("mse", "cnn", {"observer": "mse"}, {}),
    ("moving_average", "cnn", {"observer": "moving_average"}, {}),
    ("bias_correction", "cnn", {"observer": "minmax", "bias_correction": True}, {}),
    ("smoothquant", "mlp", {"smoothquant": {"enabled": True, "alpha": "auto"}}, {}),
    ("smoothquant_explicit", "mlp", {"smoothquant": {"enabled": True, "alpha": "auto", "folding": False}}, {}),
    ("accuracy", "mlp", {"accuracy_criterion": {"tolerable_loss": 0.0, "relative": False, "higher_is_better": False,
                                                 "max_trials": 3}}, {"eval_fn": "output_error"}),
    ("mpu_object", "cnn", {"observer": "percentile"}, {"mpu": "object"}),
    ("mpu_group", "cnn", {"observer": "minmax"}, {"mpu": "group"}),
    ("local", "cnn", {"observer": "minmax"}, {"mpu": "local"}),
    ("dynamic", "mlp", {"observer": "dynamic"}, {}),
]


#: slimtorch.oneshot cases (static W8A8 activation ranges from quantize's observers): name -> observer
ONESHOT_CASES = {"oneshot_minmax": "minmax", "oneshot_percentile": "percentile"}


def oneshot_config(observer: str) -> dict:
    return {"compression_inference": {"w8a8_quantization": {
        "enabled": True, "algorithm": "rtn", "activations": "static_per_tensor", "observer": observer}}}


def token_shards():
    """Two shards of random token ids for the tiny Llama, 3 batches each."""
    from tests.llm.tiny_models import VOCAB, random_tokens

    batches = [random_tokens(VOCAB, 2, 16, seed=i) for i in range(6)]
    return batches[:3], batches[3:]


def output_error(float_model: nn.Module):
    """eval_fn: relative error of the logits on the held-out digits (the same data on every rank); lower is better.
    Any quantization misses a criterion of 0, so the search ranks the layers and tries candidates."""
    from tests.quantization.cnn_data import digits_data, predict

    x = digits_data().x_test
    ref = predict(float_model, x)
    return lambda m: float((predict(m, x) - ref).norm() / ref.norm())


class MPU:
    """A Megatron/DeepSpeed-style model-parallel unit: only the data-parallel group matters here."""

    def get_data_parallel_group(self):
        return dist.group.WORLD


# -- process plumbing -------------------------------------------------------------------------------------------------
def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _close() -> None:
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def _outcome(fn) -> Dict[str, Any]:
    try:
        return {"result": fn()}
    except st.SlimError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    except Exception:
        return {"error": "unexpected: " + traceback.format_exc()}


def _result(q: nn.Module) -> Dict[str, Any]:
    report = st.quantization_report(q)
    acc = report.accuracy
    return {"state": {k: v.clone() for k, v in q.state_dict().items()},
            "calibration_batches": report.calibration_batches,
            "alphas": [g.alpha for g in report.smoothquant.groups] if report.smoothquant is not None else None,
            "fallback": None if acc is None else [r.name for r in acc.fallback],
            "trials": None if acc is None else [(t.float_layers, t.metric) for t in acc.log]}


def calibrate_shards(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Every case of CASES on this rank's shard; saves {case: {"result": ...} or {"error": ...}}."""
    _init(rank, world, init_file)
    try:
        models = torch.load(f"{out_dir}/models.pt", weights_only=False)
        data = shards()[rank]
        group = dist.new_group([0, 1])  # every rank creates every group, in the same order
        out = {}
        for name, model, cfg, kw in CASES:
            kw = dict(kw)
            if kw.get("eval_fn") == "output_error":
                kw["eval_fn"] = output_error(models[model])
            kw["mpu"] = {"object": MPU(), "group": group}.get(kw.get("mpu"), kw.get("mpu"))
            out[name] = _outcome(lambda: _result(st.quantize(models[model], config(**cfg), calib_dataloader=data,
                                                             progress=False, **kw)))
        from tests.llm.tiny_models import tiny_llama

        for name, observer in ONESHOT_CASES.items():
            out[name] = _outcome(lambda: {"state": st.oneshot(tiny_llama(), oneshot_config(observer),
                                                               token_shards()[rank], progress=False).state_dict()})
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        _close()


def _unreduced_observers(rank: int, real):
    """Rank 1's reduced activation ranges come out 1% wider (as if a reduction had been skipped or gone wrong)."""

    def fake(observers, sync, device):
        real(observers, sync, device)
        for o in observers.values() if rank == 1 else ():
            o.max_val = o.max_val * 1.01

    return fake


def disagreeing_ranks(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Cases where rank 1 differs; each rank records the error it raised. The job goes on after each error, so
    the ranks must still be in step: every rank raised at the same synchronisation point."""
    from slimtorch.quantization import steps

    _init(rank, world, init_file)
    try:
        models = torch.load(f"{out_dir}/models.pt", weights_only=False)
        data = shards()[rank]
        cnn = models["cnn"]
        other_weights = copy.deepcopy(cnn)
        if rank == 1:
            with torch.no_grad():
                other_weights[0].weight[0, 0, 0, 0] += 1e-3
        bigger = nn.Sequential(*cnn, nn.ReLU(), nn.Linear(10, 10)) if rank == 1 else cnn
        nan_data = [b.clone() for b in data]
        if rank == 1:
            nan_data[2][0, 0, 3, 3] = float("nan")

        def failing_eval(m):
            if rank == 1:
                raise RuntimeError("the evaluation set is missing on this rank")
            return 1.0

        out = {
            "config": _outcome(lambda: st.quantize(cnn, config("percentile" if rank == 1 else "minmax"),
                                                   calib_dataloader=data, progress=False)),
            "weights": _outcome(lambda: st.quantize(other_weights, config(), calib_dataloader=data,
                                                    progress=False)),
            "layers": _outcome(lambda: st.quantize(bigger, config(), calib_dataloader=data, progress=False)),
            "bad_argument": _outcome(lambda: st.quantize(cnn, config(**({"num_calibration_batches": 0}
                                                                         if rank == 1 else {})),
                                                         calib_dataloader=data, progress=False)),
            "nan": _outcome(lambda: st.quantize(cnn, config(), calib_dataloader=nan_data, progress=False)),
            "eval_fn": _outcome(lambda: st.quantize(cnn, config(), calib_dataloader=data, eval_fn=failing_eval,
                                                    progress=False)),
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = st.quantize(cnn, config(), calib_dataloader=data, eval_fn=lambda m: 0.9 + 0.02 * rank, progress=False)
        out["eval_differs"] = {"baseline": st.quantization_report(q).accuracy.baseline,
                               "warnings": [str(w.message) for w in caught if "eval_fn returned" in str(w.message)]}
        real = steps.reduce_observers
        steps.reduce_observers = _unreduced_observers(rank, real)
        try:
            out["unreduced"] = _outcome(lambda: st.quantize(cnn, config(), calib_dataloader=data, progress=False))
        finally:
            steps.reduce_observers = real
        out["after"] = _outcome(lambda: _result(st.quantize(cnn, config(), calib_dataloader=data, progress=False)))
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        _close()

