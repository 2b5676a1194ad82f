"""4-bit training: adapter gradients through the frozen NF4 model equal those of its de-quantized copy."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import npt
from npt_tools.models import load_base_model
from npt_tools.objective import equivalence_loss


def dequantized_copy(qmodel, fp_model):
    """fp_model with every 4-bit linear replaced by its de-quantized weight (same numbers, plain fp32)."""
    import bitsandbytes.functional as F

    ref = copy.deepcopy(fp_model)
    fp = dict(ref.named_modules())
    for name, m in qmodel.named_modules():
        if type(m).__name__ == "Linear4bit":
            with torch.no_grad():
                fp[name].weight.copy_(F.dequantize_4bit(m.weight.data, m.weight.quant_state).float())
    return ref


@pytest.mark.parametrize("objective", ["layerwise", "end_to_end"])
def test_4bit_gradients_match_dequantized_model(tiny_llama_dir, objective):
    pytest.importorskip("bitsandbytes")
    qmodel, _ = load_base_model(str(tiny_llama_dir), use_quantization=True, device="cpu")
    ref = dequantized_copy(qmodel, AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval())
    models = []
    for m in (qmodel, ref):
        torch.manual_seed(0)
        npt.convert_to_npt(m, npt.NPTConfig(modulation_target="gate", rank=4))
        with torch.no_grad():
            for p in npt.get_adapter_params(m):
                p.normal_(0, 0.3)
        models.append(m)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 1000, (2, 12), generator=g), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with torch.no_grad(), npt.npt_disabled(qmodel):  # inference first: must not break later gradients
        qmodel(**batch)
    grads = []
    for m in models:
        for _ in range(2):  # a second call sees whatever the first (no-grad teacher pass) did to the weights
            out = equivalence_loss(m, batch, objective, 0.0)  # the MSE path alone: through the 4-bit MLP
            g = torch.autograd.grad(out.loss, npt.get_adapter_params(m))
        grads.append((out.loss, g))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=5e-3, atol=1e-7)  # bnb CPU kernels round differently
    for a, b in zip(grads[0][1], grads[1][1]):
        assert b.abs().max() > 0
        assert float((a - b).abs().max()) < 2e-2 * float(b.abs().max())  # 4-bit CPU kernels: ~0.5% apart
