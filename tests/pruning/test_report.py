"""sparsity_report on plain, partially N:M and column-pruned models."""
import pytest
import torch
from torch import nn

import slimtorch as st


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def cfg(**shared):
    base = {"enabled": True, "method": "magnitude", "start_step": 0, "end_step": 0}
    base.update(shared)
    return {"compression_training": {"sparse_pruning": {"shared_parameters": base}}}


def one_update(model, opt):
    loss = model(torch.randn(4, 16)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_plain_model_lists_every_layer_untargeted():
    model = net()
    with torch.no_grad():
        model[2].weight[:, :8] = 0
    report = st.sparsity_report(model)
    assert [r.name for r in report] == ["0", "2", "4"]
    assert all(r.pattern is None and r.note == "not targeted" for r in report)
    assert report["2"].sparsity == 0.25
    assert "0 of 3 layers pruned" in str(report)


def test_partial_two_four_is_valid_with_dense_groups():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cb = st.prepare_pruning(model, cfg(pattern="2:4", dense_ratio=0.75), optimizer=opt)
    assert st.sparsity_report(model)["0"].note.startswith("not pruned yet")
    one_update(model, opt)
    row = st.sparsity_report(model)["0"]
    assert row.sparsity == 0.25 and row.pattern_valid
    counts = (model[0].weight != 0).reshape(-1, 4).sum(dim=1)
    assert set(counts.tolist()) == {2, 4} and int((counts == 2).sum()) == counts.numel() // 2
    cb.finalize()
    assert st.sparsity_report(model)["0"].pattern_valid  # checked on the weights after finalize


@pytest.mark.parametrize("pattern,dim", [("channelx1", 0), ("1xchannel", 1)])
def test_whole_columns_and_rows(pattern, dim):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    st.prepare_pruning(model, cfg(pattern=pattern, dense_ratio=0.5), optimizer=opt)
    one_update(model, opt)
    w = model[2].weight
    dead = (w == 0).all(dim=dim)  # dim 0: columns (inputs) entirely zero; dim 1: rows (outputs)
    assert int(dead.sum()) == 16 and st.sparsity_report(model)["2"].pattern_valid


def test_report_notices_a_broken_pattern():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cb = st.prepare_pruning(model, cfg(pattern="4x1", dense_ratio=0.5), optimizer=opt)
    one_update(model, opt)
    cb.finalize()
    row, col = (model[0].weight == 0).nonzero()[0].tolist()
    with torch.no_grad():
        model[0].weight[row, col] = 1.0  # one weight of a pruned 4x1 block comes back
    assert not st.sparsity_report(model)["0"].pattern_valid
