"""Runs LLM stages on vLLM for tests/test_vllm.py, in the vLLM environment (.venv-vllm).

The tests run in omnistage's own environment, which has no vLLM; they write a job (pickled: per
case an LLM stage config and requests) and run this script once per module under .venv-vllm's
interpreter, which loads each case's stage with ``engine.backend: vllm`` in turn and writes back
what each gave:

- ``results``: ``LLMResult`` per request, through ``LLM.__call__`` (the engine's ``generate``);
- ``streamed``: per request, its text deltas joined, through ``add``/``step`` as the Serve pool
  drives them, with the request named ``abort`` aborted after its first output;
- ``refused``: the message of the ``ValueError`` a stage refused to load with;
- ``load_s``, ``generate_s``: seconds.

    .venv-vllm/bin/python tests/vllm_worker.py JOB OUT
"""

import gc
import os
import pickle
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _stream(engine, requests):
    joined, finished = {}, {}
    for i, request in enumerate(requests):
        engine.add(str(i), request)
    engine.add("abort", requests[0])
    while engine.has_work():
        for out in engine.step():
            if out.request_id == "abort":
                engine.abort("abort")
                continue
            joined[out.request_id] = joined.get(out.request_id, "") + out.delta
            if out.result is not None:
                finished[out.request_id] = out.result
    return {"deltas": [joined.get(str(i), "") for i in range(len(requests))], "finished": sorted(finished)}


def main(job_path: str, out_path: str) -> None:
    from omnistage.actors.llm import LLM
    from omnistage.cluster.config import LLMConfig

    with open(job_path, "rb") as f:
        job = pickle.load(f)
    report = {}
    for name, case in job.items():
        start = time.perf_counter()
        try:
            llm = LLM(LLMConfig.model_validate(case["config"]))
        except ValueError as exc:
            report[name] = {"refused": str(exc)}
            continue
        loaded = time.perf_counter()
        results = llm(case["requests"])
        report[name] = {
            "results": results,
            "load_s": loaded - start,
            "generate_s": time.perf_counter() - loaded,
            "streamed": _stream(llm.engine, case["requests"]),
        }
        del llm
        gc.collect()
    with open(out_path, "wb") as f:
        pickle.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
