# pytest tests/test_model.py
"""The Transformer of DESIGN §3: named sizes, masks, caches, init."""

import math

import pytest
import torch
import torch.nn.functional as F
from smdm.model import NAMED_SIZES, ModelConfig, build_model, config_by_name


@pytest.mark.parametrize("name", list(NAMED_SIZES))
def test_named_size_matches_formula_and_name(name):
    c = config_by_name(name)
    L, d, ffn = c.n_layer, c.d_model, c.d_ff
    assert c.non_embedding_params() == L * (4 * d * d + 3 * d * ffn + 2 * d) + d
    model_params = sum(p.numel() for n, p in build_model(c).named_parameters()
                       if not n.startswith(("embed", "head"))) if c.n_layer <= 6 else None
    if model_params is not None:  # the formula counts exactly the module's parameters
        assert model_params == c.non_embedding_params()
    millions = c.non_embedding_params() / 1e6
    assert abs(millions - int(name[:-1])) / int(name[:-1]) < 0.06, (name, millions)


def test_mdm_has_mask_row_and_arm_does_not():
    mdm = build_model(config_by_name("tiny", vocab_size=50))
    arm = build_model(config_by_name("tiny", vocab_size=50, causal=True))
    assert mdm.embed.num_embeddings == 51 and mdm.mask_id == 50
    assert arm.embed.num_embeddings == 50 and arm.mask_id is None
    assert mdm(torch.tensor([[50, 1, 2]])).shape == (1, 3, 50)


def test_init_std_follows_smdm():
    c = config_by_name("demo", vocab_size=1000)
    m = build_model(c)
    d, L = c.d_model, c.n_layer
    assert abs(m.blocks[0].mlp.w1.weight.std().item() - math.sqrt(2 / (5 * d))) < 0.01
    assert abs(m.blocks[0].mlp.w3.weight.std().item() - 1 / (math.sqrt(d) * L)) < 0.005


def test_bidirectional_vs_causal():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 10))
    mdm = build_model(config_by_name("tiny", vocab_size=50)).eval()
    arm = build_model(config_by_name("tiny", vocab_size=50, causal=True)).eval()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50
    # the ARM's earlier positions never see the last token; the MDM's do
    assert torch.allclose(arm(ids)[:, :-1], arm(changed)[:, :-1], atol=1e-6)
    assert not torch.allclose(mdm(ids)[:, :-1], mdm(changed)[:, :-1], atol=1e-6)


def test_segment_ids_equal_separate_documents():
    torch.manual_seed(1)
    mdm = build_model(config_by_name("tiny", vocab_size=50)).eval()
    a, b = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 4))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 6 + [1] * 4])
    pos = torch.tensor([list(range(6)) + list(range(4))])
    out = mdm(packed, segment_ids=seg, positions=pos)
    assert torch.allclose(out[:, :6], mdm(a), atol=1e-5)
    assert torch.allclose(out[:, 6:], mdm(b), atol=1e-5)


def test_key_padding_leaves_real_rows_unchanged():
    torch.manual_seed(2)
    mdm = build_model(config_by_name("tiny", vocab_size=50)).eval()
    ids = torch.randint(0, 50, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    valid = torch.tensor([[True] * 7 + [False] * 3])
    assert torch.allclose(mdm(padded, key_valid=valid)[:, :7], mdm(ids), atol=1e-5)


def test_arm_kv_cache_equals_full_forward():
    torch.manual_seed(3)
    arm = build_model(config_by_name("tiny", vocab_size=50, causal=True)).eval()
    ids = torch.randint(0, 50, (2, 12))
    full = arm(ids)
    cache = arm.make_kv_cache(2, 16)
    chunks = [arm(ids[:, :5], kv_cache=cache, cache_pos=0)]
    for i in range(5, 12):
        chunks.append(arm(ids[:, i:i + 1], kv_cache=cache, cache_pos=i))
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_grouped_query_attention_runs():
    c = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, d_model=32, d_ff=64, vocab_size=20)
    m = build_model(c)
    assert m(torch.randint(0, 20, (2, 5))).shape == (2, 5, 20)


def test_bad_config_and_positions_raise():
    with pytest.raises(ValueError, match="unknown model config 'nope'"):
        config_by_name("nope")
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(n_layer=1, n_head=3, d_model=32, d_ff=64)
    m = build_model(config_by_name("tiny", vocab_size=50, max_seq_len=8))
    with pytest.raises(ValueError, match="context length"):
        m(torch.zeros(1, 9, dtype=torch.long))


