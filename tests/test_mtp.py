"""DeepSeek-V3 multi-token prediction (MTP): Megatron's MTP layer, loaded from an HF checkpoint through the
family table, against an independent reference built from transformers' own modules.

transformers 5.23 has no MTP forward, so the reference follows DeepSeek's MTP module as served by SGLang
(`DeepseekModelNextN`) and vLLM (`DeepSeekMultiTokenPredictorLayer`), for MTP depth 1 at position i:

    e   = enorm(embed_tokens(token[i + 1]))       model.layers.{N}.enorm / .embed_tokens (= the main one)
    hp  = hnorm(h[i])                             model.layers.{N}.hnorm; h = the main model's final hidden
                                                  state AFTER its final norm (what both engines pass on)
    x   = eh_proj(cat([e, hp]))                   model.layers.{N}.eh_proj [H, 2H]: embedding half first
    x   = DecoderLayer_N(x)                       model.layers.{N}.self_attn / mlp / *_layernorm (MoE)
    out = shared_head.head(shared_head.norm(x))   model.layers.{N}.shared_head.* (head = lm_head)

The decoder layer is transformers' DeepseekV3DecoderLayer loaded by transformers itself (the same
checkpoint read with num_hidden_layers = N + 1), the rest straight from the safetensors by HF name:
nothing of the converter's name table is reused. Megatron is read through hooks on `mtp.layers.0`.

Semantics of megatron-core 0.16.1 checked here (line numbers of that release):
  * MTP input: the decoder output after the final norm (transformer_block.py:789-790, then
    gpt_model.py:593 passes it to self.mtp), as the engines do (vLLM's and SGLang's DeepseekV2Model
    return the hidden state after self.norm, and that is what their MTP drafter receives). Feeding the
    PRE-norm hidden state instead (one reading of the paper) is measured below: a large difference.
  * concat order cat((embedding, hidden)) (multi_token_prediction.py:736), eh_proj without bias.
  * shifted ids: roll_tensor(input_ids, -1) (:705); the last position gets token id 0 (:159-160), i.e.
    embed(token 0), not a zero vector. The reference has no token there, so the last position is not
    compared (causal attention: it cannot influence the others). RoPE uses the main model's unshifted
    positions (the rolled position_ids only feed a learned position embedding, absent here).
  * logits: final_layernorm (= shared_head.norm, :815) then the main output_layer (gpt_model.py:620).
  * vLLM additionally zeroes the embedding at position 0 (`inputs_embeds[positions == 0] = 0`); SGLang
    and megatron do not. Measured below as a documented difference (it reaches every later position
    through attention).
  * depth > 1 (not in DeepSeek-V3's checkpoints): megatron hands the next MTP layer the output AFTER
    final_layernorm (loop at :1111-1112, norm at :815); vLLM hands on the un-normed residual stream.
    Not testable with one layer.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.models.builder import ParallelLayout
from megatron_patch.runtime.multirank import run_ranks

ENV = {"TORCHDYNAMO_DISABLE": "1"}
ATOL = 1e-5          # fp32; the main model's logits match HF within ~1e-6..7e-6
BROKEN_MIN = 1e-2    # what a wrong mapping must at least move the MTP logits by
BATCH, SEQ = 2, 32


def randomise_final_norm(path: str, seed: int = 7) -> None:
    """make-mini leaves model.norm.weight at transformers' ones; then hnorm(norm(h)) == hnorm(h) up to
    eps and the test could not tell the pre-norm from the post-norm hidden state. Make it non-uniform."""
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    (file,) = sorted(Path(path).glob("*.safetensors"))
    with safe_open(str(file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    w = tensors["model.norm.weight"]
    gen = torch.Generator().manual_seed(seed)
    tensors["model.norm.weight"] = (1.0 + 0.5 * torch.randn(w.shape, generator=gen)).to(w.dtype)
    save_file(tensors, str(file), metadata=metadata)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from megatron_patch.convert.mini import make_mini

    path = str(make_mini("deepseek_v3", tmp_path_factory.mktemp("mtp") / "ds3", seed=5))
    randomise_final_norm(path)
    return path


@pytest.fixture(scope="module")
def tokens(mini):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(mini).vocab_size
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))


# ---------------------------------------------------------------------------------------------------
# reference (transformers modules, HF names)
# ---------------------------------------------------------------------------------------------------
def _mtp_tensors(path: str, n: int) -> dict:
    """The MTP module's own tensors (not the transformer layer) by their HF names, plus the main
    embedding / lm_head to check the checkpoint's copies against."""
    from pathlib import Path

    from safetensors import safe_open

    p = f"model.layers.{n}."
    names = {k: p + k for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                                "shared_head.head.weight", "embed_tokens.weight")}
    names.update(main_embed="model.embed_tokens.weight", main_head="lm_head.weight")
    (file,) = sorted(Path(path).glob("*.safetensors"))
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(v).float() for k, v in names.items()}


