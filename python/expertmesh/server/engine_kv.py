"""The engine process's part in disaggregated serving (`expertmesh serve --role prefill|decode`).

prefill: a request whose add frame carries kv {"do_remote_decode": true} runs as usual (the
router sends it with max_tokens=1). When it finishes, its prompt's cached blocks are pinned for
a decode engine to pull (engine/kv_transfer.py) and its last outputs item carries the
kv_transfer_params to pull them with.

decode: a request whose add frame carries those params waits while a worker thread pulls the
blocks this engine's prefix cache lacks; then they are installed and the request is added,
finding them as prefix hits. A pull that fails is logged and counted and the request computes
its whole prompt here: slower, the same output, never a hang. An abort during the pull drops the
request; the blocks, once they arrive, are installed all the same (they are valid cache).

Both run on the engine loop's thread but for the pulls themselves (the exporter's server thread,
the importer's workers), which touch only sockets and the pinned blocks' tensors.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from expertmesh.engine.kv_transfer import KvExporter, KvImporter

logger = logging.getLogger(__name__)
_EXPORTED_REASONS = ("length", "stop")  # a prompt that ran to the end; aborts and errors export nothing


class PrefillSide:
    def __init__(self, engine: Any, wake: Callable[[], None], host: str, port: int, pin_timeout_s: float) -> None:
        self.exporter = KvExporter(engine.scheduler, engine.runner.kv_caches, wake, host, port, pin_timeout_s)
        self._prompts: dict[str, list[int]] = {}  # requests to export when they finish

    def info(self) -> dict[str, Any]:
        return {"role": "prefill", "host": self.exporter.host, "port": self.exporter.port}

    def defer(self, message: dict[str, Any], req: Any) -> bool:
        if (message.get("kv") or {}).get("do_remote_decode"):
            self._prompts[message["id"]] = list(req.prompt_ids)
        return False  # it runs now

    def finished(self, item: dict[str, Any]) -> None:
        """A request's last outputs item is about to go out: pin its blocks, name them in it."""
        prompt = self._prompts.pop(item["id"], None)
        if prompt is not None and all(s["finish_reason"] in _EXPORTED_REASONS for s in item["seqs"]):
            item["kv_transfer_params"] = self.exporter.export(prompt)

    def forget(self, request_id: str) -> None:
        self._prompts.pop(request_id, None)

    def ready(self, frame: dict[str, Any]) -> None:
        raise ValueError("a prefill engine pulls nothing")

    def poll(self) -> bool:
        """Release what was pulled or expired; True if anything was."""
        return self.exporter.release_finished() > 0

    def idle_timeout(self) -> float | None:
        return 0.5 if self.exporter.num_pinned else None  # pins expire even when nothing else happens

    def stats(self) -> dict[str, Any]:
        return {"role": "prefill", "pinned": self.exporter.num_pinned, **self.exporter.stats}

    def close(self) -> None:
        self.exporter.close()


class DecodeSide:
    def __init__(self, engine: Any, post: Callable[[dict[str, Any]], None], timeout_s: float = 30.0,
                 workers: int = 2) -> None:
        self.importer = KvImporter(engine.scheduler, engine.runner.kv_caches, read_timeout_s=timeout_s)
        self.post = post  # into the engine loop's inbox
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kv-pull")
        self._waiting: dict[str, Any] = {}  # request id -> its validated request, while its KV travels

    def info(self) -> dict[str, Any]:
        return {"role": "decode"}

    def defer(self, message: dict[str, Any], req: Any) -> bool:
        """True if the request waits for a pull before it is added."""
        kv = message.get("kv") or {}
        if not kv.get("do_remote_prefill"):
            return False
        try:
            first, count = self.importer.missing(list(req.prompt_ids), kv)
        except Exception:  # noqa: BLE001 - a bad transfer costs this request its cached KV, nothing else
            logger.exception("request %s: cannot plan its KV pull; computing its prompt here", message["id"])
            self.importer.stats["failures"] += 1
            return False
        if count == 0:  # all cached here already: only tell the prefill side to let its pins go
            self._pool.submit(self._release, message["id"], kv)
            return False
        self._waiting[message["id"]] = req
        self._pool.submit(self._pull, message["id"], list(req.prompt_ids), kv, first, count)
        return True

    def _pull(self, request_id: str, prompt_ids: list[int], kv: dict[str, Any], first: int, count: int) -> None:
        try:
            data, error = self.importer.fetch(kv, first, count), None
        except Exception as exc:  # noqa: BLE001 - reported to the engine thread
            data, error = None, f"{type(exc).__name__}: {exc}"
        self.post({"type": "kv_ready", "id": request_id, "prompt_ids": prompt_ids, "first": first, "data": data,
                   "error": error})

    def _release(self, request_id: str, kv: dict[str, Any]) -> None:
        try:
            self.importer.fetch(kv, 0, 0)
        except Exception as exc:  # noqa: BLE001 - the pins expire at their timeout instead
            logger.warning("request %s: could not release its prefill KV: %s", request_id, exc)

    def ready(self, frame: dict[str, Any]) -> Any:
        """A pull ended: install what came; the request to add now (None if it was aborted meanwhile)."""
        if frame["data"] is None:
            self.importer.stats["failures"] += 1
            logger.warning("request %s: KV pull failed (%s); computing its prompt here", frame["id"], frame["error"])
        else:
            try:
                self.importer.install(frame["prompt_ids"], frame["first"], frame["data"])
            except Exception:  # noqa: BLE001 - the request still runs, computing what is missing
                self.importer.stats["failures"] += 1
                logger.exception("request %s: installing its pulled KV failed", frame["id"])
        return self._waiting.pop(frame["id"], None)

    def finished(self, item: dict[str, Any]) -> None:
        pass

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def poll(self) -> bool:
        return False

    def idle_timeout(self) -> float | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"role": "decode", "waiting": len(self._waiting), **self.importer.stats}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