def _loss_and_grads(causal: bool, activation_checkpointing: bool, compile_backend=None):
    """One MDM or ARM loss on packed windows (segment ids), backward; returns (loss, {name: grad})."""
    from smdm.diffusion import ar_loss, mdm_loss

    m = build_model(config_by_name("tiny", vocab_size=50, causal=causal),
                    activation_checkpointing=activation_checkpointing)
    if compile_backend is not None:
        for block in m.blocks:
            block.compile(backend=compile_backend, fullgraph=True)
    rng = torch.get_rng_state()
    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([[0] * 10 + [1] * 6 + [2] * 9] * 3)  # (3, 25): three documents per window
    if causal:
        loss = ar_loss(m, torch.randint(0, 50, (3, 25), generator=g), segment_ids=seg)
    else:
        x0 = torch.randint(0, 50, (3, 25), generator=g)
        mask = torch.rand(3, 25, generator=g) < 0.5
        loss = mdm_loss(m, x0.masked_fill(mask, m.mask_id), x0, mask, mask.float() * 2, segment_ids=seg)
    loss.backward()
    assert torch.equal(torch.get_rng_state(), rng)  # forward + backward never touch the global RNG
    return loss.detach(), {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("causal", [False, True], ids=["mdm", "arm"])
def test_activation_checkpointing_gives_the_same_gradients(causal):
    # Exact equality on CPU float32: the recomputation runs the same kernels on the same inputs (the blocks
    # draw no random numbers), and backward consumes the recomputed activations in the same order.
    loss0, g0 = _loss_and_grads(causal, False)
    loss1, g1 = _loss_and_grads(causal, True)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and all(g0[n] is not None for n in g0)
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


def test_activation_checkpointing_recomputes_blocks_only_with_grad():
    """With grad: each block's checkpoint saves only its inputs (fewer saved tensors in the graph); under
    no_grad or with a KV cache nothing is recomputed and outputs are unchanged."""
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = build_model(config_by_name("tiny", vocab_size=50, causal=True))
    ckpt = build_model(config_by_name("tiny", vocab_size=50, causal=True), activation_checkpointing=True)

    def saved(model):
        n = 0

        def pack(t):
            nonlocal n
            n += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids).sum()
        return n

    assert saved(ckpt) < saved(plain) / 2
    with torch.no_grad():
        assert torch.equal(ckpt(ids), plain(ids))
    cache_a, cache_b = plain.make_kv_cache(2, 12), ckpt.make_kv_cache(2, 12)
    assert torch.equal(ckpt(ids, kv_cache=cache_b), plain(ids, kv_cache=cache_a))
    assert all(torch.equal(a, b) for a, b in zip(cache_a.k, cache_b.k))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
