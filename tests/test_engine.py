"""The LLM engine on the tiny preset: continuous batching keeps every request's answer its own."""

import numpy as np
import pytest
import torch

from omnistage.actors.errors import InvalidInputError, OverloadedError
from omnistage.actors.payloads import Embeddings, LLMRequest
from omnistage.cluster.config import EngineConfig, LLMConfig

RNG = np.random.default_rng(0)


def _user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def llm(tiny_preset):
    from omnistage.actors.llm import LLM

    return LLM(LLMConfig())


@pytest.fixture
def engine(llm):
    """A fresh engine over the module's model, with bounds set per test."""
    from omnistage.actors.engine import Engine

    def make(**bounds):
        return Engine(llm, EngineConfig(**bounds))

    return make


def _drive(engine, arrivals, max_steps=2000):
    """Step ``engine``, adding ``arrivals[k]`` (a list of (id, request)) before step k. Returns each
    request's result and the step at which it finished."""
    results, finished = {}, {}
    for step in range(max_steps):
        for rid, request in arrivals.get(step, []):
            engine.add(rid, request)
        if step > max(arrivals) and not engine.has_work():
            return results, finished
        for out in engine.step():
            if out.result is not None:
                results[out.request_id], finished[out.request_id] = out.result, step
    raise AssertionError(f"not done after {max_steps} steps")


def _requests():
    image = Embeddings("image", RNG.standard_normal((7, 32)).astype(np.float32))
    return {
        "plain": LLMRequest(messages=_user("hello there"), max_tokens=20),
        "image": LLMRequest(messages=_user("what is <image> this?"), media=[image], max_tokens=15),
        "forced": LLMRequest(messages=_user("draw"), max_tokens=5, force_modalities=["image", "audio"]),
        "sampled": LLMRequest(messages=_user("tell me"), max_tokens=25, temperature=0.8, top_p=0.9, seed=11),
        "long": LLMRequest(messages=_user("a longer prompt " * 12), max_tokens=30),
    }


def test_greedy_output_equals_transformers_generate_under_continuous_arrival(llm, engine):
    requests = {k: v for k, v in _requests().items() if k in ("plain", "image", "long")}
    # Admitted one after another while the others decode, so each joins a batch mid-way.
    results, _ = _drive(engine(), {0: [("long", requests["long"])], 3: [("plain", requests["plain"])], 7: [("image", requests["image"])]})
    for rid, request in requests.items():
        embeds = llm.embed_prompt(request)[None]
        with torch.no_grad():
            expected = llm.model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                max_new_tokens=request.max_tokens,
                do_sample=False,
                suppress_tokens=llm.banned.tolist(),
                eos_token_id=sorted(llm.eos_ids),
                pad_token_id=llm.pad_id,
            )[0].tolist()
        expected = [t for t in expected if t not in llm.eos_ids]
        assert results[rid].token_ids == expected, rid


def test_every_request_decodes_as_it_would_alone(llm, engine):
    requests = _requests()
    alone = {rid: engine().generate([request])[0] for rid, request in requests.items()}
    arrivals = {
        0: [("long", requests["long"]), ("sampled", requests["sampled"])],
        2: [("forced", requests["forced"])],
        4: [("image", requests["image"]), ("plain", requests["plain"])],
    }
    crowd, _ = _drive(engine(max_running_seqs=4), arrivals)
    for rid, result in alone.items():
        assert crowd[rid].token_ids == result.token_ids, rid  # the seeded sample too: its own generator
        assert crowd[rid].text == result.text and crowd[rid].finish_reason == result.finish_reason
        assert [s.modality for s in crowd[rid].signals] == [s.modality for s in result.signals]
        for a, b in zip(crowd[rid].signals, result.signals):
            np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-4)
    assert [(s.modality, s.hidden.shape) for s in crowd["forced"].signals] == [("image", (4, 32)), ("audio", (8, 32))]


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    def sampled(seed):
        return LLMRequest(messages=_user("tell me"), max_tokens=30, temperature=1.0, seed=seed)

    alone = engine().generate([sampled(5)])[0].token_ids
    crowd = engine().generate([sampled(7), LLMRequest(messages=_user("x" * 40), max_tokens=8), sampled(5), sampled(9)])
    assert crowd[2].token_ids == alone
    assert crowd[0].token_ids != alone  # another seed, another sample


def test_a_short_request_finishes_while_long_ones_still_decode(engine):
    long = LLMRequest(messages=_user("go on"), max_tokens=200)
    # The tiny model may stop early by itself; a stop string it cannot produce is not needed:
    # max_tokens bounds the short one, and the long ones run to their 200.
    short = LLMRequest(messages=_user("hi"), max_tokens=4)
    results, finished = _drive(engine(), {0: [(f"long{i}", long) for i in range(3)], 10: [("short", short)]})
    long_done = [finished[f"long{i}"] for i in range(3) if results[f"long{i}"].finish_reason == "length"]
    assert long_done, "the long requests all stopped early; pick another prompt"
    assert finished["short"] <= 10 + 4 < min(long_done)


