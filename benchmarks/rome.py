"""The ROME-style baseline editor (arXiv 2202.05262, implemented here from the paper's equations): one layer's
mlp.down_proj, a rank-1 insertion of the key k* (the subject's last token's MLP activation, averaged over the prompt
alone and behind random builtin prefixes) with the value v* found by gradient steps:

    v* = W k* + delta,  delta = argmin  mean over prefixes of -log P(target_new | prompt)
                                      + kl_weight KL(P_orig || P)(next token after "{subject} is a")  (essence)
                                      + weight_decay |delta|^2 / |W k*|^2,  |delta| <= clamp |W k*|
    dW = (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*)     (plasticity.rank_one_update, C the keys' covariance)

The keys, prefixes, covariance and insertion are npt_tools.plasticity's; only the value's optimisation is here."""
from __future__ import annotations

import contextlib

import torch

from npt_tools import plasticity as P


def _with_target(tokenizer, q: P.Queries, target: str) -> tuple[P.Queries, torch.Tensor, torch.Tensor]:
    """q's rows with the target's tokens appended: (queries, positions predicting them (B, n), their ids (n,))."""
    t_ids = torch.tensor(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
    n, rows = len(t_ids), len(q.last_pos)
    ids = torch.full((rows, q.input_ids.shape[1] + n), q.input_ids[0, 0].item(), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(rows):
        end = int(q.last_pos[i]) + 1
        ids[i, :end], ids[i, end:end + n] = q.input_ids[i, :end], t_ids
        mask[i, :end + n] = 1
    pred = q.last_pos[:, None] + torch.arange(n)  # (B, n)
    return P.Queries(ids, mask, q.subject_pos, q.last_pos + n), pred, t_ids


@contextlib.contextmanager
def _added_at_subject(model, layer: int, q: P.Queries, delta: torch.Tensor):
    """delta (D,) added to layer `layer`'s MLP output at each row's subject token inside the block."""
    rows = torch.arange(len(q.subject_pos))

    def hook(module, args, out):
        out = out.clone()
        out[rows, q.subject_pos] += delta.to(out.dtype)
        return out

    handle = P.decoder_mlp(model, layer).down_proj.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def optimise_value(model, tokenizer, fact: P.Fact, q: P.Queries, layer: int, steps: int, lr: float,
                   kl_weight: float, weight_decay: float, clamp: float) -> torch.Tensor:
    """delta (D,): ROME's v* - W k* by Adam on the objective of the module docstring; the model's weights untouched."""
    rewrite, pred, t_ids = _with_target(tokenizer, q, fact.target_new)
    essence = P.encode(tokenizer, [f"{fact.subject} is a"], [len(fact.subject)])
    keys, _, _ = P.run(model, q, key_layers=[layer], logits=False)
    v0 = keys[layer] @ P.decoder_mlp(model, layer).down_proj.weight.float().t()  # (B, D)
    v_norm = v0.mean(0).norm()
    with torch.no_grad():
        essence_ref = _last_logits(model, essence).log_softmax(-1)
    delta = torch.zeros_like(v_norm.expand(v0.shape[1])).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            opt.zero_grad()
            with _added_at_subject(model, layer, rewrite, delta):
                logp = model(input_ids=rewrite.input_ids, attention_mask=rewrite.attention_mask,
                             use_cache=False).logits.log_softmax(-1)
                nll = -logp[torch.arange(len(pred))[:, None], pred, t_ids].mean()
            with _added_at_subject(model, layer, essence, delta):
                ess = _last_logits(model, essence).log_softmax(-1)
            kl = (essence_ref.exp() * (essence_ref - ess)).sum()
            loss = nll + kl_weight * kl + weight_decay * delta.square().sum() / v_norm.square()
            loss.backward()
            opt.step()
            with torch.no_grad():  # ROME's clamp of the value's change
                delta.mul_(torch.clamp(clamp * v_norm / delta.norm().clamp_min(1e-12), max=1.0))
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return delta.detach()


def _last_logits(model, q: P.Queries) -> torch.Tensor:
    logits = model(input_ids=q.input_ids, attention_mask=q.attention_mask, use_cache=False).logits
    return logits[torch.arange(len(q.last_pos)), q.last_pos].float()


def rome_edit(model, tokenizer, context: str, record=None, layer: int = 7, steps: int = 20, lr: float = 0.5,
              kl_weight: float = 0.0625, weight_decay: float = 0.5, clamp: float = 4.0, prefixes: int = 5,
              prefix_tokens: int = 10, covariance_tokens: int = 32768, seed: int = 0) -> dict[str, torch.Tensor]:
    """ROME-style edit of `context` (or of `record`, a counterfact Record, when given): {down_proj name: dW}
    (fp32); the model is left as it was."""
    fact = P.fact_from_record(record) if record is not None else P.parse_context(context)
    q = P.fact_queries(tokenizer, fact, P.builtin_prefixes(tokenizer, prefixes, prefix_tokens, seed))
    delta = optimise_value(model, tokenizer, fact, q, layer, steps, lr, kl_weight, weight_decay, clamp)
    keys, _, _ = P.run(model, q, key_layers=[layer], logits=False)
    c = P.key_covariance(model, tokenizer, [layer], covariance_tokens)[layer].double()
    c_inv = torch.cholesky_inverse(torch.linalg.cholesky(c))
    update = P.rank_one_update(c_inv, keys[layer].mean(0).double(), delta.double()).float()  # (D, F)
    return {P.down_proj_name(model, layer): update}
