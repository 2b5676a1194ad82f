"""Shared fixtures. Tests run offline on CPU; the embedded model is built once per machine."""
import pytest

import npt


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread(request):
    """One intra-op thread for the modules that ask (ONE_TORCH_THREAD = True): on a shared 2-core machine,
    spinning OpenMP threads of several processes slow a small forward pass down by 10-50x."""
    if not getattr(request.module, "ONE_TORCH_THREAD", False):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded smollm2-135m, unconverted: copy before converting."""
    return npt.load_base_model(npt.EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, d_model 64) saved with the embedded model's tokenizer: a local
    --model_name for fast CLI runs of pretrain_npt_safe.py."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(npt.embedded_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