def test_blocks_trace_whole_under_torch_compile():
    """Each block, activation checkpointing included, is captured by dynamo as one graph (fullgraph=True: a
    graph break is an error) and differentiated by AOT autograd; backend "aot_eager" runs the captured aten
    graph as is, so losses and gradients equal eager exactly. Inductor's code generation (what `smdm train
    --compile` adds on top, a g++ build of its kernels) is covered by the slow tests in test_train.py."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh cache: Block.forward's compiled code is shared by every model in the process
    graphs = counters["stats"]["unique_graphs"]
    try:
        for causal in (False, True):
            loss0, g0 = _loss_and_grads(causal, False)
            loss1, g1 = _loss_and_grads(causal, True, compile_backend="aot_eager")
            assert torch.equal(loss0, loss1)
            assert all(torch.equal(g0[n], g1[n]) for n in g0)
    finally:
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] - graphs == 2  # one per objective, shared by the blocks


# ---- the fused attention path (model.attention; DESIGN §7) ----
def _both(model, *args, **kw):
    """Logits through SDPA and through smdm.kernels.attention (its PyTorch reference on CPU)."""
    out = {}
    for impl in ("sdpa", "fused"):
        model.attention = impl
        with torch.no_grad():
            out[impl] = model(*args, **kw)
    model.attention = "auto"
    return out["sdpa"], out["fused"]


@pytest.mark.parametrize("n_kv_head", [None, 1], ids=["mha", "gqa"])
def test_fused_attention_path_matches_sdpa(n_kv_head):
    """Document masking, ragged key padding and the prefix K/V cache, translated to the kernel's segment ids,
    give SDPA's logits (float32 here: the kernel's reference runs the same math)."""
    torch.manual_seed(4)
    c = config_by_name("tiny", vocab_size=50, n_kv_head=n_kv_head)
    mdm = build_model(c).eval()
    ids = torch.randint(0, 50, (3, 12))
    a, b = _both(mdm, ids)
    assert torch.allclose(a, b, atol=1e-5)
    seg = torch.tensor([[0] * 5 + [1] * 7, [0] * 12, [0] * 2 + [3] * 4 + [5] * 6])
    a, b = _both(mdm, ids, segment_ids=seg)
    assert torch.allclose(a, b, atol=1e-5)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[0, 9:] = False
    valid[2, 4:] = False
    a, b = _both(mdm, ids, key_valid=valid)
    assert torch.allclose(a, b, atol=1e-5)
    # prefix cache: the first 8 slots written once, then a block of 4 queries attends to slots [0, 12)
    for impl in ("sdpa", "fused"):
        mdm.attention = impl
        cache = mdm.make_kv_cache(3, 16)
        with torch.no_grad():
            mdm(ids[:, :8], kv_cache=cache, cache_pos=0, key_valid=valid[:, :8])
            out = mdm(ids[:, 8:], kv_cache=cache, cache_pos=8, key_valid=valid)
        if impl == "sdpa":
            ref = out
    mdm.attention = "auto"
    assert torch.allclose(ref, out, atol=1e-5)


def test_fused_attention_choice_and_errors():
    mdm = build_model(config_by_name("tiny", vocab_size=50))
    x = torch.zeros(1, 4, dtype=torch.long)
    assert mdm._fused_backend(x) is None  # auto on CPU: SDPA
    mdm.attention = "fused"
    assert mdm._fused_backend(x) == "auto"
    mdm.attention = "flash"
    with pytest.raises(ValueError, match="model.attention must be one of"):
        mdm(x)
    arm = build_model(config_by_name("tiny", vocab_size=50, causal=True))
    arm.attention = "fused"
    with pytest.raises(ValueError, match="bidirectional"):
        arm(x)
    mdm.attention = "fused"
    with pytest.raises(ValueError, match="segment_ids must be >= 0"):
        mdm(x, segment_ids=torch.tensor([[0, 0, -1, -1]]))
    for impl in ("sdpa", "fused"):  # argument checks shared by both attention paths
        mdm.attention = impl
        with pytest.raises(ValueError, match="key_valid must have shape"):
            mdm(x, key_valid=torch.ones(1, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match="segment_ids cannot be combined with a KV cache"):
            mdm(x, segment_ids=torch.zeros(1, 4, dtype=torch.long), kv_cache=mdm.make_kv_cache(1, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_attention_in_the_model_on_gpu():
    """bf16 MDM on CUDA: "auto" takes the kernel under no_grad; its logits' error against the float32 model is
    at most 2x SDPA's (plus a small floor), for plain, document-masked, ragged and prefix-cache calls."""
    from smdm import kernels

    torch.manual_seed(5)
    c = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=256, d_ff=512, vocab_size=512)  # head dim 64
    ref = build_model(c, device="cuda").eval()
    mdm = build_model(c, device="cuda").to(torch.bfloat16).eval()
    B, L = 3, 300
    ids = torch.randint(0, 512, (B, L), device="cuda")
    seg = (torch.arange(L, device="cuda") * 3 // L).expand(B, L).contiguous()
    valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
    valid[1, 200:] = False
    with torch.no_grad():
        assert mdm._fused_backend(ids) == "auto" and kernels.available()
        for kw in ({}, {"segment_ids": seg}, {"key_valid": valid}):
            want = ref(ids, **kw).float()
            mdm.attention = "auto"
            got = mdm(ids, **kw).float()
            mdm.attention = "sdpa"
            base = mdm(ids, **kw).float()
            rows = valid[:, :, None].expand_as(want) if "key_valid" in kw else torch.ones_like(want, dtype=bool)
            err, err_sdpa = (got - want)[rows].abs().max(), (base - want)[rows].abs().max()
            assert torch.isfinite(got[rows]).all() and err <= 2 * err_sdpa + 1e-2, (kw.keys(), err, err_sdpa)
        for impl in ("auto", "sdpa"):  # prefix cache: Lk > Lq
            mdm.attention = impl
            cache = mdm.make_kv_cache(B, L)
            mdm(ids[:, :256], kv_cache=cache, cache_pos=0)
            out = mdm(ids[:, 256:], kv_cache=cache, cache_pos=256).float()
            if impl == "auto":
                got = out
        assert (got - out).abs().max() < 0.1


def _reference_logits(m, ids, *, segment_ids=None, positions=None):
    """DESIGN §3 written out in float64 from the weights alone: pre-RMSNorm (eps 1e-5), GPT-NeoX half-split
    RoPE (base 10000, full head dim) rotating each vector by its angle, query head h reading K/V head
    h // (n_head / n_kv_head), softmax attention (causal for the ARM, within a document), SwiGLU
    w3(silu(w1 x) * w2 x), final RMSNorm, untied head."""
    c = m.config
    B, L = ids.shape
    H, Hk, hd = c.n_head, c.kv_heads, c.head_dim
    pos = torch.arange(L).expand(B, L) if positions is None else positions.expand(B, L)
    W = {n: p.detach().double() for n, p in m.named_parameters()}

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w

    def rope(v, p):  # v (hd,) at integer position p
        out = v.clone()
        for i in range(hd // 2):
            a = p * 10000.0 ** (-2 * i / hd)
            out[i] = v[i] * math.cos(a) - v[i + hd // 2] * math.sin(a)
            out[i + hd // 2] = v[i + hd // 2] * math.cos(a) + v[i] * math.sin(a)
        return out

    x = W["embed.weight"][ids]  # (B, L, d)
    for li in range(c.n_layer):
        pre = f"blocks.{li}."
        h = norm(x, W[pre + "norm1.weight"])
        qkv = h @ W[pre + "attn.qkv.weight"].T
        q, k, v = qkv[..., :H * hd], qkv[..., H * hd:(H + Hk) * hd], qkv[..., (H + Hk) * hd:]
        y = torch.zeros(B, L, H * hd, dtype=torch.float64)
        for b in range(B):
            for head in range(H):
                g = head // (H // Hk)
                for i in range(L):
                    qi = rope(q[b, i, head * hd:(head + 1) * hd], int(pos[b, i]))
                    keys = [j for j in range(L) if not (c.causal and j > i)
                            and (segment_ids is None or segment_ids[b, j] == segment_ids[b, i])]
                    s = torch.stack([qi @ rope(k[b, j, g * hd:(g + 1) * hd], int(pos[b, j])) for j in keys])
                    a = torch.softmax(s / math.sqrt(hd), 0)
                    y[b, i, head * hd:(head + 1) * hd] = a @ v[b, keys, g * hd:(g + 1) * hd]
        x = x + y @ W[pre + "attn.proj.weight"].T
        h = norm(x, W[pre + "norm2.weight"])
        x = x + (F.silu(h @ W[pre + "mlp.w1.weight"].T) * (h @ W[pre + "mlp.w2.weight"].T)) @ W[pre + "mlp.w3.weight"].T
    return norm(x, W["norm.weight"]) @ W["head.weight"].T


@pytest.mark.parametrize("causal", [False, True], ids=["mdm", "arm"])
def test_float64_model_equals_the_design_written_out(causal):
    """A float64 model computes in float64 (RMSNorm and RoPE used to round through float32: ~1e-6 off), and
    every §3 rule holds against the written-out reference: GQA head mapping (4 query heads, 2 K/V heads),
    document masking, explicit and KV-cache positions."""
    c = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, vocab_size=13, max_seq_len=64,
                    causal=causal)
    m = build_model(c, seed=1).double().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:  # non-trivial gains, so the norm's placement matters
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
    ids = torch.randint(0, c.n_embed_rows, (2, 7), generator=torch.Generator().manual_seed(3))
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 2, 4, 6, 8, 10, 12]])
    with torch.no_grad():
        for kw in ({}, {"segment_ids": seg}, {"positions": pos}):
            out = m(ids, **kw)
            assert out.dtype == torch.float64
            torch.testing.assert_close(out, _reference_logits(m, ids, **kw), rtol=0, atol=1e-12)
        if causal:  # the ARM's cache: chunks at cache_pos get positions cache_pos + arange
            cache = m.make_kv_cache(2, 8)
            out = torch.cat([m(ids[:, :3], kv_cache=cache), m(ids[:, 3:], kv_cache=cache, cache_pos=3)], dim=1)
            torch.testing.assert_close(out, _reference_logits(m, ids), rtol=0, atol=1e-12)


def test_config_rejects_kv_heads_below_one_and_odd_head_dims():
    # n_kv_head=0 used to raise ZeroDivisionError, a negative one passed the divisibility check; an odd head
    # dimension (no RoPE pairs) failed at the first forward pass with a shape error
    for kv in (0, -2):
        with pytest.raises(ValueError, match="n_kv_head"):
            ModelConfig(n_layer=1, n_head=4, n_kv_head=kv, d_model=32, d_ff=64)
    with pytest.raises(ValueError, match="even"):
        ModelConfig(n_layer=1, n_head=4, d_model=36, d_ff=64)
