"""npt.py against an independent float64 reference of docs/CONTRACT.md section 1, on tiny random decoders."""
import copy
import json

import pytest
import torch

import npt
from npt_tools.models import load_base_model
from npt_tools.objective import normalized_mse, run_captured
from helpers import ARCHS, capture_layer_io, padded_npt_forward, randomize_adapters, rel_err, rms_norm64, tiny_model

ONE_TORCH_THREAD = True  # tiny tensors: a second OpenMP thread only spins (conftest)


def reference_layer64(layer, h, attn, add_scale):
    """docs/CONTRACT.md section 1 in float64, written from the formula (no project code)."""
    dec, ad = layer.layer, layer.adapter
    h, attn = h.double(), attn.double()
    x = rms_norm64(h, dec.post_attention_layernorm)
    gate = x @ dec.mlp.gate_proj.weight.double().T
    up = x @ dec.mlp.up_proj.weight.double().T
    z = attn @ ad.A_proj.weight.double().T
    g, terms = gate, []
    if ad.B_mult is not None:
        m = z @ ad.B_mult.weight.double().T
        g = g * (0.5 + 1 / (1 + torch.exp(-m)))
        terms.append((m ** 2).mean(-1))
    if ad.B_add is not None:
        a = z @ ad.B_add.weight.double().T
        g = g + add_scale * a
        terms.append((a ** 2).mean(-1))
    out = h + (g * torch.sigmoid(g) * up) @ dec.mlp.down_proj.weight.double().T
    return out, sum(terms) / len(terms)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("modulation", ["both", "additive", "multiplicative"])
def test_layer_outputs_match_float64_reference(arch, modulation):
    model, records, mask = padded_npt_forward(arch, npt.NPTConfig(modulation_target="gate",
                                                                  rank=8, modulation=modulation, layers="0,2"))
    regs = []
    for layer in npt.npt_layers(model):
        rec = records[layer.layer_idx]
        ref, reg = reference_layer64(layer, rec["h"], rec["attn"], add_scale=0.1)
        assert rel_err(rec["out"], ref) <= 1e-5, (arch, layer.layer_idx)
        regs.append((reg * mask).sum() / mask.sum())
    assert abs(npt.regularization(model, mask).item() - torch.stack(regs).mean().item()) <= 1e-5 * regs[0].item()
    assert not torch.allclose(npt.regularization(model), npt.regularization(model, mask))  # padding matters


def test_npt_disabled_is_bitwise_the_base_model():
    base = tiny_model("llama")
    model = npt.convert_to_npt(copy.deepcopy(base), npt.NPTConfig(modulation_target="gate", rank=4))
    randomize_adapters(model)
    ids = torch.randint(1, 128, (2, 11))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        with npt.npt_disabled(model):
            teacher = model(input_ids=ids).logits
        student = model(input_ids=ids).logits
    assert torch.equal(teacher, expected)
    assert not torch.allclose(student, expected)  # and the toggle restores NPT afterwards


def test_init_scales_and_identity_factor():
    model = npt.convert_to_npt(tiny_model("llama", layers=2, hidden=512, ffn=2048),
                               npt.NPTConfig(modulation_target="gate", rank=64))
    ad = npt.npt_layers(model)[0].adapter
    assert abs(ad.A_proj.weight.std().item() - 0.02) < 0.001
    assert abs(ad.B_add.weight.std().item() - 0.001) < 0.0001
    z = torch.randn(7, 64) * 100
    assert torch.equal(npt.modulation_factor(ad.B_mult(z)), torch.ones(7, 2048))
    assert ad.A_proj.bias is None and ad.B_add.bias is None and ad.B_mult.bias is None


