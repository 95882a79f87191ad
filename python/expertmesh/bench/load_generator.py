"""The async load generator: send requests on an arrival schedule, stream, time every chunk.

It speaks the OpenAI streaming API (/v1/completions or /v1/chat/completions), so it drives
expertmesh, vLLM, SGLang or TGI alike. Conventions follow vLLM's serving benchmark:
- Arrivals: request rate r with gamma-distributed gaps (shape = burstiness, mean 1/r;
  burstiness 1 is a Poisson process), rescaled so the n-th request is sent at n / r exactly,
  which keeps throughput comparable across seeds; r = inf sends everything at once.
  --max-concurrency caps requests in flight (a request waits for a slot after its arrival).
- Each request asks for stream_options.include_usage, so output_tokens is the server's count.
- Warm-up requests run first, one at a time, and are not measured.
Every request yields exactly one RequestResult (success or an error kind), so none is lost.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from expertmesh.bench.datasets import SampleRequest
from expertmesh.bench.metrics import RequestResult


@dataclass
class LoadConfig:
    base_url: str
    model: str
    endpoint: str = "/v1/completions"  # or /v1/chat/completions
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 1
    ignore_eos: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    timeout_s: float = 6 * 3600.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send time (seconds after the start) of each of n requests."""
    if n == 0 or rate == float("inf"):
        return np.zeros(n)
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"request rate and burstiness must be > 0, got {rate} and {burstiness}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    return times * ((n / rate) / times[-1])  # the n-th request lands at n / r


def build_payload(cfg: LoadConfig, req: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": cfg.model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": cfg.temperature, "max_tokens": req.output_len}
    if cfg.endpoint.endswith("chat/completions"):
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint needs text prompts: pass --tokenizer for a random dataset")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM / SGLang / expertmesh extension
    body.update(cfg.extra_body)
    return body


def _chunk_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def send_request(session: aiohttp.ClientSession, cfg: LoadConfig, req: SampleRequest, index: int,
                       t0: float) -> RequestResult:
    """One streamed request, timed as vLLM times it (see metrics.py for the definitions)."""
    res = RequestResult(index=index, prompt_len=req.prompt_len, max_tokens=req.output_len)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    st = time.perf_counter()
    res.start_time = st - t0
    last = st
    chunks = 0
    text: list[str] = []
    done = False
    try:
        async with session.post(cfg.base_url.rstrip("/") + cfg.endpoint, json=build_payload(cfg, req),
                                headers=headers) as resp:
            if resp.status != 200:
                res.error_kind = f"http_{resp.status}"
                res.error = (await resp.text())[:500]
                return res
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    for line in event.splitlines():
                        if not line.startswith(b"data:"):
                            continue  # SSE comments / keep-alives
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            continue
                        obj = json.loads(payload)
                        if "error" in obj:
                            res.error_kind, res.error = "stream_error", json.dumps(obj["error"])[:500]
                            return res
                        if obj.get("choices"):
                            now = time.perf_counter()
                            if chunks == 0:
                                res.ttft = now - st
                            else:
                                res.itl.append(now - last)
                            last = now
                            chunks += 1
                            text.append(_chunk_text(obj["choices"][0]))
                        elif obj.get("usage"):
                            res.output_tokens = int(obj["usage"].get("completion_tokens") or 0)
                            res.usage_reported = True
                            if obj["usage"].get("prompt_tokens") is not None:
                                res.prompt_len = int(obj["usage"]["prompt_tokens"])
    except asyncio.TimeoutError as exc:
        res.error_kind, res.error = "timeout", repr(exc)
        return res
    except aiohttp.ClientError as exc:
        res.error_kind, res.error = "connection", repr(exc)
        return res
    except (ValueError, KeyError, TypeError) as exc:  # a malformed chunk
        res.error_kind, res.error = "bad_response", repr(exc)
        return res
    except Exception as exc:  # noqa: BLE001 - any other failure is still one counted result
        res.error_kind, res.error = "exception", repr(exc)
        return res
    if chunks == 0:
        res.error_kind, res.error = "no_token", "the stream ended without a single choice chunk"
        return res
    if not done:
        res.error_kind, res.error = "incomplete", "the stream ended without data: [DONE]"
        return res
    res.success = True
    res.latency = last - st
    res.generated_text = "".join(text)
    if not res.usage_reported:
        res.output_tokens = chunks  # one token per chunk: true for expertmesh and vLLM streams
    return res


async def run_load(cfg: LoadConfig, requests: list[SampleRequest], warmups: list[SampleRequest] | None = None,
                   progress: bool = True) -> tuple[list[RequestResult], float, list[RequestResult]]:
    """Run the benchmark; returns (results in request order, duration in s, warm-up results)."""
    from tqdm.asyncio import tqdm

    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, keepalive_timeout=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        warm = [await send_request(session, cfg, w, -1 - i, time.perf_counter()) for i, w in enumerate(warmups or [])]
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        times = arrival_times(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
        bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)
        t0 = time.perf_counter()

        async def one(i: int, req: SampleRequest) -> RequestResult:
            delay = t0 + float(times[i]) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                out = await send_request(session, cfg, req, i, t0)
            else:
                async with sem:
                    out = await send_request(session, cfg, req, i, t0)
            bar.update(1)
            return out

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        duration = time.perf_counter() - t0
        bar.close()
    return list(results), duration, warm
