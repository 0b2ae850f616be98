"""top_k, repetition_penalty and stop strings mean what they mean in HF transformers' ``generate``.

float32 on the CPU. Greedy decoding with a repetition penalty, and with stop strings, must give
HF's very tokens. Sampling cannot give HF's tokens (HF draws from one generator for the whole
batch, FlexGen from one stream per prompt), so top-k is held to HF in the two ways that do not
depend on the draw: top_k=1 samples HF's greedy tokens, and every token sampled with top_k=k is
one that HF's ``generate`` with the same settings keeps (a finite score) after the same prefix.
Each output also says why it ended (``"stop"`` or ``"length"``).
"""

from __future__ import annotations

import pytest
import torch

from flexgen import Policy, load_engine
from flexgen.errors import PromptError
from flexgen.models.quickstart import resolve_builtin

PROMPTS = [[2, 15, 16, 17, 18, 19], [2, 40, 41], [2, 7, 8, 9, 10, 11, 12, 13, 14], [2, 99], [2, 50, 51, 52, 53]]
NEW_TOKENS = 12


def hf_generate(model, prompt: list[int], **settings) -> tuple[list[int], dict]:
    """HF's ``generate`` on one prompt (no padding), end-of-sequence off: (new tokens, the raw output)."""
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 pad_token_id=1, return_dict_in_generate=True, output_scores=True, **settings)
    finally:
        model.generation_config.eos_token_id = eos
    return out.sequences[0, len(prompt):].tolist(), out


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    """Blocks of 2 x 2: the prompts are padded to their block's longest, as in any real run."""
    path, _ = tiny_checkpoint
    with load_engine(path, policy=Policy(gpu_batch_size=2, num_gpu_batches=2), device="cpu", dtype="float32",
                     offload_dir=tmp_path_factory.mktemp("offload")) as engine:
        yield engine


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_greedy_with_repetition_penalty_equals_hf(engine, tiny_checkpoint, penalty):
    _, model = tiny_checkpoint
    expected = [hf_generate(model, p, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=penalty)[0]
                for p in PROMPTS]
    assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, repetition_penalty=penalty) == expected
    plain = [hf_generate(model, p, max_new_tokens=NEW_TOKENS, do_sample=False)[0] for p in PROMPTS]
    assert expected != plain, "the penalty should change some tokens, or this test checks nothing"


def test_top_k_one_samples_hf_greedy_tokens(engine, tiny_checkpoint):
    _, model = tiny_checkpoint
    expected = [hf_generate(model, p, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1)[0] for p in PROMPTS]
    assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1, temperature=1.7,
                           seed=3) == expected


def test_top_k_samples_only_tokens_hf_keeps(engine, tiny_checkpoint):
    _, model = tiny_checkpoint
    settings = dict(do_sample=True, top_k=3, temperature=1.5, top_p=0.9, repetition_penalty=1.2)
    sampled = engine.generate(PROMPTS, max_new_tokens=8, seed=5, **settings)
    outside_top_3 = 0
    for prompt, tokens in zip(PROMPTS, sampled):
        for i, token in enumerate(tokens):
            _, out = hf_generate(model, prompt + tokens[:i], max_new_tokens=1, **settings)
            scores = out.scores[0][0]
            assert torch.isfinite(scores[token]), f"HF's generate would never pick {token} after {prompt + tokens[:i]}"
            assert int(torch.isfinite(scores).sum()) <= 3
        plain = engine.generate([prompt], max_new_tokens=8, seed=5, do_sample=True, temperature=1.5)[0]
        outside_top_3 += sum(1 for i, t in enumerate(plain)
                             if not torch.isfinite(hf_generate(model, prompt + plain[:i], max_new_tokens=1,
                                                               **settings)[1].scores[0][0][t]))
    assert outside_top_3 > 0, "without top_k some sampled token should fall outside the top 3, or this checks nothing"


def test_stop_token_finish_reasons(engine):
    full = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    # a token some prompt emits first at a later step, so that its output is cut there
    row, step = next((r, i) for r, out in enumerate(full) for i in range(2, NEW_TOKENS) if out[i] not in out[:i])
    stop = full[row][step]
    outputs, reasons = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop=stop, return_finish_reasons=True)
    for out_full, out, reason in zip(full, outputs, reasons):
        if stop in out_full:
            assert (out, reason) == (out_full[: out_full.index(stop) + 1], "stop")
        else:
            assert (out, reason) == (out_full, "length")
    assert reasons[row] == "stop" and len(outputs[row]) == step + 1
    # a stop token that is the very last token allowed still ends the sequence by "stop", as in vLLM
    last = engine.generate([PROMPTS[row]], max_new_tokens=step + 1, stop=stop, return_finish_reasons=True)
    assert last == ([full[row][: step + 1]], ["stop"])


def test_text_prompts_are_refused_with_a_pointer_to_the_batch_api(engine):
    with pytest.raises(PromptError, match="token ids.*flexgen.batch_generate"):
        engine.generate(["The policy says"], max_new_tokens=2)


# --------------------------------------------------------------------------- stop strings (a real tokenizer)


@pytest.fixture(scope="module")
def quickstart(quickstart_cache, tmp_path_factory):
    """(engine, HF model, tokenizer) of the quickstart checkpoint: a byte-level BPE tokenizer, readable text."""
    from transformers import AutoTokenizer, OPTForCausalLM

    folder = resolve_builtin("quickstart", quickstart_cache)
    model = OPTForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with load_engine(folder, policy=Policy(gpu_batch_size=2, num_gpu_batches=2), device="cpu", dtype="float32",
                     offload_dir=tmp_path_factory.mktemp("offload")) as engine:
        yield engine, model, tokenizer


def test_stop_strings_equal_hf(quickstart):
    engine, model, tokenizer = quickstart
    texts = ["The policy says", "FlexGen keeps", "Each block of", "A weight on disk"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    new_tokens = 24
    free = engine.generate(prompts, max_new_tokens=new_tokens)
    # Stop strings the model does write: three characters from the middle of the first two
    # continuations (so they may end inside a token), and one it never writes.
    written = [tokenizer.decode(free[i]) for i in range(2)]
    stops = [written[0][10:13], written[1][12:15], "@@@"]
    expected = [hf_generate(model, p, max_new_tokens=new_tokens, do_sample=False, stop_strings=stops,
                            tokenizer=tokenizer)[0] for p in prompts]
    outputs, reasons = engine.generate(prompts, max_new_tokens=new_tokens, stop_strings=stops, tokenizer=tokenizer,
                                       return_finish_reasons=True)
    assert outputs == expected
    assert reasons[:2] == ["stop", "stop"] and len(outputs[0]) < new_tokens
    assert reasons == ["stop" if len(o) < new_tokens or any(s in tokenizer.decode(o) for s in stops) else "length"
                       for o in outputs]
    with pytest.raises(PromptError, match="tokenizer"):
        engine.generate(prompts, max_new_tokens=2, stop_strings=stops)