def _rms_norm(weight, eps):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    norm = DeepseekV3RMSNorm(weight.numel(), eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


class Reference:
    """The HF main model and an MTP module assembled from transformers' classes."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the MTP tensors are "unexpected" for transformers
        self.main = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        cfg = self.main.config
        self.n, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
        # One layer more: transformers' own loader fills layer N from model.layers.{N}.* (incl. the
        # per-expert -> fused expert conversion), i.e. the MTP module's decoder layer with HF semantics.
        extended, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, num_hidden_layers=self.n + 1, output_loading_info=True)
        assert not info["missing_keys"], info["missing_keys"]
        self.layer = extended.model.layers[self.n].eval()
        self.rotary = extended.model.rotary_emb
        self.config = extended.config
        t = _mtp_tensors(path, self.n)
        self.t = t
        self.enorm, self.hnorm = _rms_norm(t["enorm.weight"], eps), _rms_norm(t["hnorm.weight"], eps)
        self.head_norm = _rms_norm(t["shared_head.norm.weight"], eps)
        self.eh_proj = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        with torch.no_grad():
            self.eh_proj.weight.copy_(t["eh_proj.weight"])

    @torch.no_grad()
    def main_hidden(self, tokens):
        """(pre-norm, post-norm) final hidden states of the main model, from a hook on model.norm."""
        seen = {}

        def hook(mod, args, out):
            seen["pre"], seen["post"] = args[0].detach().clone(), out.detach().clone()

        handle = self.main.model.norm.register_forward_hook(hook)
        try:
            self.main(tokens)
        finally:
            handle.remove()
        return seen["pre"], seen["post"]

    @torch.no_grad()
    def mtp(self, tokens, hidden, zero_first_embedding=False):
        """MTP outputs at positions 0..S-2 (the last has no next token): eh_proj output, final hidden
        state (after shared_head.norm) and logits."""
        from transformers.masking_utils import create_causal_mask

        emb = F.embedding(tokens[:, 1:], self.t["embed_tokens.weight"])
        if zero_first_embedding:  # vLLM: inputs_embeds[positions == 0] = 0
            emb = emb.clone()
            emb[:, 0] = 0
        h = hidden[:, :-1]
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=None,
                                  past_key_values=None, position_ids=pos)
        y = self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=self.rotary(x, pos))
        y = self.head_norm(y)
        return {"eh_proj": x, "hidden": y, "logits": y @ self.t["shared_head.head.weight"].T}


# ---------------------------------------------------------------------------------------------------
# megatron (spawned gloo ranks)
# ---------------------------------------------------------------------------------------------------
def swap_norms(mtp):
    """enorm and hnorm weights exchanged."""
    e, h = mtp.enorm.weight, mtp.hnorm.weight
    tmp = e.detach().clone()
    e.copy_(h)
    h.copy_(tmp)


def swap_eh_halves(mtp):
    """eh_proj's input columns as [hidden, embedding] instead of [embedding, hidden]."""
    w = mtp.eh_proj.weight
    half = w.shape[1] // 2
    w.copy_(torch.cat([w[:, half:], w[:, :half]], dim=1))


MUTATIONS = {"swap_norms": swap_norms, "swap_eh_halves": swap_eh_halves}


def _gather_tp(x, dim):
    """Concatenate a tensor's TP shards (identity at TP1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    # labels are required with MTP (gpt_model.py clones them); the loss itself is not used
    output = model(tokens, position_ids, None, labels=torch.roll(tokens, -1, dims=1))
    return output, lambda out: (out.float().sum(), torch.tensor(b * s), {})


def _run_mtp(model, tokens, vocab):
    """One forward through megatron's pipeline schedule; on the stage holding the MTP layer, its input
    hidden state, eh_proj output, output hidden state and logits as [b, s, ...] (whole sequence and
    vocab); None on the other stages."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mtp = model.mtp.layers[0] if getattr(model, "mtp_process", False) else None
    seen, handles = {}, []

    def layer_hook(mod, args, kwargs, out):
        seen["input_hidden"], seen["hidden"] = kwargs["hidden_states"], out[0]

    def eh_hook(mod, args, out):
        seen["eh_proj"] = out[0]

    if mtp is not None:
        handles = [mtp.register_forward_hook(layer_hook, with_kwargs=True),
                   mtp.eh_proj.register_forward_hook(eh_hook)]
    b, s = tokens.shape
    try:
        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter([tokens]),
                                        model=model, num_microbatches=1, seq_length=s, micro_batch_size=b,
                                        forward_only=True)
            logits = model.output_layer(seen["hidden"])[0] if mtp is not None else None
    finally:
        for handle in handles:
            handle.remove()
    if mtp is None:
        return None
    # sequence parallel: [s/tp, b, h] shards; eh_proj output: [s, b, h/tp]; logits: [s, b, v/tp]
    sp = model.config.sequence_parallel
    out = {"input_hidden": _gather_tp(seen["input_hidden"], 0) if sp else seen["input_hidden"],
           "hidden": _gather_tp(seen["hidden"], 0) if sp else seen["hidden"],
           "eh_proj": _gather_tp(seen["eh_proj"], 2),
           "logits": _gather_tp(logits, 2)[..., :vocab]}
    return {k: v.transpose(0, 1).detach().clone() for k, v in out.items()}


