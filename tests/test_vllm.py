"""The LLM pool on vLLM (``engine.backend: vllm``): the built-in engine's greedy answers, which are
transformers' ``generate``'s, the same signal-token states, refusals at load, and through the Serve
app a LLaVA-layout checkpoint split across pools and a Qwen2 LLM pool.

vLLM lives in its own environment (``make vllm-env`` builds .venv-vllm; this one has no vLLM), so
the in-process cases run in one worker process under that interpreter (tests/vllm_worker.py),
started once for the module; the references come from this environment. Without .venv-vllm these
tests fail under ``make test``, which builds it and sets OMNISTAGE_REQUIRE_VLLM=1, and skip,
saying so, when this file is run on its own.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omnistage.actors.payloads import Embeddings, LLMRequest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# vLLM's CPU attention takes head sizes from 32 up; the tiny preset's is 8.
HEAD_64 = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
# A small KV cache of a fixed size: on the CPU build gpu_memory_utilization is the share of host
# memory the whole process may hold, which a second engine in one process already exceeds.
VLLM_ENGINE = {
    "backend": "vllm",
    "vllm": {"max_model_len": 512, "kv_cache_memory_bytes": 64 * 2**20, "max_num_seqs": 8, "python": str(VLLM_PYTHON)},
}
# Signal-token states of the two engines agree to float32 rounding (measured: about 1e-6).
STATE_ATOL = 1e-4
FAMILIES = ("llama", "qwen2")


def _user(text):
    return [{"role": "user", "content": text}]


def _require_vllm_env():
    if VLLM_PYTHON.exists():
        return
    message = f"{VLLM_PYTHON} is missing: `make vllm-env` builds the vLLM pool's environment"
    if os.environ.get("OMNISTAGE_REQUIRE_VLLM") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from omnistage.actors.tiny import build_blip2, build_llm

    root = tmp_path_factory.mktemp("vllm")
    for family in FAMILIES:
        build_llm(root / family, seed=0, family=family, **HEAD_64)
    build_llm(root / "head8", seed=0)  # the tiny preset's sizes
    build_blip2(root / "blip2-t5", seed=0, language="t5")
    return root


def _requests(stop: str) -> dict[str, LLMRequest]:
    rng = np.random.default_rng(0)
    image = Embeddings("image", rng.standard_normal((7, HEAD_64["hidden_size"])).astype(np.float32))
    return {
        "plain": LLMRequest(messages=_user("hello there"), max_tokens=20),
        "image": LLMRequest(messages=_user("what is <image> this?"), media=[image], max_tokens=15),
        "long": LLMRequest(messages=_user("a longer prompt " * 12), max_tokens=30),
        "forced": LLMRequest(messages=_user("draw"), max_tokens=5, force_modalities=["image", "audio"]),
        "stopped": LLMRequest(messages=_user("hello there"), max_tokens=30, stop=[stop], force_modalities=["image"]),
        "sampled": LLMRequest(messages=_user("tell me"), max_tokens=25, temperature=0.8, top_p=0.9, seed=11),
    }


def _stop_string(text: str) -> str:
    """Two characters of a greedy answer, nearest its middle, neither a replacement character (the
    stream holds those back until the answer ends, so no stop string is found in them before)."""
    middle = len(text) // 2
    pairs = [text[i : i + 2] for i in sorted(range(len(text) - 1), key=lambda i: abs(i - middle))]
    return next(pair for pair in pairs if "\ufffd" not in pair)


@pytest.fixture(scope="module")
def builtin(checkpoints):
    """Per family: the built-in engine's stage and its results (this environment)."""
    from omnistage.actors.llm import LLM
    from omnistage.cluster.config import LLMConfig

    out = {}
    for family in FAMILIES:
        llm = LLM(LLMConfig(model=str(checkpoints / family)))
        text = llm([LLMRequest(messages=_user("hello there"), max_tokens=30)])[0].text
        requests = _requests(stop=_stop_string(text))
        out[family] = (llm, requests, dict(zip(requests, llm(list(requests.values())))))
    return out


