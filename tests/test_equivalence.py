"""The equivalence objective and the `down` modulation target, against float64 references written from
the formulas (no project code): the update error, the rank-K down_proj modulation, its consolidation."""
import pytest
import torch

import npt
from npt_tools.models import load_base_model
from npt_tools.objective import UPDATE_FLOOR, equivalence_loss, update_error
from helpers import ARCHS, capture_layer_io, padded_npt_forward, randomize_adapters, rel_err, rms_norm64, tiny_model

ONE_TORCH_THREAD = True  # tiny tensors: a second OpenMP thread only spins (conftest)


def naive_update_error(s, t, h, mask):
    """Float64, per real token |s - t|^2 / |t - h|^2 (no guard needed at unit scale)."""
    s, t, h = s.double(), t.double(), h.double()
    per_token = (s - t).pow(2).sum(-1) / (t - h).pow(2).sum(-1)
    return per_token[mask.bool()].mean()


def test_update_error_and_gradient_match_float64():
    t, h = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    s = (t + 0.3 * torch.randn(2, 6, 32)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    got = update_error(s, t, h, mask)
    got.backward()
    s64 = s.detach().double().requires_grad_()
    ref = naive_update_error(s64, t, h, mask)
    ref.backward()
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item()
    assert rel_err(s.grad, s64.grad) <= 1e-5


def test_update_error_is_one_for_a_student_that_adds_nothing_and_zero_for_an_exact_one():
    t, h = torch.randn(3, 7, 48), torch.randn(3, 7, 48)
    assert update_error(h, t, h).item() == pytest.approx(1.0, abs=1e-6)
    assert update_error(t, t, h).item() == 0.0


def test_update_error_ignores_padding_even_when_it_is_not_finite():
    t, h = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    s = (t + 0.1 * torch.randn(2, 5, 16)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    poisoned = torch.where(mask.bool()[..., None], s, torch.full_like(s, float("nan")))
    loss = update_error(poisoned, t, h, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(naive_update_error(s.detach(), t, h, mask).item(), rel=1e-5)
    assert s.grad[0, 3:].abs().sum() == 0


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_update_error_finite_and_scale_free_at_extreme_norms(scale):
    t, h = torch.randn(2, 4, 64, dtype=torch.float64), torch.randn(2, 4, 64, dtype=torch.float64)
    s = t + 0.2 * torch.randn_like(t)
    mask = torch.ones(2, 4)
    ref = naive_update_error(s, t, h, mask).item()
    s32 = (s * scale).float().requires_grad_()
    got = update_error(s32, (t * scale).float(), (h * scale).float(), mask)
    got.backward()
    assert got.item() == pytest.approx(ref, rel=1e-4)
    assert torch.isfinite(s32.grad).all()


def test_update_error_bounded_where_the_teacher_update_is_tiny():
    h = torch.randn(1, 3, 64)
    t = h.clone()
    t[0, 1] += 1e-12 * torch.randn(64)  # token 1: the teacher layer barely changes it
    s = h + 0.01 * torch.randn(1, 3, 64)  # a student off by 1% of the state
    per_token = update_error(s, t, h, per_token=True)
    assert torch.isfinite(per_token).all()
    assert per_token[0, 1] <= 1.0 / UPDATE_FLOOR  # |s - t|^2 / (floor |t|^2), not / 1e-24


def test_update_error_is_zero_not_nan_on_all_zero_tokens():
    z = torch.zeros(1, 2, 8, requires_grad=True)
    loss = update_error(z, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def reference_down_layer64(layer, h, attn):
    """NPT layer with the down target, in float64 from the formula: h + (W_down + sum_k v_k u_k^T) act,
    act = silu(gate) * up of the (gate-modulated, for gate+down) MLP on LN2(h), v = B_down z split in K."""
    dec, ad = layer.layer, layer.adapter
    h, attn = h.double(), attn.double()
    x = rms_norm64(h, dec.post_attention_layernorm)
    gate = x @ dec.mlp.gate_proj.weight.double().T
    up = x @ dec.mlp.up_proj.weight.double().T
    z = attn @ ad.A_proj.weight.double().T  # (B, T, r)
    g, terms = gate, []
    if ad.B_mult is not None:
        m = z @ ad.B_mult.weight.double().T
        g = g * (0.5 + torch.sigmoid(m))
        terms.append((m ** 2).mean(-1))
    if ad.B_add is not None:
        a = z @ ad.B_add.weight.double().T
        g = g + 0.1 * a
        terms.append((a ** 2).mean(-1))
    act = g * torch.sigmoid(g) * up  # (B, T, F)
    K, D = ad.down_u.shape[0], h.shape[-1]
    v = (z @ ad.B_down.weight.double().T).reshape(*z.shape[:-1], K, D)  # (B, T, K, D)
    u = ad.down_u.double()  # (K, F)
    w_tok = dec.mlp.down_proj.weight.double() + torch.einsum("btkd,kf->btdf", v, u)  # per-token W_down
    terms.append((v ** 2).mean((-2, -1)))
    return h + torch.einsum("btdf,btf->btd", w_tok, act), sum(terms) / len(terms)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("target", ["down", "gate+down"])
def test_down_target_matches_float64_reference(arch, target):
    config = npt.NPTConfig(rank=8, layers="0,2", modulation_target=target, down_rank=3)
    model, records, mask = padded_npt_forward(arch, config)
    regs = []
    for layer in npt.npt_layers(model):
        rec = records[layer.layer_idx]
        ref, reg = reference_down_layer64(layer, rec["h"], rec["attn"])
        assert rel_err(rec["out"], ref) <= 1e-5, (arch, target, layer.layer_idx)
        regs.append((reg * mask).sum() / mask.sum())
    assert npt.regularization(model, mask).item() == pytest.approx(torch.stack(regs).mean().item(), rel=1e-5)
    assert (target == "down") == (npt.npt_layers(model)[0].adapter.B_add is None)


def test_down_target_starts_as_the_plain_mlp_and_trains_every_adapter_weight():
    model = npt.convert_to_npt(tiny_model(), npt.NPTConfig(rank=4, modulation_target="down"))
    ids = torch.randint(1, 128, (1, 6))
    out = model(input_ids=ids).logits
    ref = npt.convert_to_npt(tiny_model(), npt.NPTConfig(rank=4, modulation_target="gate", modulation="additive"))
    for layer in npt.npt_layers(ref):
        torch.nn.init.zeros_(layer.adapter.B_add.weight)  # no modulation at all
    with torch.no_grad():
        assert torch.allclose(out, ref(input_ids=ids).logits, atol=1e-6)
    out.square().mean().backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.split(".adapter.")[1] in ("A_proj.weight", "B_down.weight", "down_u") for n in names)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "B_down" in n)


def test_gate_target_forward_unchanged_bitwise():
    """The seed's gate form is exactly h + down_proj(silu(g) * up) of the kernels' reference: no extra term."""
    from npt_kernels.modulated_swiglu import modulated_swiglu_reference

    model = npt.convert_to_npt(tiny_model(), npt.NPTConfig(modulation_target="gate", rank=4))
    randomize_adapters(model)
    records, handles = capture_layer_io(model)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 128, (2, 5)))
        for layer in npt.npt_layers(model):
            rec, dec, ad = records[layer.layer_idx], layer.layer, layer.adapter
            x = dec.post_attention_layernorm(rec["h"])
            act = modulated_swiglu_reference(dec.mlp.gate_proj(x), dec.mlp.up_proj(x), ad.A_proj(rec["attn"].float()),
                                             *ad.weights(), 0.1)[0]
            assert torch.equal(rec["out"], rec["h"] + dec.mlp.down_proj(act))
    for hk in handles:
        hk.remove()


