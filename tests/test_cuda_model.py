"""Whole-model tests of the CUDA backend against transformers on the GPU: logits (prefill,
chunked prefill, decode) and greedy continuations of tiny random Llama variants whose head
sizes the GPU attention kernels serve, in bfloat16 and float16. Run by scripts/gpu_run.sh;
skipped where there is no GPU or no CUDA build."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ftengine import _C, Engine, SamplingParams
from model_fixtures import CUDA_DTYPES as DTYPES
from model_fixtures import CUDA_VARIANTS, load_reference, make_tiny_llama

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (_C.has_cuda and torch.cuda.is_available()),
                       reason="needs a GPU and a CUDA build of ftengine"),
]

def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda")).logits[0].float().cpu().numpy()


def low_precision_logits(directory, ids, dtype):
    """What transformers computes loading the checkpoint in `dtype` (the rule's yardstick)."""
    model = load_reference(directory, DTYPES[dtype])
    try:
        return hf_logits(model, ids)
    finally:
        del model


def assert_within_twice_torch(ours, reference, torch_low, floor=1e-3):
    """FlashAttention-2's rule for a whole model: our error against the float32 reference is at
    most twice that of transformers computing in the same low precision (plus a small floor)."""
    assert np.isfinite(ours).all(), "non-finite logits"
    ours_error = np.abs(ours - reference).max()
    torch_error = np.abs(torch_low - reference).max()
    scale = np.abs(reference).max()
    assert ours_error <= 2 * torch_error + floor * scale, (ours_error, torch_error, scale)


PROMPT = list(range(3, 40)) + list(range(100, 300, 3))  # 104 tokens


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("variant", sorted(CUDA_VARIANTS))
def test_prompt_logits_match_transformers(cuda_model, variant, dtype):
    directory, reference = cuda_model(variant, dtype)
    engine = Engine.from_pretrained(directory, device="cuda", dtype=dtype, progress=False,
                                    kv_cache_tokens=4096)
    ours = engine.logits(PROMPT)
    assert_within_twice_torch(ours, hf_logits(reference, PROMPT),
                              low_precision_logits(directory, PROMPT, dtype))


@pytest.mark.parametrize("chunk", [1, 16, 50])
def test_chunked_prefill_matches_whole_prompt(cuda_model, chunk):
    """Chunks of the prompt attend over the paged cache their predecessors wrote: chunk 1 is
    token-by-token decode through the split-KV kernel."""
    directory, reference = cuda_model("gqa_hd64", "bfloat16")
    whole = Engine.from_pretrained(directory, device="cuda", progress=False,
                                   kv_cache_tokens=4096)
    chunked = Engine.from_pretrained(directory, device="cuda", progress=False,
                                     kv_cache_tokens=4096, max_batch_tokens=chunk,
                                     max_num_seqs=1)
    expected = hf_logits(reference, PROMPT)
    low = low_precision_logits(directory, PROMPT, "bfloat16")
    assert_within_twice_torch(whole.logits(PROMPT), expected, low)
    assert_within_twice_torch(chunked.logits(PROMPT), expected, low)


def reference_greedy(model, ids, new_tokens):
    """Greedy continuation in float32, with each step's margin between the best and second
    best logit (a step decided by less than rounding is not a fair comparison)."""
    tokens, margins = [], []
    with torch.no_grad():
        current = list(ids)
        for _ in range(new_tokens):
            logits = model(torch.tensor([current], device="cuda")).logits[0, -1].float()
            top = torch.topk(logits, 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            current.append(tokens[-1])
    return tokens, margins


def assert_greedy_matches(reference, prompt, tokens, noise):
    """Our greedy continuation equals the float32 reference's up to the first step whose margin
    is within twice `noise` (decided by rounding, in any implementation); after it, the two
    continue from different tokens."""
    expected, margins = reference_greedy(reference, prompt, len(tokens))
    for step, (ours, theirs) in enumerate(zip(tokens, expected, strict=True)):
        if ours != theirs:
            assert margins[step] < 2 * noise, (step, ours, theirs, margins[step], noise)
            break


def dtype_noise(directory, reference, dtype):
    """How far transformers itself, in this dtype, strays from float32 on PROMPT's logits."""
    return np.abs(low_precision_logits(directory, PROMPT, dtype) -
                  hf_logits(reference, PROMPT)).max()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("variant", ["gqa_hd64", "mha_hd128", "llama3_rope_gqa8"])
def test_greedy_batch_matches_transformers(cuda_model, variant, dtype):
    directory, reference = cuda_model(variant, dtype)
    engine = Engine.from_pretrained(directory, device="cuda", dtype=dtype, progress=False,
                                    kv_cache_tokens=8192)
    noise = dtype_noise(directory, reference, dtype)
    prompts = [PROMPT[:5], PROMPT, PROMPT[:37] + PROMPT[60:]]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert_greedy_matches(reference, prompt, output.token_ids, noise)


# Members that can serve every call of a model; the Hopper member needs a Hopper GPU.
ATTENTION_KERNELS = ["prefill_sm90", "prefill_sm80"]


# The Turing and Volta members have fp16 only (their GPUs have no bf16 tensor cores): forced on
# a float16 model. They run on later GPUs too, so the GPU at hand tests them.
FP16_ATTENTION_KERNELS = ["prefill_sm75", "prefill_sm70"]


@pytest.mark.parametrize(
    "kernel,dtype",
    [(kernel, "bfloat16") for kernel in ATTENTION_KERNELS]
    + [(kernel, "float16") for kernel in FP16_ATTENTION_KERNELS],
)
def test_forced_attention_kernel_matches_transformers(cuda_model, kernel, dtype):
    """Each member of the family, forced for prefill and decode alike, gives transformers'
    greedy continuation (dispatch picks them by compute capability on real hardware)."""
    if kernel == "prefill_sm90" and _C.cuda_device_capability() != 90:
        pytest.skip("prefill_sm90 runs on Hopper (compute capability 9.0) only")
    directory, reference = cuda_model("gqa_hd64", dtype)
    engine = Engine.from_pretrained(directory, device="cuda", dtype=dtype, progress=False,
                                    kv_cache_tokens=4096, attention_kernel=kernel)
    assert_within_twice_torch(engine.logits(PROMPT), hf_logits(reference, PROMPT),
                              low_precision_logits(directory, PROMPT, dtype))
    output = engine.generate([PROMPT[:40]], SamplingParams(max_new_tokens=20,
                                                           ignore_eos=True))[0]
    assert_greedy_matches(reference, PROMPT[:40], output.token_ids,
                          dtype_noise(directory, reference, dtype))


@pytest.mark.parametrize("variant", ["gqa_hd64", "mha_hd128"])
def test_cuda_graph_replay_matches_eager(cuda_model, variant):
    """Decode steps replayed from recorded graphs give the tokens of launching every kernel,
    across block boundaries (new recordings) and for a batch."""
    directory, _ = cuda_model(variant, "bfloat16")
    eager = Engine.from_pretrained(directory, device="cuda", progress=False,
                                   kv_cache_tokens=8192, cuda_graphs=False, block_size=64)
    graphed = Engine.from_pretrained(directory, device="cuda", progress=False,
                                     kv_cache_tokens=8192, cuda_graphs=True, block_size=64)
    prompts = [PROMPT[:3], PROMPT[:61], PROMPT]
    lengths = [150, 90, 40]  # 3 + 150 tokens cross two 64-slot block boundaries
    for prompt, n in zip(prompts, lengths, strict=True):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        assert graphed.generate([prompt], params)[0].token_ids == \
            eager.generate([prompt], params)[0].token_ids
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)
    together = graphed.generate(prompts, params)
    expected = eager.generate(prompts, params)
    for a, b in zip(together, expected, strict=True):
        assert a.token_ids == b.token_ids


def test_sampling_is_reproducible_and_valid(cuda_model):
    directory, _ = cuda_model("gqa_hd64", "bfloat16")
    engine = Engine.from_pretrained(directory, device="cuda", progress=False,
                                    kv_cache_tokens=4096)
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.9, seed=7,
                            ignore_eos=True, repetition_penalty=1.2)
    first = engine.generate([PROMPT[:9], PROMPT[:30]], params)
    second = engine.generate([PROMPT[:9], PROMPT[:30]], params)
    vocab = engine.config.vocab_size
    for a, b in zip(first, second, strict=True):
        assert a.token_ids == b.token_ids
        assert all(0 <= t < vocab for t in a.token_ids)
    other = engine.generate([PROMPT[:9]], SamplingParams(max_new_tokens=24, temperature=0.9,
                                                         seed=8, ignore_eos=True))
    assert other[0].token_ids != first[0].token_ids


def test_cuda_errors_are_clear(tmp_path):
    make_tiny_llama(tmp_path, "gqa", dtype=torch.bfloat16, **CUDA_VARIANTS["gqa_hd64"])
    from ftengine.errors import FtengineError
    with pytest.raises(FtengineError, match="dtype on cuda"):
        Engine.from_pretrained(tmp_path, device="cuda", dtype="float32", progress=False)
    with pytest.raises(FtengineError, match="not available"):
        Engine.from_pretrained(tmp_path, device="cuda:x", progress=False)
    # A head size the GPU kernels do not serve fails at load, naming the reason.
    odd = tmp_path / "hd80"
    make_tiny_llama(odd, "head_dim_80", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot run on cuda.*head_dim"):
        Engine.from_pretrained(odd, device="cuda", progress=False, kv_cache_tokens=1024)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        Engine.from_pretrained(tmp_path, device="cuda", progress=False, attention_kernel="sm1")