def megatron_mtp(rank, world, hf_path, tokens, cases):
    """For each (layout, mutations) case: build the model, load the HF checkpoint (checkpoint.engine), run
    MTP, then once per mutation of the MTP layer's weights. Returns [{name: outputs}] per case from the
    rank that holds the MTP layer (last pipeline stage, TP and DP rank 0), None from the others."""
    from transformers import AutoConfig

    from megatron.core import parallel_state as ps

    from megatron_patch.checkpoint.engine import ShardPlan, load_into_chunks
    from megatron_patch.checkpoint.hf_reader import HFCheckpoint
    from megatron_patch.models.builder import build_family_model, initialize_parallel
    from megatron_patch.models.families import family_for_config

    hf_config = AutoConfig.from_pretrained(hf_path)
    family, vocab = family_for_config(hf_config), hf_config.vocab_size
    out = []
    for layout, mutations in cases:
        initialize_parallel(layout)
        chunks, config, args = build_family_model(hf_config, layout, params_dtype=torch.float32, bf16=False)
        with HFCheckpoint(hf_path) as ckpt:
            load_into_chunks(chunks, ShardPlan(family, hf_config, layout, config, args), ckpt.get_slice)
        (model,) = chunks
        model.eval()
        results = {"baseline": _run_mtp(model, tokens, vocab)}
        mtp = model.mtp.layers[0] if getattr(model, "mtp_process", False) else None
        saved = mtp and {k: v.detach().clone() for k, v in mtp.state_dict().items() if torch.is_tensor(v)}
        for name in mutations:
            if mtp is not None:
                with torch.no_grad():
                    MUTATIONS[name](mtp)
            results[name] = _run_mtp(model, tokens, vocab)
            if mtp is not None:
                mtp.load_state_dict(saved, strict=False)
        keep = mtp is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        out.append(results if keep else None)
        ps.destroy_model_parallel()
    return out


