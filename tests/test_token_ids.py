"""Token ids outside the model's vocabulary are a CalibrationError naming the id, where it is and the vocabulary
size, wherever calibration or evaluation data first meets a model (block capture, perplexity, quantize)."""
import pytest
import torch

import slimtorch as st
from slimtorch.llm.evaluation import perplexity
from tests.llm.tiny_models import VOCAB, random_tokens, tiny_llama
from tests.reference import protocol


def _with_bad_id(ids: torch.Tensor, row: int, position: int, value: int) -> torch.Tensor:
    ids = ids.clone()
    ids[row, position] = value
    return ids


def test_oneshot_calibration_names_batch_position_and_vocabulary():
    model = tiny_llama()
    calib = [random_tokens(VOCAB, 2, 16, seed) for seed in range(3)]
    calib[1] = _with_bad_id(calib[1], 1, 5, VOCAB + 88)
    cfg = {"compression_inference": {"weight_only_quantization": {"enabled": True, "algorithm": "gptq",
                                                                  "group_size": 32}}}
    with pytest.raises(st.CalibrationError, match=rf"calibration batch 1: token id {VOCAB + 88} at \[row, "
                       rf"position\] \[1, 5\] is outside the vocabulary of LlamaForCausalLM \({VOCAB} embeddings.*"
                       r"another tokenizer than the model's"):
        st.oneshot(model, cfg, calib, progress=False)


def test_perplexity_names_window_and_position():
    stream = random_tokens(VOCAB, 1, 64)[0]
    stream[40] = -1  # a padding id some pipelines use
    with pytest.raises(st.CalibrationError, match=rf"windows of 16: token id -1 at \[row, position\] \[2, 8\] .*"
                       rf"\({VOCAB} embeddings, ids 0..{VOCAB - 1}; 1 of 64 ids"):
        perplexity(tiny_llama(), stream, window=16)


def test_quantize_calibration_of_an_encoder_names_the_id():
    model = protocol.tiny_bert().eval()
    batches = [{"input_ids": torch.randint(0, protocol.VOCAB, (2, 8), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    batches[0]["input_ids"][0, 3] = protocol.VOCAB
    cfg = {"compression_inference": {"static_quantization": {"enabled": True}}}
    with pytest.raises(st.CalibrationError, match=rf"batch 0: token id {protocol.VOCAB} at \[row, position\] "
                       rf"\[0, 3\] is outside the vocabulary of BertForSequenceClassification"):
        st.quantize(model, cfg, calib_dataloader=batches)


def test_ids_inside_the_vocabulary_pass():
    result = perplexity(tiny_llama(), random_tokens(VOCAB, 1, 64)[0], window=16)
    assert result.windows == 4 and result.tokens == 4 * 15


def test_token_ids_are_found_by_the_feeding_rules():
    from slimtorch.token_ids import token_ids_of

    ids = torch.tensor([[1, 2]])
    assert token_ids_of(({"input_ids": ids}, torch.tensor([0]))) is ids  # an (inputs, labels) pair
    assert token_ids_of([ids]) is ids
    assert token_ids_of(torch.randn(1, 3)) is None and token_ids_of({"pixel_values": ids}) is None