def test_factor_range():
    m = torch.linspace(-80, 80, 10001)
    f = npt.modulation_factor(m)
    assert f.min() >= 0.5 and f.max() <= 1.5 and f.min() > 0
    assert npt.modulation_factor(torch.zeros(1)).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_only_adapters_train_and_they_are_fp32(dtype):
    model = tiny_model("qwen2").to(dtype)
    npt.convert_to_npt(model, npt.NPTConfig(modulation_target="gate", rank=4, layers="upper_half"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n, p in model.named_parameters() if ".adapter." in n}
    assert trainable == adapter and len(adapter) == 2 * 3  # layers 1, 2 (upper half of 3) x A, B_add, B_mult
    assert {p.dtype for p in npt.get_adapter_params(model)} == {torch.float32}
    ids = torch.randint(1, 128, (1, 5))
    logits = model(input_ids=ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    (logits.float().square().mean() + npt.regularization(model)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in npt.get_adapter_params(model))


@pytest.mark.integration
def test_four_bit_base_keeps_fp32_adapters(tmp_path, embedded):
    tiny_model("llama", hidden=128, ffn=256).save_pretrained(tmp_path)
    embedded[1].save_pretrained(tmp_path)
    model, _ = load_base_model(str(tmp_path), use_quantization=True)
    npt.convert_to_npt(model, npt.NPTConfig(modulation_target="gate", rank=4))
    assert type(model.model.layers[0].layer.mlp.gate_proj).__name__ == "Linear4bit"
    assert {p.dtype for p in npt.get_adapter_params(model)} == {torch.float32}
    assert all(p.requires_grad == (".adapter." in n) for n, p in model.named_parameters())
    assert torch.isfinite(model(input_ids=torch.randint(1, 128, (1, 6))).logits).all()


def _load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32,
                                                device_map={"": "cpu"})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_same_tokens_with_and_without_cache(arch):
    model = npt.convert_to_npt(tiny_model(arch), npt.NPTConfig(modulation_target="gate", rank=4))
    randomize_adapters(model, std=0.5)
    ids = torch.randint(1, 128, (2, 6))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape[1] == 14 and torch.equal(with_cache, without)


def test_save_load_round_trip(tmp_path):
    model = npt.convert_to_npt(tiny_model("mistral"), npt.NPTConfig(modulation_target="gate", rank=6, layers="1-2"))
    randomize_adapters(model)
    npt.save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors", "npt_config.json"]
    assert json.loads((tmp_path / "npt_config.json").read_text())["rank"] == 6
    fresh = tiny_model("mistral")  # unconverted base: load_adapters converts it with the saved config
    npt.load_adapters(fresh, tmp_path)
    a, b = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(1, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


@pytest.mark.parametrize("other, message", [
    (lambda: npt.convert_to_npt(tiny_model(), npt.NPTConfig(modulation_target="gate", rank=4, layers="1-2")), "rank"),
    (lambda: npt.convert_to_npt(tiny_model(), npt.NPTConfig(modulation_target="gate", rank=6, layers="0-1")), "layers"),
    (lambda: npt.convert_to_npt(tiny_model(), npt.NPTConfig(modulation_target="gate", rank=6, layers="1-2",
                                                            modulation="additive")), "modulation"),
    (lambda: tiny_model(layers=5), "layers"),
    (lambda: tiny_model(hidden=32, ffn=96), "shape"),
])
def test_load_into_mismatched_model_names_the_mismatch(tmp_path, other, message):
    npt.save_adapters(npt.convert_to_npt(tiny_model(), npt.NPTConfig(modulation_target="gate",
                                                                     rank=6, layers="1-2")), tmp_path)
    with pytest.raises(ValueError, match=message):
        npt.load_adapters(other(), tmp_path)


def test_load_corrupt_or_missing_adapters(tmp_path):
    with pytest.raises(FileNotFoundError, match="npt_config.json"):
        npt.load_adapters(tiny_model(), tmp_path)
    npt.save_adapters(npt.convert_to_npt(tiny_model(), npt.NPTConfig(modulation_target="gate", rank=4)), tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        npt.load_adapters(tiny_model(), tmp_path)


def test_config_layers_and_json():
    cfg = npt.NPTConfig(modulation_target="gate", rank=3, modulation="additive", layers=[5, 1])
    assert npt.NPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.layer_indices(6) == [1, 5]
    assert npt.NPTConfig(modulation_target="gate", layers="upper_half").layer_indices(30) == list(range(15, 30))
    assert npt.NPTConfig(modulation_target="gate", layers="lower_half").layer_indices(30) == list(range(15))
    assert npt.NPTConfig(modulation_target="gate", layers="8-15").layer_indices(30) == list(range(8, 16))
    assert npt.NPTConfig(modulation_target="gate", layers="1,3,5").layer_indices(30) == [1, 3, 5]
    for bad in ("30", "3-40", "x", "5-2"):
        with pytest.raises(ValueError, match="layer"):
            npt.NPTConfig(modulation_target="gate", layers=bad).layer_indices(30)
    with pytest.raises(ValueError, match="modulation"):
        npt.NPTConfig(modulation_target="gate", modulation="tanh")
    with pytest.raises(ValueError, match="rank"):
        npt.convert_to_npt(tiny_model(hidden=64), npt.NPTConfig(modulation_target="gate", rank=65))


def test_consolidate_absorbs_the_modulation():
    model = npt.convert_to_npt(tiny_model("llama"), npt.NPTConfig(modulation_target="gate", rank=8))
    randomize_adapters(model)
    ids = torch.randint(1, 128, (1, 8))
    before = {layer.layer_idx: layer.layer.mlp.gate_proj.weight.clone() for layer in npt.npt_layers(model)}
    captures = {}
    originals = {}
    for layer in npt.npt_layers(model):  # record x = LN2(h) and the modulated gate, in float64
        originals[layer] = layer.modulated_mlp
        def spy(h, attn, layer=layer):
            rec = captures.setdefault(layer.layer_idx, {})
            ref_out, _ = reference_layer64(layer, h, attn, 0.1)
            dec, ad = layer.layer, layer.adapter
            x = rms_norm64(h.double(), dec.post_attention_layernorm)
            z = attn.double() @ ad.A_proj.weight.double().T
            g = (x @ dec.mlp.gate_proj.weight.double().T) * (0.5 + torch.sigmoid(z @ ad.B_mult.weight.double().T)) \
                + 0.1 * (z @ ad.B_add.weight.double().T)
            rec.update(x=x[0, -1], g=g[0, -1])
            return originals[layer](h, attn)
        layer.modulated_mlp = spy
    with torch.no_grad():
        model(input_ids=ids)
    for layer in npt.npt_layers(model):
        del layer.modulated_mlp
    npt.consolidate(model, ids, token_index=-1, alpha=1.0)
    for layer in npt.npt_layers(model):
        rec = captures[layer.layer_idx]
        w = layer.layer.mlp.gate_proj.weight.double()
        assert rel_err(w @ rec["x"], rec["g"]) <= 1e-5
        assert torch.linalg.matrix_rank((w - before[layer.layer_idx].double()).float()) == 1


def test_consolidate_refuses_4bit(tmp_path):
    tiny_model("llama", hidden=128, ffn=256).save_pretrained(tmp_path)
    model = npt.convert_to_npt(_load_4bit(tmp_path), npt.NPTConfig(modulation_target="gate", rank=4))
    with pytest.raises(ValueError, match="quantized"):
        npt.consolidate(model, torch.randint(1, 128, (1, 5)))


def test_convert_refuses_twice_and_non_decoders():
    model = npt.convert_to_npt(tiny_model(), npt.NPTConfig(modulation_target="gate", rank=4))
    with pytest.raises(ValueError, match="already"):
        npt.convert_to_npt(model, npt.NPTConfig(modulation_target="gate", rank=4))
    with pytest.raises(ValueError, match="decoder layers"):
        npt.convert_to_npt(torch.nn.Sequential(torch.nn.Linear(3, 3)), npt.NPTConfig(modulation_target="gate", rank=1))


@pytest.mark.integration
def test_local_path_loads_like_a_hub_name(tmp_path, embedded):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path)
    embedded[1].save_pretrained(tmp_path)
    model, tok = load_base_model(str(tmp_path))
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)
    assert tok.pad_token is not None
    with pytest.raises(OSError):
        load_base_model(str(tmp_path / "missing"))


@pytest.mark.integration
def test_embedded_model_cold_and_warm(tmp_path, monkeypatch):
    """Cold: the first load into an empty cache converts the GGUF file, once. Warm: a second load reads the
    safetensors cache, never the GGUF file, and rewrites nothing."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("NPT_CACHE", str(tmp_path))
    gguf_loads, real_from_pretrained = [], AutoModelForCausalLM.from_pretrained

    def counting_from_pretrained(*args, **kwargs):
        if kwargs.get("gguf_file"):
            gguf_loads.append(kwargs["gguf_file"])
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting_from_pretrained)
    load_base_model("smollm2-135m")
    cache = tmp_path / "smollm2-135m"
    assert len(gguf_loads) == 1 and (cache / "config.json").is_file(), gguf_loads
    written = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    model, tok = load_base_model("smollm2-135m")
    assert len(gguf_loads) == 1, gguf_loads  # warm: the cache, not a second conversion
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == written
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    npt.convert_to_npt(model, npt.NPTConfig(modulation_target="gate"))
    batch = tok(["The capital of France is", "def main():"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.integration
def test_embedded_model_4bit():
    model, tok = load_base_model("smollm2-135m", use_quantization=True)
    mlp = model.model.layers[0].mlp
    assert all(type(getattr(mlp, n)).__name__ == "Linear4bit" for n in ("gate_proj", "up_proj", "down_proj"))
    npt.convert_to_npt(model, npt.NPTConfig(modulation_target="gate"))
    with torch.no_grad():
        assert torch.isfinite(model(**tok(["Hello there, NPT."], return_tensors="pt")).logits).all()


def test_output_hidden_states_sees_npt_layers():
    base = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        expected = base(input_ids=ids, output_hidden_states=True).hidden_states  # installs capture hooks first
        model = npt.convert_to_npt(copy.deepcopy(base), npt.NPTConfig(modulation_target="gate", rank=4, layers="1"))
        randomize_adapters(model)
        records, handles = capture_layer_io(model)
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(hs) == len(expected) == 4 and torch.equal(hs[2], records[1]["out"])
        assert not torch.equal(hs[2], expected[2])
        with npt.npt_disabled(model):
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert all(torch.equal(a, b) for a, b in zip(hs, expected))
    assert isinstance(model.model.layers[1], type(base.model.layers[1]))


@pytest.mark.parametrize("target", ["gate", "down", "gate+down"])
def test_npt_layers_run_the_triton_kernel(monkeypatch, target):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton on CPU, exactly
    model = npt.convert_to_npt(tiny_model("llama"), npt.NPTConfig(rank=8, modulation_target=target))
    randomize_adapters(model)
    ids = torch.randint(1, 128, (2, 5))
    results = []
    for backend in ("torch", "triton"):
        npt.set_kernel(model, backend)
        out = model(input_ids=ids).logits
        (out.square().mean() + npt.regularization(model)).backward()
        results.append((out.detach(), [p.grad.clone() for p in npt.get_adapter_params(model)]))
        model.zero_grad()
    (ref, ref_grads), (tri, tri_grads) = results
    assert rel_err(tri, ref.double()) <= 1e-5
    assert all(rel_err(a, b.double()) <= 1e-4 for a, b in zip(tri_grads, ref_grads))
    with pytest.raises(ValueError, match="kernel"):
        npt.set_kernel(model, "cuda")


def test_normalized_mse_matches_reference_at_any_scale():
    s, t = torch.randn(2, 5, 64, dtype=torch.float64), torch.randn(2, 5, 64, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    per_token = (unit(s) - unit(t)).pow(2).sum(-1)  # 2 - 2 cos
    ref = (per_token * mask).sum() / mask.sum()
    for scale in (1e-20, 1.0, 1e18, 1e30):  # fp32 norms over/underflow at the extremes
        got = normalized_mse((s * scale).float(), (t * scale).float(), mask)
        assert abs(got.item() - ref.item()) <= 1e-5 * ref.item(), scale
    assert torch.isnan(normalized_mse(s.float().index_fill(-1, torch.tensor([0]), float("inf")), t.float()))


def test_deepcopy_after_a_training_forward():
    model = npt.convert_to_npt(tiny_model("llama"), npt.NPTConfig(modulation_target="gate", rank=4))
    model(input_ids=torch.randint(1, 128, (1, 5)))  # last_reg now holds a graph
    clone = copy.deepcopy(model)
    assert all(layer.last_reg is None for layer in npt.npt_layers(clone))
    assert npt.regularization(model).requires_grad


@pytest.mark.parametrize("teacher", [True, False])
def test_run_captured_stops_after_the_last_npt_layer(teacher):
    """Without logits, layers above the last NPT layer never run, and the captures equal a full forward's."""
    model = npt.convert_to_npt(tiny_model(layers=4), npt.NPTConfig(modulation_target="gate", layers="0-1"))
    randomize_adapters(model)
    ran = []
    handle = model.model.layers[3].register_forward_pre_hook(lambda m, a: ran.append(3))
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    stopped, logits = run_captured(model, batch, ("input", "attn", "output"), teacher=teacher)
    assert logits is None and ran == []
    full, logits = run_captured(model, batch, ("input", "attn", "output"), teacher=teacher, logits=True)
    assert logits.shape == (2, 9, 128) and ran == [3]
    handle.remove()
    for i in (0, 1):
        for name in ("input", "attn", "output"):
            torch.testing.assert_close(stopped[i][name], full[i][name], rtol=0, atol=0)
