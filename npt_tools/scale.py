"""The shapes of the models a user trains at size (Llama-3.1-8B and 70B), random-weight models of them with any number
of layers (no download), in bf16/fp32 or 4-bit NF4 as the trainer's --use_quantization loads them, and what their
weights take: what benchmarks/memory_plan.py measures and extrapolates, and benchmarks/bench_train.py runs."""
from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.nn as nn


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama decoder's shape (the config fields that set its memory)."""
    d_model: int
    d_ffn: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: q, k, v, o, gate, up, down and the two norms."""
        kv = self.d_model * self.kv_heads // self.heads
        return 2 * self.d_model * (self.d_model + kv) + 3 * self.d_model * self.d_ffn + 2 * self.d_model

    @property
    def embedding_params(self) -> int:
        """The input embedding and the (untied) output head, and the final norm."""
        return 2 * self.vocab * self.d_model + self.d_model

    def config(self, layers: int | None = None, vocab: int | None = None):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab or self.vocab, hidden_size=self.d_model, intermediate_size=self.d_ffn,
                           num_hidden_layers=layers or self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=8192, rope_theta=500000.0,
                           tie_word_embeddings=False)


SHAPES = {"llama-3.1-8b": Shape(4096, 14336, 32, 8, 128256, 32),
          "llama-3.1-70b": Shape(8192, 28672, 64, 8, 128256, 80)}
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # a 4-bit code per weight; double quantization: an 8-bit scale per 64 weights
# and an fp32 scale per 256 of those (bitsandbytes' blocksizes)


def random_llama(shape: Shape, layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", vocab: int | None = None, quantize: bool = False) -> nn.Module:
    """A LlamaForCausalLM of `shape` (with `layers` layers, `vocab` tokens) and random weights (uniform, std 0.02:
    cheap to draw; no download). quantize: every decoder linear in 4-bit NF4 with fp32 compute, as
    npt_tools.models.load_base_model(use_quantization=True) loads a model (the rest in fp32); the first layer is
    quantized once and the others are copies of it (quantizing on a CPU takes seconds per matrix)."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    dtype, layers = torch.float32 if quantize else dtype, layers or shape.layers
    with no_init_weights(), torch.device(device):  # 4-bit: one layer built in fp32, quantized, then copied
        model = LlamaForCausalLM._from_config(shape.config(1 if quantize else layers, vocab), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            _fill_random(p) if p.dim() > 1 else p.fill_(1.0)  # matrices random, norm scales 1
    if quantize:
        blocks = model.model.layers
        _quantize_linears(blocks[0], device)
        for i in range(1, layers):
            blocks.append(copy.deepcopy(blocks[0]))
            blocks[i].self_attn.layer_idx = i
        model.config.num_hidden_layers = layers
    return model.eval()


FILL_BLOCK = 1_000_003  # a prime: the repeated block lands shifted on every row, so no two rows are equal


def _fill_random(p: torch.Tensor, std: float = 0.02) -> None:
    """p uniform with std `std`: one block of FILL_BLOCK values drawn, then repeated (drawing billions of values
    costs minutes on a CPU; copying them, a fraction of a second)."""
    bound = std * 3 ** 0.5  # uniform(-b, b) has std b / sqrt(3)
    flat = p.view(-1)
    block = torch.empty(min(FILL_BLOCK, flat.numel()), dtype=p.dtype, device=p.device).uniform_(-bound, bound)
    for start in range(0, flat.numel(), len(block)):
        part = flat[start:start + len(block)]
        part.copy_(block[:len(part)])


def _quantize_linears(module: nn.Module, device) -> None:
    """Every nn.Linear under `module` replaced by bitsandbytes' Linear4bit (NF4, double quantization, fp32 compute)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
            setattr(module, name, q.to(device))
        else:
            _quantize_linears(child, device)


def weight_bytes(shape: Shape, precision: str, layers: int | None = None, vocab: int | None = None) -> float:
    """Bytes of the base model's weights: bf16 (or fp16) 2 per parameter; fp32 4; nf4 NF4_BITS per decoder-linear
    weight with the embeddings, head and norms in fp32 (the trainer's 4-bit computes in fp32)."""
    layers = shape.layers if layers is None else layers
    emb = dataclasses.replace(shape, vocab=vocab or shape.vocab).embedding_params
    if precision == "nf4":
        linear = shape.layer_params - 2 * shape.d_model
        return layers * (linear * NF4_BITS / 8 + 2 * shape.d_model * 4) + emb * 4
    per = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    return per * (layers * shape.layer_params + emb)


def adapter_params(shape: Shape, rank: int) -> int:
    """The exact target's adapter parameters per NPT layer: mu, A_proj (r, d), B (d, r)."""
    return shape.d_model * (2 * rank + 1)


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory in MiB (Linux /proc): VmRSS now, VmHWM its peak since reset_peak_rss."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss() -> None:
    """VmHWM (and getrusage's ru_maxrss) back to the resident size now, so a peak read later is the peak since."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

