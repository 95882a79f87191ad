"""What rank 0 and the replica leaders say to each other each step, as msgpack frames.

Command (rank 0 -> every leader): ["step", adds, aborts] with one list per replica, an add
being [request_id, prompt, prompt_ids, sampling params {field: value}, max_tokens, priority];
["stats"] and ["stop"]. Reply (leader -> rank 0): a step's outputs as deltas -- per request
[request_id, finished, seqs], per sequence [index, new token ids, text delta, new logprobs
([[token, logprob, rank, text], ...] per token, or None), cumulative logprob, finish reason,
stop reason] -- so a frame grows with the tokens a step made, not with the text so far.
A leader's engine makes DELTA outputs (outputs.RequestOutputKind), which `encode_outputs` packs
as they are; `OutputMirror` (rank 0) keeps the sequences and hands each request's outputs back
in the kind rank 0's caller asked for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from expertmesh.engine.request_state import EngineRequest
from expertmesh.outputs import CompletionOutput, Logprob, RequestOutput, RequestOutputKind
from expertmesh.sampling_params import SamplingParams

STEP, STATS, STOP = "step", "stats", "stop"
_PARAM_FIELDS = [f.name for f in dataclasses.fields(SamplingParams) if f.init]


def pack(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def encode_add(req: EngineRequest, request_id: str) -> list:
    params = {name: getattr(req.params, name) for name in _PARAM_FIELDS}
    return [request_id, req.prompt, req.prompt_ids, params, req.max_tokens, req.priority]


def decode_add(add: list) -> tuple[EngineRequest, str]:
    request_id, prompt, prompt_ids, params, max_tokens, priority = add
    return EngineRequest(prompt, prompt_ids, SamplingParams(**params), max_tokens, priority), request_id


def _logprobs(entries: list[dict[int, Logprob]]) -> list[list[list]]:
    return [[[tok, lp.logprob, lp.rank, lp.decoded_token] for tok, lp in entry.items()] for entry in entries]


def encode_outputs(outputs: list[RequestOutput]) -> bytes:
    """A leader's reply: its engine's DELTA outputs of one step, as they are."""
    items = []
    for out in outputs:
        seqs = [[seq.index, seq.token_ids, seq.text_delta, None if seq.logprobs is None else _logprobs(seq.logprobs),
                 seq.cumulative_logprob, seq.finish_reason, seq.stop_reason] for seq in out.outputs]
        items.append([out.request_id, out.finished, seqs])
    return pack(items)


@dataclasses.dataclass(slots=True)
class _Sequence:
    """Rank 0's copy of one remote sequence."""

    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None


class OutputMirror:
    """Rank 0's side: the requests other replicas run, rebuilt from their reply frames."""

    def __init__(self) -> None:
        self._requests: dict[str, tuple[EngineRequest, RequestOutputKind, list[_Sequence]]] = {}

    def expect(self, req: EngineRequest, request_id: str,
               kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        self._requests[request_id] = (req, kind, [_Sequence() for _ in range(req.params.n)])

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def decode(self, frame: bytes) -> list[RequestOutput]:
        outputs = []
        for request_id, finished, seqs in unpack(frame):
            entry = self._requests.get(request_id)
            if entry is None:  # aborted on rank 0 while the replica stepped
                continue
            req, kind, mirrors = entry
            outs = []
            for index, new_ids, delta, lps, cumulative, finish_reason, stop_reason in seqs:
                new_lps = None if lps is None else [{tok: Logprob(lp, rank, text) for tok, lp, rank, text in row}
                                                    for row in lps]
                if kind == RequestOutputKind.DELTA:  # pass through: nothing kept, nothing copied
                    outs.append(CompletionOutput(index, delta, new_ids, cumulative, new_lps, finish_reason,
                                                 stop_reason, delta))
                    continue
                mine = mirrors[index]
                mine.token_ids += new_ids
                mine.text += delta
                if new_lps is not None:
                    mine.logprobs = (mine.logprobs or []) + new_lps
                outs.append(CompletionOutput(index, mine.text, list(mine.token_ids), cumulative, mine.logprobs,
                                             finish_reason, stop_reason, delta))
            if finished:
                del self._requests[request_id]
            if kind == RequestOutputKind.FINAL_ONLY and not finished:
                continue
            outputs.append(RequestOutput(request_id, req.prompt, req.prompt_ids, outs, finished))
        return outputs
