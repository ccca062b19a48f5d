"""What the scheduler half reads from vLLM's per-request objects, in one place.

`key_scope` turns a `Request` into what besides its token ids decides its KV;
`step_rows` turns a `SchedulerOutput` into the plain rows `LMCScheduler.build_meta`
takes. vLLM 0.32 / 0.33 differences handled here: `CachedRequestData.resumed_req_ids`
(a set, 0.32+) vs `resumed_from_preemption` (a list of bools, older releases);
`SchedulerOutput.preempted_req_ids` may be absent or None.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from lmc_connector.tokens import KeyScope

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


def key_scope(request: Request) -> KeyScope | None:
    """The request's LoRA adapter, multimodal items and cache salt; None when it has none."""
    lora = getattr(request, "lora_request", None)
    features = getattr(request, "mm_features", None) or ()
    multimodal = tuple(
        (str(f.identifier), int(f.mm_position.offset), int(f.mm_position.length)) for f in features
    )
    salt = getattr(request, "cache_salt", None)
    if lora is None and not multimodal and not salt:
        return None
    return KeyScope(
        cache_salt=salt,
        lora_name=None if lora is None else str(lora.lora_name),
        lora_path=None if lora is None else str(lora.lora_path),
        multimodal=multimodal,
    )


def has_token_ids(request: Request) -> bool:
    """False for a request given as prompt embeddings: its token ids are placeholders."""
    return getattr(request, "prompt_embeds", None) is None


class StepRows(NamedTuple):
    """One scheduler step as `LMCScheduler.build_meta` takes it."""

    #: (req_id, num_computed_tokens, block_ids) of newly scheduled requests.
    new: list[tuple[str, int, list[int]]]
    #: (req_id, num_computed_tokens, new block ids, resumed) of the others.
    cached: list[tuple[str, int, list[int] | None, bool]]
    preempted: set[str]


def step_rows(scheduler_output: SchedulerOutput) -> StepRows:
    new = [
        (r.req_id, r.num_computed_tokens, list(r.block_ids[0]))
        for r in scheduler_output.scheduled_new_reqs
    ]
    cached = scheduler_output.scheduled_cached_reqs
    resumed_ids = getattr(cached, "resumed_req_ids", None)
    resumed_flags = getattr(cached, "resumed_from_preemption", None)
    rows: list[tuple[str, int, list[int] | None, bool]] = []
    for i, req_id in enumerate(cached.req_ids):
        if resumed_ids is not None:
            resumed = req_id in resumed_ids
        else:
            resumed = bool(resumed_flags[i]) if resumed_flags is not None else False
        new_blocks = cached.new_block_ids[i]
        blocks = None if new_blocks is None else list(new_blocks[0])
        rows.append((req_id, cached.num_computed_tokens[i], blocks, resumed))
    preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
    return StepRows(new, rows, preempted)