@pytest.fixture(scope="module")
def on_vllm(checkpoints, builtin, tmp_path_factory):
    """What the vLLM worker gave per case (see tests/vllm_worker.py), one process for the module."""
    _require_vllm_env()
    work = tmp_path_factory.mktemp("vllm-job")
    job = {family: {"config": {"model": str(checkpoints / family), "engine": VLLM_ENGINE},
                    "requests": list(builtin[family][1].values())} for family in FAMILIES}
    for name in ("head8", "blip2-t5"):
        job[name] = {"config": {"model": str(checkpoints / name), "engine": VLLM_ENGINE}, "requests": []}
    (work / "job.pkl").write_bytes(pickle.dumps(job))
    run = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_worker.py"), str(work / "job.pkl"), str(work / "out.pkl")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-6000:]
    report = pickle.loads((work / "out.pkl").read_bytes())
    for name, case in report.items():
        if "load_s" in case:
            print(f"vllm {name}: load {case['load_s']:.1f} s, generate {case['generate_s']:.1f} s", file=sys.stderr)
    return report


def _results(on_vllm, family):
    case = on_vllm[family]
    assert "results" in case, f"the vLLM stage for {family} did not load: {case.get('refused')}"
    return case["results"]


def _generate(llm, request):
    """Greedy token ids from transformers' generate, with the engine's bans and end of sequence."""
    embeds = llm.embed_prompt(request)[None]
    with torch.no_grad():
        ids = llm.model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=request.max_tokens, do_sample=False, suppress_tokens=llm.banned.tolist(),
            eos_token_id=sorted(llm.eos_ids), pad_token_id=llm.pad_id,
        )[0].tolist()
    return [t for t in ids if t not in llm.eos_ids]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_answers_equal_the_builtin_engine_and_transformers_generate(family, builtin, on_vllm):
    llm, requests, expected = builtin[family]
    got = dict(zip(requests, _results(on_vllm, family)))
    for rid in ("plain", "image", "long", "forced", "stopped"):
        assert got[rid].token_ids == expected[rid].token_ids, rid
        assert (got[rid].text, got[rid].finish_reason, got[rid].prompt_tokens) == (
            expected[rid].text, expected[rid].finish_reason, expected[rid].prompt_tokens), rid
    for rid in ("plain", "image", "long"):
        assert got[rid].token_ids == _generate(llm, requests[rid]), rid


@pytest.mark.parametrize("family", FAMILIES)
def test_signal_groups_are_forced_and_their_states_match_the_builtin_engine(family, builtin, on_vllm):
    llm, requests, expected = builtin[family]
    got = dict(zip(requests, _results(on_vllm, family)))
    # The stop string ends the text part way; the forced group still follows it.
    stopped = expected["stopped"]
    text_tokens = [t for t in stopped.token_ids if t not in llm.signal_modality]
    assert stopped.finish_reason == "stop" and len(text_tokens) < requests["stopped"].max_tokens
    worst = 0.0
    for rid, modalities in (("forced", ["image", "audio"]), ("stopped", ["image"])):
        assert [s.modality for s in got[rid].signals] == [s.modality for s in expected[rid].signals] == modalities
        for a, b in zip(got[rid].signals, expected[rid].signals):
            assert a.hidden.shape == b.hidden.shape == (len(llm.groups[a.modality]), HEAD_64["hidden_size"])
            np.testing.assert_allclose(a.hidden, b.hidden, atol=STATE_ATOL)
            worst = max(worst, float(np.abs(a.hidden - b.hidden).max()))
        group = got[rid].token_ids[-len(llm.groups[modalities[-1]]) :]
        assert group == llm.groups[modalities[-1]]
    print(f"{family}: signal states, largest difference from the built-in engine's {worst:.2e}", file=sys.stderr)


def test_streaming_abort_and_seeded_sampling(builtin, on_vllm):
    _, requests, _ = builtin["llama"]
    case = on_vllm["llama"]
    results = dict(zip(requests, _results(on_vllm, "llama")))
    streamed = dict(zip(requests, case["streamed"]["deltas"]))
    # Deltas join to the final text (the stop string held back, then cut), the aborted request gave
    # no result, and a seeded sample is the same alone and in another batch.
    assert streamed == {rid: r.text for rid, r in results.items()}
    assert case["streamed"]["finished"] == sorted(str(i) for i in range(len(requests)))
    assert results["sampled"].finish_reason == "length" and results["sampled"].completion_tokens >= 25