def run_megatron(hf_path, tokens, cases, world):
    """[{name: outputs}] per (layout, mutations) case, from whichever rank returned them."""
    per_rank = run_ranks(megatron_mtp, world, timeout=300, env=ENV, args=(hf_path, tokens, tuple(cases)))
    return [next(r[i] for r in per_rank if r[i] is not None) for i in range(len(cases))]


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------
def _max_diff(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="module")
def reference(mini):
    return Reference(mini)


@pytest.fixture(scope="module")
def hidden(reference, tokens):
    """(pre-norm, post-norm) final hidden states of the HF main model."""
    return reference.main_hidden(tokens)


@pytest.fixture(scope="module")
def expected(reference, tokens, hidden):
    return reference.mtp(tokens, hidden[1])


# One 2-rank group for every layout (start-up paid once); TP1 runs data-parallel (each rank the whole
# batch). The MTP layer lives on the last pipeline stage; with TP, eh_proj is column-parallel and the
# sequence is split (sequence parallel).
LAYOUTS = {"TP1": ParallelLayout(), "PP2": ParallelLayout(pp=2), "TP2xEP2": ParallelLayout(tp=2, ep=2, etp=1)}


@pytest.fixture(scope="module")
def runs(mini, tokens):
    cases = [(layout, tuple(MUTATIONS) if name == "TP1" else ()) for name, layout in LAYOUTS.items()]
    return dict(zip(LAYOUTS, run_megatron(mini, tokens, cases, world=2)))


def test_checkpoint_has_deepseek_mtp_layout(reference):
    """make-mini writes a DeepSeek-V3-shaped MTP module: MoE layer N, copies of embedding and head."""
    cfg = reference.main.config
    assert cfg.num_nextn_predict_layers == 1 and reference.n >= cfg.first_k_dense_replace
    assert type(reference.layer.mlp).__name__ == "DeepseekV3MoE"
    t = reference.t
    assert torch.equal(t["embed_tokens.weight"], t["main_embed"])
    assert torch.equal(t["shared_head.head.weight"], t["main_head"])
    # non-trivial norms, so that swapping or misplacing them is visible
    assert not torch.allclose(t["enorm.weight"], t["hnorm.weight"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mtp_matches_reference(runs, hidden, expected, layout):
    run = runs[layout]["baseline"]
    mc = {k: v[:, :-1] for k, v in run.items()}  # the last position has no next token
    # (a) megatron's MTP input is the main model's post-final-norm hidden state
    assert _max_diff(run["input_hidden"], hidden[1]) <= ATOL
    for key in ("eh_proj", "hidden", "logits"):
        assert _max_diff(mc[key], expected[key]) <= ATOL, key
    assert torch.equal(mc["logits"].argmax(-1), expected["logits"].argmax(-1))


def test_mtp_reference_variants_differ(reference, tokens, hidden, runs):
    """Documented differences: feeding the pre-norm hidden state, and vLLM's zeroed position-0 embedding,
    both change the MTP logits far beyond the tolerance (megatron does neither)."""
    mc = runs["TP1"]["baseline"]["logits"][:, :-1]
    assert _max_diff(mc, reference.mtp(tokens, hidden[0])["logits"]) > BROKEN_MIN
    vllm = reference.mtp(tokens, hidden[1], zero_first_embedding=True)["logits"]
    assert _max_diff(mc[:, :1], vllm[:, :1]) > BROKEN_MIN
    assert _max_diff(mc[:, 1:], vllm[:, 1:]) > BROKEN_MIN  # through attention


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_wrong_mapping_is_detected(runs, expected, mutation):
    assert _max_diff(runs["TP1"][mutation]["logits"][:, :-1], expected["logits"]) > BROKEN_MIN