@pytest.mark.parametrize("target", ["down", "gate+down"])
def test_consolidate_writes_the_down_modulation_exactly(target):
    model = npt.convert_to_npt(tiny_model("qwen2"), npt.NPTConfig(rank=8, modulation_target=target))
    randomize_adapters(model)
    ids = torch.randint(1, 128, (1, 8))
    records, handles = capture_layer_io(model)
    with torch.no_grad():
        model(input_ids=ids)
    for hk in handles:
        hk.remove()
    expected = {i: reference_down_layer64(layer, records[i]["h"], records[i]["attn"])[0][0, -1]
                for layer in npt.npt_layers(model) for i in [layer.layer_idx]}
    npt.consolidate(model, ids, token_index=-1, alpha=1.0)
    with npt.npt_disabled(model):  # the plain MLP with the consolidated weights, on the same layer input
        for layer in npt.npt_layers(model):
            h = records[layer.layer_idx]["h"][:, -1:]
            dec = layer.layer
            x = dec.post_attention_layernorm(h)
            mlp_out = dec.mlp.down_proj(torch.nn.functional.silu(dec.mlp.gate_proj(x)) * dec.mlp.up_proj(x))
            assert rel_err(h[0, -1] + mlp_out[0, -1], expected[layer.layer_idx]) <= 1e-5, target


