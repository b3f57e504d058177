"""export_onnx of causal LMs: the KV cache is turned off (an ONNX graph cannot return transformers' cache object),
the file agrees with PyTorch in ONNX Runtime (export_onnx verifies it), and a weight-only model exports too."""
import onnx
import onnx.numpy_helper
import pytest
import torch

import slimtorch as st

from .tiny_models import TINY_MODELS, random_tokens

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(model):
    ids = random_tokens(model.config.vocab_size, 2, 16, seed=0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_causal_lm_exports_with_the_cache_off(arch, tmp_path):
    model = TINY_MODELS[arch]()
    path = st.export_onnx(model, inputs(model), tmp_path / "model.onnx")  # verified in ONNX Runtime inside
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert len(graph.output) == 1  # the logits only: no key/value cache outputs


def test_a_weight_only_model_exports(tmp_path):
    model = TINY_MODELS["llama"]()
    cfg = {"compression_inference": {"weight_only_quantization": {"enabled": True, "algorithm": "rtn",
                                                                  "group_size": 32}}}
    q_model = st.oneshot(model, cfg, [inputs(model)["input_ids"]], progress=False)
    st.export_onnx(q_model, inputs(model), tmp_path / "w4.onnx")  # agrees with PyTorch in ONNX Runtime
    # the exporter folds the dequantization into float weights: the file computes the int4 model's function at the
    # float model's size (ONNX Runtime's MatMulNBits is not written)
    arrays = [torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
              for t in onnx.load(tmp_path / "w4.onnx").graph.initializer]
    down = q_model.model.layers[0].mlp.down_proj.dequantized_weight()
    assert any(a.shape == w.shape and torch.equal(a, w) for a in arrays for w in (down, down.T))


def test_without_an_attention_mask_the_error_says_what_to_pass(tmp_path):
    model = TINY_MODELS["gpt2"]()
    with pytest.raises(st.ExportError, match=r"pass example_inputs=\{'input_ids': ids, 'attention_mask'"):
        st.export_onnx(model, inputs(model)["input_ids"], tmp_path / "model.onnx")