def test_what_vllm_cannot_serve_is_refused_at_load(on_vllm):
    head = on_vllm["head8"]["refused"]
    assert "expected a head size in [32, 64" in head and "got 8 (hidden_size 32 / 4 heads)" in head
    encoder_decoder = on_vllm["blip2-t5"]["refused"]
    assert "expected a decoder-only language model" in encoder_decoder and "encoder-decoder T5ForConditionalGeneration" in encoder_decoder


def test_the_vllm_pool_runs_under_its_own_interpreter():
    from omnistage.cluster.config import LLMConfig, OmnistageConfig, load_config
    from omnistage.pipelines.batch import caption
    from omnistage.pipelines.serve import deployment_options
    from omnistage.pipelines.serve_config import config_from_serve_config, export_serve_config

    data = load_config("tiny").model_dump()
    data["stages"]["llm"]["engine"] = VLLM_ENGINE
    config = OmnistageConfig.model_validate(data)
    options = deployment_options(config.stages.llm, "llm")
    assert options["ray_actor_options"]["runtime_env"] == {"py_executable": str(VLLM_PYTHON)}
    assert "runtime_env" not in deployment_options(config.stages.input_projector, "input_projector")["ray_actor_options"]
    # Ray's own schema takes the export, and the pool's interpreter comes back from args.config.
    assert config_from_serve_config(export_serve_config(config)) == config
    # Batch jobs' actor pools run in this environment: they refuse the vLLM backend, saying so.
    with pytest.raises(ValueError, match="expected stages.llm.engine.backend builtin .* got vllm"):
        caption("unused.parquet", config=config)
    with pytest.raises(ValueError, match=r"\['max_running_seqs'\] bound the built-in engine; with backend vllm set engine.vllm"):
        LLMConfig(engine={"backend": "vllm", "max_running_seqs": 4})
    with pytest.raises(ValueError, match=r"must be at least engine.vllm.max_num_seqs \(32\)"):
        LLMConfig(engine={"backend": "vllm"}, queue={"max_ongoing_requests": 8})


@pytest.fixture(scope="module")
def llava_head64(tmp_path_factory):
    from omnistage.actors.tiny import build_llava

    return build_llava(tmp_path_factory.mktemp("llava64") / "tiny-llava-64", seed=0, **HEAD_64)


@pytest.mark.slow
def test_llava_split_across_pools_on_vllm_matches_transformers_generate(ray_session, llava_head64):
    from test_models import _check_through_serve

    _require_vllm_env()
    _check_through_serve(llava_head64, "vllm-llava", n_image_tokens=225, engine=VLLM_ENGINE)


@pytest.mark.slow
def test_qwen2_pool_on_vllm_through_serve_answers_as_the_builtin_engine(ray_session, checkpoints, builtin):
    import httpx
    from conftest import SERVE_PORT
    from ray import serve

    from omnistage.cluster.config import OmnistageConfig
    from omnistage.pipelines.serve import deploy

    _require_vllm_env()
    _, requests, expected = builtin["qwen2"]
    name = "vllm-qwen2"
    config = OmnistageConfig.model_validate(
        {"name": name, "stages": {"llm": {"model": str(checkpoints / "qwen2"), "engine": VLLM_ENGINE}}}
    )
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    deploy(config, name=name, route_prefix=f"/{name}")
    try:
        plain = requests["plain"]
        body = {"model": name, "messages": plain.messages, "max_tokens": plain.max_tokens, "temperature": 0}
        with httpx.Client(base_url=f"http://127.0.0.1:{SERVE_PORT}/{name}", timeout=120) as client:
            reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["choices"][0]["message"]["content"] == expected["plain"].text
        assert answer["usage"]["completion_tokens"] == len(expected["plain"].token_ids)
    finally:
        serve.delete(name)
