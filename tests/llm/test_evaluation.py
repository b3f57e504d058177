"""slimtorch.llm.evaluation on tiny random-init decoders: perplexity is exp of transformers' own mean loss over the
same non-overlapping windows, the tail is dropped, modes are restored, and bad input is a clear error."""
import math

import pytest
import torch
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.llm.evaluation import PerplexityResult, perplexity, token_windows

from .tiny_models import TINY_MODELS, random_tokens, tiny_llama

WINDOW = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def stream(vocab, windows=5, tail=7, seed=0):
    return random_tokens(vocab, 1, windows * WINDOW + tail, seed)[0]


def hf_perplexity(model, windows):
    """exp of the mean of transformers' own loss (labels = input_ids, shifted inside the model) per window; every
    window predicts the same number of tokens, so the mean of means is the mean over tokens."""
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None], use_cache=False).loss.double() for w in windows]
    return math.exp(float(torch.stack(losses).mean()))


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_perplexity_is_exp_of_transformers_mean_loss(arch):
    model = TINY_MODELS[arch]()
    ids = stream(model.config.vocab_size)
    result = perplexity(model, ids, window=WINDOW)
    assert isinstance(result, PerplexityResult)
    assert (result.windows, result.tokens) == (5, 5 * (WINDOW - 1))  # 7-token tail dropped, first tokens unpredicted
    expected = hf_perplexity(model, ids[:5 * WINDOW].reshape(5, WINDOW))
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-5)


def test_batch_size_shape_and_device_do_not_change_the_result():
    model = tiny_llama()
    ids = stream(model.config.vocab_size)
    reference = perplexity(model, ids, window=WINDOW)
    for kwargs in (dict(batch_size=2), dict(batch_size=8), dict(device="cpu"), dict(progress=True)):
        assert perplexity(model, ids, window=WINDOW, **kwargs).perplexity == pytest.approx(reference.perplexity,
                                                                                           rel=1e-5)
    assert perplexity(model, ids[None], window=WINDOW) == reference  # [1, N] is the same stream as [N]
    assert perplexity(model, ids.to(torch.int32), window=WINDOW) == reference


def test_the_tail_is_dropped_and_windows_do_not_overlap():
    model = tiny_llama()
    ids = stream(model.config.vocab_size, windows=3, tail=0)
    full = perplexity(model, ids, window=WINDOW)
    with_tail = torch.cat([ids, random_tokens(model.config.vocab_size, 1, WINDOW - 1, seed=7)[0]])
    assert perplexity(model, with_tail, window=WINDOW) == full
    # each window stands alone: the nll sum is the sum of the windows' own sums
    parts = [perplexity(model, ids[i * WINDOW:(i + 1) * WINDOW], window=WINDOW) for i in range(3)]
    assert full.nll == pytest.approx(sum(p.nll for p in parts) / 3, rel=1e-6)


def test_token_windows_cuts_consecutive_windows():
    ids = torch.arange(100)
    windows = token_windows(ids, 16)
    assert windows.shape == (6, 16) and torch.equal(windows.flatten(), ids[:96])
    assert torch.equal(token_windows(ids[None], 16, count=2), ids[:32].reshape(2, 16))
    assert token_windows(ids, 100).shape == (1, 100)


def test_modes_restored_and_forward_runs_in_eval_without_grad_or_cache():
    model = tiny_llama()
    model.train()
    model.model.layers[0].eval()  # a submodule with its own mode keeps it
    before = {name: m.training for name, m in model.named_modules()}
    seen = []

    def record(module, args, kwargs):
        seen.append((module.training, torch.is_grad_enabled(), kwargs.get("use_cache")))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    perplexity(model, stream(model.config.vocab_size, windows=2), window=WINDOW)
    handle.remove()
    assert seen == [(False, False, False)] * 2
    assert {name: m.training for name, m in model.named_modules()} == before


def test_modes_restored_on_error():
    model = tiny_llama().train()

    def fail(module, args):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        perplexity(model, stream(model.config.vocab_size), window=WINDOW)
    handle.remove()
    assert all(m.training for m in model.modules())


def test_nan_logits_give_nan_perplexity_not_an_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    result = perplexity(model, stream(model.config.vocab_size, windows=1), window=WINDOW)
    assert math.isnan(result.perplexity) and result.tokens == WINDOW - 1


class _NoLogits(nn.Module):
    def forward(self, input_ids, use_cache=False):
        return {"hidden": input_ids.float()}


def test_errors():
    model = tiny_llama()
    ids = stream(model.config.vocab_size, windows=2, tail=0)
    with pytest.raises(ConfigError, match="window must be an integer >= 2"):
        perplexity(model, ids, window=1)
    with pytest.raises(ConfigError, match="has 64 tokens, fewer than one window of 65"):
        perplexity(model, ids, window=65)
    with pytest.raises(ConfigError, match=r"shape \[N\] or \[1, N\].*\[2, 32\]"):
        perplexity(model, ids.reshape(2, WINDOW), window=WINDOW)
    with pytest.raises(ConfigError, match="integer token ids, got dtype torch.float32"):
        perplexity(model, ids.float(), window=WINDOW)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        perplexity(model, ids, window=WINDOW, batch_size=0)
    with pytest.raises(ConfigError, match="without logits"):
        perplexity(_NoLogits(), ids, window=WINDOW)
    with pytest.raises(ConfigError, match="asked for 3 windows of 32 tokens.*holds only 2"):
        token_windows(ids, WINDOW, count=3)
    with pytest.raises(ConfigError, match="count must be a positive integer"):
        token_windows(ids, WINDOW, count=0)
