"""The CUDA sampler (kernels/cuda/sampling.cu) against torch and the CPU sampler.

Needs an NVIDIA GPU and ftengine._C built with CUDA; skipped anywhere else (CI)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

try:
    from ftengine import _C
except ImportError:  # the package is not built here
    _C = None
if _C is None or not hasattr(_C, "cuda_sample") or not torch.cuda.is_available():
    pytest.skip("needs a GPU and ftengine._C built with CUDA", allow_module_level=True)

AWKWARD_VOCABS = [1, 2, 97, 4097, 32000, 128256, 151936, 256000]


def _per_row(value, rows: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.is_cuda:
        return value
    tensor = torch.as_tensor(value, dtype=dtype)
    if tensor.ndim == 0:
        tensor = tensor.expand(rows)
    assert tensor.shape == (rows,)
    return tensor.contiguous().cuda()


def sample(
    logits: torch.Tensor,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    repetition_penalty=1.0,
    histories=None,
    seeds=0,
    steps=0,
    advance_steps=False,
    logits_row_stride=0,
    vocab=None,
    workspace=None,
) -> torch.Tensor:
    """Draws one token per row of `logits` (float32 on the GPU, penalised in place). Per-row
    settings are scalars or sequences; `steps` may be an int64 GPU tensor that advance_steps
    moves."""
    rows = logits.shape[0]
    vocab = logits.shape[1] if vocab is None else vocab
    temperature = _per_row(temperature, rows, torch.float32)
    top_k = _per_row(top_k, rows, torch.int32)
    top_p = _per_row(top_p, rows, torch.float32)
    penalty = _per_row(repetition_penalty, rows, torch.float32)
    seeds = _per_row(seeds, rows, torch.int64)
    steps = _per_row(steps, rows, torch.int64)
    history = offsets = None
    if histories is not None:
        flat = [i for h in histories for i in h]
        lengths = torch.tensor([0] + [len(h) for h in histories], dtype=torch.int64)
        # One spare entry so that an empty history still has an address.
        history = torch.tensor(flat + [0], dtype=torch.int32).cuda()
        offsets = torch.cumsum(lengths, 0).to(torch.int32).cuda()
    out = torch.empty(rows, dtype=torch.int32, device="cuda")
    _C.cuda_sample(
        logits.data_ptr(),
        rows,
        vocab,
        temperature.data_ptr(),
        top_k.data_ptr(),
        top_p.data_ptr(),
        penalty.data_ptr(),
        0 if history is None else history.data_ptr(),
        0 if offsets is None else offsets.data_ptr(),
        seeds.data_ptr(),
        steps.data_ptr(),
        out.data_ptr(),
        stream=torch.cuda.current_stream().cuda_stream,
        logits_row_stride=logits_row_stride,
        advance_steps=advance_steps,
        workspace=0 if workspace is None else workspace.data_ptr(),
        workspace_bytes=0 if workspace is None else workspace.numel(),
    )
    return out


def allowed_tokens(
    logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float, slack: float = 0.0
) -> set[int]:
    """Ids a draw may return, as the CPU sampler defines them: order by logit descending, then
    id; keep top_k, then the smallest prefix holding top_p of their mass. `slack` widens top_p
    by a relative amount for boundaries float32 masses cannot resolve."""
    x = torch.nan_to_num(logits_row.double().cpu(), nan=float("-inf"))
    order = torch.sort(x, descending=True, stable=True).indices
    if 0 < top_k < x.numel():
        order = order[:top_k]
    weights = torch.exp((x[order] - x[order[0]]) / temperature)
    top_p = float(torch.tensor(top_p, dtype=torch.float32))  # the float the kernel reads
    if top_p < 1.0:
        cumulative = torch.cumsum(weights, 0) / weights.sum()
        target = torch.tensor([min(1.0, top_p * (1.0 + slack))], dtype=torch.float64)
        kept = int(torch.searchsorted(cumulative, target)) + 1
        order, weights = order[:kept], weights[:kept]
    return {int(i) for i, w in zip(order, weights, strict=True) if w > 0}


def expected_probabilities(logits_row, temperature, top_k, top_p) -> torch.Tensor:
    x = logits_row.double().cpu()
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[list(allowed_tokens(logits_row, temperature, top_k, top_p))] = True
    weights = torch.where(keep, torch.exp((x - x.max()) / temperature), torch.zeros_like(x))
    return weights / weights.sum()


def penalised(logits: torch.Tensor, history, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on one row: each distinct id once."""
    out = logits.clone()
    ids = torch.tensor(sorted({i for i in history if 0 <= i < logits.numel()}), dtype=torch.long)
    penalty = torch.tensor(penalty, dtype=torch.float32)  # float32 arithmetic, as the kernels
    if ids.numel():
        values = out[ids]
        out[ids] = torch.where(values < 0, values * penalty, values / penalty)
    return out


