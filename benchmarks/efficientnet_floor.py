#!/usr/bin/env python
"""How far EfficientNet-lite0's top-1 moves under perturbations that are not int8 at all (context for issue 3).

    python benchmarks/efficientnet_floor.py      # ~1 min, one thread

Same model and crops as tests/quantization/test_cnn.py (256 crops of sklearn's sample images, seed 0): top-1
agreement with the fp32 model and relative logit error for the model run in bfloat16 and for +-0.5% / 1% random
relative noise on every weight. int8 (slimtorch, MSE weights + bias correction) reaches 0.961 on the same crops.
"""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.quantization.cnn_data import image_crops, load_efficientnet_lite0, predict  # noqa: E402


def main():
    torch.set_num_threads(1)
    model = load_efficientnet_lite0()
    crops = image_crops(256, seed=0)
    ref = predict(model, crops, 32)
    rows = []
    for noise in (0.005, 0.01):
        torch.manual_seed(0)
        noisy = copy.deepcopy(model)
        with torch.no_grad():
            for p in noisy.parameters():
                p.mul_(1 + noise * torch.randn_like(p))
        rows.append((f"weights x (1 + {noise:g} * N(0,1))", predict(noisy, crops, 32)))
    rows.append(("bfloat16", predict(copy.deepcopy(model).to(torch.bfloat16), crops.to(torch.bfloat16), 32).float()))
    print("| perturbation | top-1 agreement with fp32 | relative logit error |\n|---|---|---|")
    for name, out in rows:
        agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
        print(f"| {name} | {agree:.3f} | {float((out - ref).norm() / ref.norm()):.3f} |")


if __name__ == "__main__":
    main()