def test_down_adapters_save_load_round_trip(tmp_path):
    model = npt.convert_to_npt(tiny_model("llama"), npt.NPTConfig(rank=4, layers="1-2", modulation_target="down",
                                                            down_rank=2))
    randomize_adapters(model)
    npt.save_adapters(model, tmp_path)
    fresh = tiny_model("llama")
    npt.load_adapters(fresh, tmp_path)
    assert fresh.npt_config.modulation_target == "down" and fresh.npt_config.down_rank == 2
    ids = torch.randint(1, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    other = npt.convert_to_npt(tiny_model("llama"), npt.NPTConfig(rank=4, layers="1-2", modulation_target="down"))
    with pytest.raises(ValueError, match="down_rank"):
        npt.load_adapters(other, tmp_path)


def test_config_files_without_the_new_fields_load_as_gate():
    old = {"rank": 8, "modulation": "both", "layers": "all", "add_scale": 0.1}
    cfg = npt.NPTConfig.from_dict(old)
    assert cfg.modulation_target == "gate" and cfg.down_rank == 4
    with pytest.raises(ValueError, match="modulation_target"):
        npt.NPTConfig(modulation_target="up")
    with pytest.raises(ValueError, match="down_rank"):
        npt.NPTConfig(modulation_target="gate", down_rank=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_down_target_on_half_precision_bases(dtype):
    """fp32 adapters on an fp16 / bf16 base: finite outputs in the base's dtype, fp32 gradients for every adapter
    weight, and the output matches the float64 reference to the base dtype's precision."""
    model = npt.convert_to_npt(tiny_model("llama").to(dtype), npt.NPTConfig(rank=4, modulation_target="gate+down"))
    randomize_adapters(model, std=0.1)
    assert {p.dtype for p in npt.get_adapter_params(model)} == {torch.float32}
    records, handles = capture_layer_io(model)
    logits = model(input_ids=torch.randint(1, 128, (1, 6))).logits
    for hk in handles:
        hk.remove()
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    for layer in npt.npt_layers(model):
        rec = records[layer.layer_idx]
        assert rel_err(rec["out"], reference_down_layer64(layer, rec["h"], rec["attn"])[0]) <= 2e-2
    (logits.float().square().mean() + npt.regularization(model)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in npt.get_adapter_params(model))


@pytest.mark.integration
def test_down_target_on_a_4bit_base(tmp_path, embedded):
    """A 4-bit base converts to the down target with fp32 adapters that get finite gradients; consolidating
    into 4-bit weights is refused."""
    tiny_model("llama", hidden=128, ffn=256).save_pretrained(tmp_path)
    embedded[1].save_pretrained(tmp_path)
    model, _ = load_base_model(str(tmp_path), use_quantization=True)
    npt.convert_to_npt(model, npt.NPTConfig(rank=4, modulation_target="down"))
    assert type(model.model.layers[0].layer.mlp.down_proj).__name__ == "Linear4bit"
    batch = {"input_ids": torch.randint(1, 128, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    randomize_adapters(model, std=0.05)
    loss = equivalence_loss(model, batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                        for p in npt.get_adapter_params(model))
    with pytest.raises(ValueError, match="quantized"):
        npt.consolidate(model, batch["input_ids"])


def test_regularizer_stays_fp32_and_finite_under_fp16_autocast():
    """Under fp16 autocast the adapters' matmuls give fp16; codes and down vectors past 256 square past fp16's
    65,504. The per-token regularizer must still be fp32, finite, and equal the float64 reference."""
    model = npt.convert_to_npt(tiny_model(), npt.NPTConfig(rank=8, layers="0", modulation_target="gate+down"))
    layer = npt.npt_layers(model)[0]
    with torch.no_grad():
        for p in npt.get_adapter_params(model):
            p.normal_(std=3.0, generator=torch.Generator().manual_seed(p.numel()))
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    attn = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)) * 3
    with torch.autocast("cpu", dtype=torch.float16):
        layer.modulated_mlp(h, attn)
    _, ref = reference_down_layer64(layer, h, attn)
    assert layer.last_reg.dtype == torch.float32 and torch.isfinite(layer.last_reg).all()
    assert ref.max() > 65504, "the test needs squares that overflow fp16"
    torch.testing.assert_close(layer.last_reg.double(), ref, rtol=2e-2, atol=0)