def cpu_sample(logits_row, temperature, top_k, top_p, penalty, history, seed=0) -> int:
    return _C.sample_token(
        logits_row.cpu().numpy(), temperature, top_k, top_p, penalty, list(history), seed
    )


def random_logits(rows: int, vocab: int, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator) * scale).cuda()


@pytest.mark.parametrize("vocab", AWKWARD_VOCABS)
def test_greedy_matches_argmax(vocab):
    logits = random_logits(5, vocab, seed=vocab)
    out = sample(logits.clone())
    assert torch.equal(out.long().cpu(), torch.argmax(logits, -1).cpu())


def test_greedy_ties_and_non_finite_follow_the_cpu_sampler():
    vocab = 1000
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1))
    logits[0] = 0.5  # every token ties: the first wins
    logits[1, 7] = logits[1, 300] = 50.0  # two maxima: the lower id
    logits[2] = float("-inf")  # nothing finite: id 0, as the CPU sampler returns
    logits[3, 0] = logits[3, 5] = float("nan")  # NaN never wins (torch.argmax would pick it)
    logits[4] = float("-inf")
    logits[4, 999] = -3.0
    logits[5, 10] = float("inf")
    out = sample(logits.cuda()).cpu().tolist()
    nan_free = torch.nan_to_num(logits[3], nan=float("-inf"))
    assert out == [0, 7, 0, int(torch.argmax(nan_free)), 999, 10]
    for row in range(6):
        assert out[row] == cpu_sample(logits[row], 0.0, 0, 1.0, 1.0, [])


def test_rows_with_a_stride_and_unaligned_starts():
    rows, vocab, stride = 7, 4097, 4099  # rows start off 16-byte boundaries
    storage = random_logits(rows, stride, seed=3)
    logits = storage[:, :vocab]
    greedy = sample(storage, logits_row_stride=stride, vocab=vocab)
    assert torch.equal(greedy.long().cpu(), torch.argmax(logits, -1).cpu())
    drawn = (
        sample(
            storage,
            temperature=1.0,
            top_p=0.5,
            seeds=list(range(rows)),
            logits_row_stride=stride,
            vocab=vocab,
        )
        .cpu()
        .tolist()
    )
    for row in range(rows):
        assert drawn[row] in allowed_tokens(logits[row], 1.0, 0, 0.5, slack=1e-5)


def test_top_k_one_is_argmax():
    logits = random_logits(8, 128256, seed=4)
    for step in range(4):
        out = sample(
            logits, temperature=1.0, top_k=1, top_p=[1.0, 0.5] * 4, seeds=list(range(8)), steps=step
        )
        assert torch.equal(out.long().cpu(), torch.argmax(logits, -1).cpu())


