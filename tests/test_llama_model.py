"""Whole-model tests against transformers: logits and greedy continuations of tiny random
Llama variants, through the Engine API and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import ftengine
import numpy as np
import pytest
import torch
from ftengine import Engine, SamplingParams
from model_fixtures import VARIANTS

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and keeps running",
    "数字 12345 and more text",
]


def reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def reference_greedy(model, ids, new_tokens):
    model.generation_config.eos_token_id = None  # compare full continuations
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def assert_logits_close(ours, reference):
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-5 * max(scale, 1.0))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tiny_llama, variant):
    directory, model = tiny_llama(variant)
    engine = Engine.from_pretrained(directory, progress=False)
    ids = engine.tokenizer.encode(PROMPTS[1]) + list(range(3, 60))
    assert_logits_close(engine.logits(ids), reference_logits(model, ids))


@pytest.mark.parametrize("tokenizer_kind",
                         ["sentencepiece", "sentencepiece_json", "byte_level_bpe"])
def test_greedy_batch_matches_transformers(tiny_llama, tokenizer_kind):
    directory, model = tiny_llama("gqa", tokenizer_kind)
    engine = Engine.from_pretrained(directory, progress=False)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    outputs = engine.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = engine.tokenizer.encode(prompt)
        assert output.prompt_token_ids == ids
        assert output.token_ids == reference_greedy(model, ids, 24), prompt
        assert output.finish_reason == "length"
        assert output.text == engine.tokenizer.decode(output.token_ids)


def test_chunked_prefill_and_decode_logits(tiny_llama):
    """Prompts prefilled 5 tokens a step, then decoded: every position's logits still match."""
    directory, model = tiny_llama("llama3_rope")
    engine = Engine.from_pretrained(directory, progress=False, max_batch_tokens=5, block_size=16,
                                    max_num_seqs=4)
    ids = list(range(3, 100))
    assert_logits_close(engine.logits(ids), reference_logits(model, ids))
    output = engine.generate([ids], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
    assert output.token_ids == reference_greedy(model, ids, 30)


def test_bfloat16_checkpoint(tiny_llama):
    directory, _ = tiny_llama("gqa", dtype=torch.bfloat16)
    engine = Engine.from_pretrained(directory, progress=False)
    assert engine.dtype == "bfloat16"
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = list(range(3, 50))
    assert_logits_close(engine.logits(ids), reference_logits(reference, ids))
    widened = Engine.from_pretrained(directory, dtype="float32", progress=False)
    np.testing.assert_allclose(widened.logits(ids), engine.logits(ids), atol=1e-5)


def test_streaming_equals_generate(tiny_llama):
    directory, _ = tiny_llama("mha", "byte_level_bpe")
    engine = Engine.from_pretrained(directory, progress=False)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    outputs = engine.generate(PROMPTS, params)
    texts, tokens, finishes = [""] * 3, [[], [], []], [None] * 3
    for event in engine.stream(PROMPTS, params):
        texts[event.index] += event.text
        tokens[event.index].append(event.token_id)
        if event.finish_reason:
            finishes[event.index] = event.finish_reason
    assert texts == [o.text for o in outputs]
    assert tokens == [o.token_ids for o in outputs]
    assert finishes == ["length"] * 3


def test_sampling_is_seeded(tiny_llama):
    directory, _ = tiny_llama("gqa")
    engine = Engine.from_pretrained(directory, progress=False)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=7,
                            ignore_eos=True)
    first = engine.generate(PROMPTS[0], params).token_ids
    assert engine.generate(PROMPTS[0], params).token_ids == first
    others = {tuple(engine.generate(PROMPTS[0], SamplingParams(
        max_new_tokens=16, temperature=1.5, seed=seed, ignore_eos=True)).token_ids)
        for seed in range(5)}
    assert len(others) > 1
    greedy = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=16, ignore_eos=True))
    top1 = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=16, temperature=0.7,
                                                      top_k=1, seed=3, ignore_eos=True))
    assert top1.token_ids == greedy.token_ids


def test_repetition_penalty_matches_transformers(tiny_llama):
    directory, model = tiny_llama("gqa")
    engine = Engine.from_pretrained(directory, progress=False)
    ids = engine.tokenizer.encode(PROMPTS[1])
    ours = engine.generate([ids], SamplingParams(max_new_tokens=20, repetition_penalty=1.3,
                                                 ignore_eos=True))[0]
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                             repetition_penalty=1.3, pad_token_id=0,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert ours.token_ids == out[0, len(ids):].tolist()


def test_stop_strings_and_stop_tokens(tiny_llama):
    directory, _ = tiny_llama("gqa")
    engine = Engine.from_pretrained(directory, progress=False)
    full = engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=24, ignore_eos=True,
                                                     stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    token = full.token_ids[5]
    stopped = engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=24, ignore_eos=True,
                                                         stop_token_ids=[token]))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(token) + 1]


def test_chat_template_prompt(tiny_llama):
    directory, _ = tiny_llama("gqa", "byte_level_bpe")
    engine = Engine.from_pretrained(directory, progress=False)
    messages = [{"role": "user", "content": "Hi there"}]
    rendered = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = engine.tokenizer.encode(rendered, add_special_tokens=False)
    assert engine.chat_prompt(messages) == expected
    reply = engine.chat(messages, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert len(reply.token_ids) == 6


def test_cli_matches_engine(tiny_llama):
    directory, _ = tiny_llama("gqa")
    engine = Engine.from_pretrained(directory, progress=False)
    expected = engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=12)).text
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(ftengine.__path__ and
                                                      [os.path.dirname(ftengine.__path__[0])]))
    result = subprocess.run(
        [sys.executable, "-m", "ftengine.generate", "--model", str(directory), "--prompt",
         PROMPTS[1], "--max-new-tokens", "12", "--quiet"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_stop_string_across_tokens_is_cut_whole(tiny_llama):
    directory, _ = tiny_llama("gqa", "byte_level_bpe")
    engine = Engine.from_pretrained(directory, progress=False)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    full = engine.generate(PROMPTS[1], params)
    pieces = [engine.tokenizer.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    # A stop string made of the end of one token's text and the start of the next one's.
    boundary = next(i for i in range(3, len(pieces) - 1)
                    if len(pieces[i]) > len(pieces[i - 1]) and len(pieces[i + 1]) > len(pieces[i]))
    stop = pieces[boundary][-1] + pieces[boundary + 1][len(pieces[boundary])]
    expected = full.text[: full.text.find(stop)]
    stopped = SamplingParams(max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert engine.generate(PROMPTS[1], stopped).text == expected
    streamed = "".join(event.text for event in engine.stream(PROMPTS[1], stopped))
    assert streamed == expected


def test_one_generation_at_a_time(tiny_llama):
    import threading

    directory, _ = tiny_llama("gqa")
    engine = Engine.from_pretrained(directory, progress=False)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    expected = engine.generate(PROMPTS[0], params).token_ids
    first = engine.stream(PROMPTS[0], params)
    next(first)
    with pytest.raises(ftengine.FtengineError, match="already generating"):
        next(engine.stream(PROMPTS[1], params))
    first.close()
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        engine.generate(PROMPTS[0], params).token_ids)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 3