def test_the_kv_bound_makes_admission_wait(llm, engine):
    request = LLMRequest(messages=_user("count"), max_tokens=20)
    prompt = llm.prepare(request)[1]
    bound = 2 * (prompt + 20)  # room for two such sequences at once
    e = engine(max_kv_tokens=bound)
    for i in range(5):
        e.add(str(i), request)
    seen_waiting, results = False, {}
    while e.has_work():
        for out in e.step():
            if out.result is not None:
                results[out.request_id] = out.result
        assert e.kv_tokens <= bound and e.num_running <= 2
        seen_waiting |= e.num_waiting > 0 and e.num_running == 2
    assert seen_waiting and sorted(results) == ["0", "1", "2", "3", "4"]
    alone = engine().generate([request])[0].token_ids
    assert all(r.token_ids == alone for r in results.values())


def test_requests_beyond_the_bounds_are_refused_clearly(llm, engine):
    with pytest.raises(InvalidInputError, match=r"KV cache of 100 tokens"):
        engine(max_kv_tokens=100).add("big", LLMRequest(messages=_user("x" * 60), max_tokens=50))
    full = engine(max_waiting=1)
    full.add("a", LLMRequest(messages=_user("a")))
    with pytest.raises(OverloadedError, match="waiting queue is full"):
        full.add("b", LLMRequest(messages=_user("b")))
    assert full.num_waiting == 1


def test_cancelling_frees_the_slot(engine):
    e = engine(max_running_seqs=1)
    e.add("first", LLMRequest(messages=_user("go on"), max_tokens=200))
    e.add("second", LLMRequest(messages=_user("hi"), max_tokens=3))
    e.step()
    assert (e.num_running, e.num_waiting) == (1, 1)
    e.abort("first")
    outputs = []
    while e.has_work():
        outputs += e.step()
    assert [o.request_id for o in outputs if o.result is not None] == ["second"]
    assert all(o.request_id == "second" for o in outputs)


def test_a_long_prompt_is_prefilled_in_chunks_without_stalling_the_others(llm, engine):
    long = LLMRequest(messages=_user("a long prompt to read in pieces " * 8), max_tokens=6)
    running = LLMRequest(messages=_user("hi"), max_tokens=40)
    chunk = 64
    assert llm.prepare(long)[1] > 3 * chunk
    e = engine(max_prefill_tokens=chunk)
    e.add("running", running)
    e.step()
    e.add("long", long)
    decoding, results, chunk_steps = e.sequences["running"], {}, 0
    while e.has_work():
        before, prefilling = len(decoding.token_ids), e.sequences.get("long") is not None and e.sequences["long"].prefilled < e.sequences["long"].prompt_len
        outputs = e.step()
        results.update({o.request_id: o.result for o in outputs if o.result is not None})
        if prefilling and not decoding.done:
            chunk_steps += 1
            assert len(decoding.token_ids) == before + 1  # the running one kept its token a step
            assert e.sequences["long"].prefilled <= chunk * chunk_steps
    assert chunk_steps >= 3
    whole = engine().generate([long, running])
    assert results["long"].token_ids == whole[0].token_ids and results["running"].token_ids == whole[1].token_ids


def test_incremental_detokenisation_equals_decoding_the_whole_text(llm):
    from omnistage.actors.engine import TextStream

    text = "héllo wörld ✓ 日本"  # multi-byte characters arrive one byte token at a time
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(llm.tokenizer, stop=[])
    pieces = []
    for token in ids:
        stream.decode_ids.append(token)
        before = len(stream.text)
        stream.update()
        pieces.append(stream.text[before:])
    assert "".join(pieces) == stream.text == text
    assert "\ufffd" not in "".join(pieces)


def test_encoder_decoder_backbone_batches_continuously(tmp_path, engine):
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    from omnistage.actors.engine import Engine
    from omnistage.actors.llm import LLM
    from omnistage.actors.payloads import PLACEHOLDERS, signal_token_names

    tokenizer = ByT5Tokenizer()
    tokenizer.add_tokens([PLACEHOLDERS["image"], *signal_token_names("image", 4)], special_tokens=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    t5 = LLM(LLMConfig(model=str(tmp_path / "t5"), signal_tokens={"image": 4}))
    media = [Embeddings("image", RNG.standard_normal((5, 32)).astype(np.float32))]
    requests = {
        "a": LLMRequest(messages=_user("Hi there"), max_tokens=12),
        "b": LLMRequest(messages=_user("<image> a much longer prompt than the first"), media=media, max_tokens=6, force_modalities=["image"]),
        "c": LLMRequest(messages=_user("third"), max_tokens=9),
    }
    alone = {rid: t5([r])[0] for rid, r in requests.items()}
    crowd, _ = _drive(Engine(t5, EngineConfig()), {0: [("a", requests["a"])], 2: [("b", requests["b"])], 5: [("c", requests["c"])]})
    for rid, result in alone.items():
        assert crowd[rid].token_ids == result.token_ids, rid
    np.testing.assert_allclose(crowd["b"].signals[0].hidden, alone["b"].signals[0].hidden, atol=1e-4)
    ids = t5.prompt_ids(requests["a"])
    with torch.no_grad():
        expected = t5.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, suppress_tokens=t5.banned.tolist())[0, 1:].tolist()
    assert crowd["a"].token_ids == [t for t in expected if t != tokenizer.eos_token_id]