@pytest.mark.parametrize("vocab", [5000, 151936])
def test_repetition_penalty_matches_torch_and_the_cpu_sampler(vocab):
    rows = 4
    logits = random_logits(rows, vocab, seed=5)
    generator = torch.Generator().manual_seed(6)
    top = torch.topk(logits.cpu(), 8, dim=-1).indices
    histories = []
    for row in range(rows):
        ids = torch.randint(0, vocab, (40,), generator=generator).tolist()
        # The current leaders, repeated, ids in every 65536-id slice, and ids out of range.
        ids += top[row, :4].tolist() * 3 + [0, 65535, 65536, vocab - 1, -1, vocab, vocab + 7]
        histories.append(ids)
    histories[2] = []
    penalties = [1.3, 0.7, 1.5, 2.0]
    reference = torch.stack(
        [penalised(logits[r].cpu(), histories[r], penalties[r]) for r in range(rows)]
    )
    gpu_logits = logits.clone()
    out = sample(gpu_logits, repetition_penalty=penalties, histories=histories).cpu().tolist()
    assert torch.equal(gpu_logits.cpu(), reference)  # in place, exactly, once per distinct id
    assert out == torch.argmax(reference, -1).tolist()
    for row in range(rows):
        cpu = cpu_sample(logits[row], 0.0, 0, 1.0, penalties[row], histories[row])
        assert out[row] == cpu

    # The penalty comes first whatever the row then does with the logits.
    gpu_logits = logits.clone()
    sample(
        gpu_logits,
        temperature=[0.0, 1.0, 0.7, 1.0],
        top_k=[0, 0, 20, 1],
        top_p=[1.0, 0.9, 1.0, 1.0],
        repetition_penalty=penalties,
        histories=histories,
    )
    assert torch.equal(gpu_logits.cpu(), reference)


CUT_CONFIGS = [  # temperature, top_k, top_p
    (1.0, 20, 1.0),
    (0.7, 0, 0.9),
    (1.2, 50, 0.8),
    (1.0, 0, 0.3),
    (2.0, 1000, 0.95),
    (0.5, 3, 0.99),
]


@pytest.mark.parametrize("vocab", [1000, 128256])
@pytest.mark.parametrize("config", CUT_CONFIGS)
def test_draws_stay_in_the_allowed_set(vocab, config):
    temperature, top_k, top_p = config
    rows = 64
    row = random_logits(1, vocab, scale=2.5, seed=vocab + top_k)[0]
    logits = row.expand(rows, vocab).contiguous()
    allowed = allowed_tokens(row, temperature, top_k, top_p, slack=1e-5)
    drawn = set()
    for step in range(8):
        out = sample(logits, temperature, top_k, top_p, seeds=list(range(rows)), steps=step)
        drawn |= set(out.cpu().tolist())
    assert drawn <= allowed, sorted(drawn - allowed)[:10]
    if len(allowed) > 1:
        assert len(drawn) > 1


def test_ties_at_the_threshold_keep_the_lowest_ids():
    vocab = 32000
    generator = torch.Generator().manual_seed(7)
    # bfloat16-rounded logits tie often; a top-k or top-p threshold then splits a tie group.
    row = (torch.randn(vocab, generator=generator) * 2).bfloat16().float()
    logits = row.expand(128, vocab).contiguous().cuda()
    for temperature, top_k, top_p in [
        (1.0, 37, 1.0),
        (1.0, 500, 1.0),
        (1.0, 0, 0.2),
        (0.8, 300, 0.5),
    ]:
        allowed = allowed_tokens(row, temperature, top_k, top_p, slack=1e-5)
        for step in range(4):
            out = sample(logits, temperature, top_k, top_p, seeds=list(range(128)), steps=step)
            assert set(out.cpu().tolist()) <= allowed

    # Every token ties: top-k keeps ids 0..k-1, top-p 0.25 of 8 equal tokens keeps ids 0 and 1.
    flat = torch.zeros(4096, 100, device="cuda")
    assert set(sample(flat, 1.0, 5, 1.0, seeds=list(range(4096))).cpu().tolist()) == set(range(5))
    flat = torch.zeros(4096, 8, device="cuda")
    assert set(sample(flat, 1.0, 0, 0.25, seeds=list(range(4096))).cpu().tolist()) == {0, 1}


DISTRIBUTION_CONFIGS = [  # temperature, top_k, top_p
    (1.0, 0, 1.0),
    (0.7, 0, 0.8),
    (1.3, 5, 1.0),
    (1.0, 6, 0.9),
    (2.0, 0, 0.95),
]


def _assert_matches(draws: torch.Tensor, expected: torch.Tensor):
    counts = torch.bincount(draws.long().cpu(), minlength=expected.numel()).double()
    n = counts.sum()
    assert counts[expected == 0].sum() == 0, "drew a token outside the allowed set"
    total_variation = 0.5 * (counts / n - expected).abs().sum().item()
    assert total_variation < 0.02, total_variation
    support = expected > 0
    chi_square = (((counts - n * expected)[support] ** 2) / (n * expected[support])).sum().item()
    degrees = int(support.sum()) - 1
    # About a one-in-a-million tail for these degrees of freedom; the seeds are fixed anyway.
    assert chi_square < degrees + 7 * (2 * max(degrees, 1)) ** 0.5 + 10, chi_square


@pytest.mark.parametrize("config", DISTRIBUTION_CONFIGS)
def test_distribution_matches_softmax(config):
    temperature, top_k, top_p = config
    vocab, draws = 12, 20000
    row = torch.tensor([2.0, 1.5, 1.4, 0.9, 0.5, 0.3, 0.0, -0.2, -0.5, -1.0, -1.5, -3.0])
    row = row[torch.randperm(vocab, generator=torch.Generator().manual_seed(8))]
    expected = expected_probabilities(row, temperature, top_k, top_p)
    logits = row.expand(draws, vocab).contiguous().cuda()
    # Independent draws by seed (one step), then by step (one seed).
    by_seed = sample(logits, temperature, top_k, top_p, seeds=torch.arange(draws) + 1000, steps=3)
    _assert_matches(by_seed, expected)
    by_step = sample(logits, temperature, top_k, top_p, seeds=12345, steps=torch.arange(draws))
    _assert_matches(by_step, expected)


@pytest.mark.parametrize("config", [(1.0, 0, 1.0), (1.0, 0, 0.75), (0.9, 4, 1.0)])
def test_distribution_across_a_large_vocabulary(config):
    temperature, top_k, top_p = config
    vocab, rows, steps = 128256, 512, 8
    ids = torch.tensor([0, 4095, 4096, 16383, 65535, 65536, 100000, 128255])
    row = torch.full((vocab,), -40.0)  # e^-40: never drawn in practice
    row[ids] = torch.tensor([0.3, 1.0, 0.7, -0.4, 1.2, 0.0, 0.9, 0.5])
    expected = expected_probabilities(row, temperature, top_k, top_p)[ids]
    logits = row.expand(rows, vocab).contiguous().cuda()
    draws = (
        torch.cat(
            [
                sample(logits, temperature, top_k, top_p, seeds=torch.arange(rows) * 7 + 1, steps=s)
                for s in range(steps)
            ]
        )
        .long()
        .cpu()
    )
    assert torch.isin(draws, ids).all()
    positions = torch.searchsorted(ids, draws)
    counts = torch.bincount(positions, minlength=ids.numel()).double()
    total_variation = 0.5 * (counts / counts.sum() - expected).abs().sum().item()
    assert total_variation < 0.05, total_variation


@pytest.mark.parametrize("config", [(1.0, 0, 1.0), (0.8, 0, 0.95), (1.0, 40, 0.9)])
def test_same_seed_and_step_give_the_same_token(config):
    temperature, top_k, top_p = config
    vocab, rows = 32000, 64
    row = random_logits(1, vocab, scale=1.0, seed=9)[0]
    logits = row.expand(rows, vocab).contiguous()
    same = sample(logits, temperature, top_k, top_p, seeds=77, steps=5)
    assert len(set(same.cpu().tolist())) == 1  # every row drew with (77, 5)
    again = sample(logits, temperature, top_k, top_p, seeds=77, steps=5)
    assert torch.equal(same, again)
    by_step = sample(logits, temperature, top_k, top_p, seeds=77, steps=torch.arange(rows))
    by_seed = sample(logits, temperature, top_k, top_p, seeds=torch.arange(rows), steps=5)
    # Flat logits over 32000 tokens, 40 kept at least: 64 draws give ~30 distinct ids or more.
    assert len(set(by_step.cpu().tolist())) > rows // 4
    assert len(set(by_seed.cpu().tolist())) > rows // 4
    assert by_step[5] == same[0]


def test_mixed_batch_in_one_call():
    vocab = 32000
    configs = [  # temperature, top_k, top_p
        (0.0, 0, 1.0),
        (1.0, 1, 1.0),
        (0.8, 0, 1.0),
        (1.0, 20, 1.0),
        (0.7, 0, 0.9),
        (1.2, 50, 0.8),
        (1e-45, 0, 0.9),
        (0.0, 10, 0.5),
    ]
    rows = len(configs)
    logits = random_logits(rows, vocab, scale=3.0, seed=10)
    temperature, top_k, top_p = (list(c) for c in zip(*configs, strict=True))
    argmax = torch.argmax(logits, -1).cpu().tolist()
    for step in range(20):
        out = sample(logits, temperature, top_k, top_p, seeds=list(range(rows)), steps=step)
        out = out.cpu().tolist()
        for row, (t, k, p) in enumerate(configs):
            if t < 1e-30 or k == 1:  # greedy, top-k 1, and a temperature whose inverse is inf
                assert out[row] == argmax[row]
            else:
                assert out[row] in allowed_tokens(logits[row], t, k, p, slack=1e-5)


def test_graph_replay_moves_the_steps():
    rows, vocab = 4, 50000
    logits = random_logits(rows, vocab, scale=1.0, seed=11)
    configs = dict(
        temperature=[0.0, 1.0, 0.8, 1.0],
        top_k=[0, 0, 0, 40],
        top_p=[1.0, 1.0, 0.9, 0.8],
        repetition_penalty=[1.0] * rows,
        seeds=[1, 2, 3, 4],
    )
    eager = [sample(logits, steps=step, **configs).cpu() for step in range(6)]

    # Everything the captured call reads is on the device before the capture: no copies in it.
    steps = torch.zeros(rows, dtype=torch.int64, device="cuda")
    workspace = torch.empty(
        _C.cuda_sampling_workspace_bytes(rows, vocab), dtype=torch.uint8, device="cuda"
    )
    dtypes = dict(top_k=torch.int32, seeds=torch.int64)
    tensors = {
        name: _per_row(value, rows, dtypes.get(name, torch.float32))
        for name, value in configs.items()
    }
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(logits, steps=steps, advance_steps=True, workspace=workspace, **tensors)
    replayed = []
    for _ in range(6):
        graph.replay()
        replayed.append(out.cpu())
    assert steps.cpu().tolist() == [6] * rows
    for step in range(6):
        assert torch.equal(replayed[step], eager[step])
    assert len({tuple(r.tolist()) for r in replayed}) > 1


def test_binding_rejects_bad_counts():
    args = dict(
        temperature=0,
        top_k=0,
        top_p=0,
        repetition_penalty=0,
        history=0,
        history_offsets=0,
        seeds=0,
        steps=0,
        out_ids=0,
    )
    with pytest.raises(ValueError):
        _C.cuda_sample(0, -1, 10, **args)
    with pytest.raises(ValueError):
        _C.cuda_sample(0, 1, -5, **args)
    with pytest.raises(ValueError):
        _C.cuda_sample(0, 1, 0, **args)
    with pytest.raises(ValueError):
        _C.cuda_sample(0, 1, (1 << 20) + 1, **args)
    with pytest.raises(ValueError):  # a stride shorter than a row
        _C.cuda_sample(0, 1, 10, **args, logits_row_stride=5)
    _C.cuda_sample(0, 0, 10, **args)  # no rows: nothing to do
    logits = torch.zeros(2, 10, device="cuda")
    out = torch.empty(2, dtype=torch.int32, device="cuda")
    small = torch.empty(1, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError):
        _C.cuda_sample(
            logits.data_ptr(),
            2,
            10,
            **{**args, "out_ids": out.data_ptr()},
            workspace=small.data_ptr(),
            workspace_bytes=1,
        )
