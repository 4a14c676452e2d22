"""The scheduling policy alone, in plain Python: admission by bucket into the lowest free slots, repeated
prompts sharing a prefill row, the prefill-token bound, the decode window and span, cancellation, the
prefix cache's lookups, saves and least-recently-used eviction, stop reasons. No device program runs."""

import numpy as np

from zaya_jax.infer.scheduler import (
    PREFIX_BLOCK,
    PoolSizes,
    PrefixCache,
    Request,
    SamplingKnobs,
    Scheduler,
    StopReason,
)


def pool(slots=4, cache_len=256, decode_steps=8, prefill_chunk=64, prefill_tokens=128):
    return PoolSizes(slots=slots, max_len=cache_len, cache_len=cache_len, decode_steps=decode_steps,
                     prefill_chunk=prefill_chunk, prefill_tokens=prefill_tokens, max_stop_ids=4, record=False)


def request(i, prompt):
    return Request(id=i, prompt=tuple(prompt), max_new_tokens=8, sampling=SamplingKnobs(),
                   stop_ids=np.full((4,), -1, np.int32), key=np.zeros((2,), np.uint32))


def test_admission_takes_the_oldest_bucket_into_the_lowest_slots_and_shares_repeated_prompts():
    s = Scheduler(pool())
    reqs = [request(0, [1] * 20), request(1, [2] * 5), request(2, [1] * 20), request(3, [3] * 30)]
    for r in reqs:
        s.add(r)
    plan = s.schedule()
    # Bucket 32 (requests 0, 2, 3) is the oldest's; then bucket 16 (request 1) takes the last free slot.
    assert [g.bucket for g in plan.groups] == [32, 16]
    first = plan.groups[0]
    assert first.requests == [reqs[0], reqs[2], reqs[3]] and first.row_of == [0, 0, 1]
    assert [p.prompt for p in first.prefills] == [reqs[0].prompt, reqs[3].prompt] and first.rows == 4
    assert [r.slot for r in reqs] == [0, 3, 1, 2]
    assert not s.waiting and s.schedule().groups == []


def test_a_group_stops_at_the_prefill_token_bound_and_waits_for_free_slots():
    s = Scheduler(pool(slots=8, prefill_tokens=256))  # chunk 64 at bucket 64: 4 rows fit, 16 do not
    reqs = [request(i, [i + 1] * 40) for i in range(5)]
    for r in reqs:
        s.add(r)
    plan = s.schedule()
    assert [len(g.prefills) for g in plan.groups] == [4, 1] and s.waiting_count == 0
    s = Scheduler(pool(slots=2))
    for r in reqs:
        s.add(r)
    assert sum(len(g.requests) for g in s.schedule().groups) == 2 and s.waiting_count == 3
    s.finish(reqs[1])
    plan = s.schedule()
    assert plan.groups[0].requests == [reqs[2]] and reqs[2].slot == 1


def test_the_decode_batch_covers_the_running_slots_and_the_tokens_they_will_hold():
    s = Scheduler(pool(slots=8, cache_len=256, decode_steps=8))
    reqs = [request(i, [i + 1] * n) for i, n in enumerate((20, 5, 9))]
    for r in reqs:
        s.add(r)
    batch = s.schedule().decode
    assert batch.active == 4 and batch.span == 32 and batch.cancel == []  # 20 held + 8 steps
    reqs[0].tokens = list(range(30))  # 20 + 29 held, + 8 steps: 57
    s.finish(reqs[2])
    assert s.schedule().decode.span == 64
    s.finish(reqs[0])
    batch = s.schedule().decode
    assert batch.active == 2 and batch.span == 16
    reqs[1].tokens = list(range(300))
    assert s.schedule().decode.span == 256  # capped at the cache


def test_cancel_removes_a_waiting_request_and_stops_a_running_one_at_the_next_decode():
    s = Scheduler(pool(slots=1))
    a, b = request(0, [1, 2]), request(1, [3])
    s.add(a)
    s.add(b)
    s.schedule()
    assert s.cancel(b) is True and not s.waiting
    assert s.cancel(a) is False
    assert s.schedule().decode.cancel == [0]
    assert s.schedule().decode.cancel == []  # asked once


def test_a_prompt_starts_from_its_longest_cached_run_of_whole_blocks():
    s = Scheduler(pool(slots=1, cache_len=256, prefill_chunk=256, prefill_tokens=256), prefix_blocks=16)
    shared = list(range(1, 2 * PREFIX_BLOCK + 1))
    first = request(0, shared + [99] * 20)
    s.add(first)
    group = s.schedule().groups[0]
    (p,) = group.prefills
    assert p.cached == [] and [j for j, _ in p.save] == [0, 1, 2]  # 52 tokens: three whole blocks
    s.prefilled(group)
    s.finish(first)
    second = request(1, shared + [7] * 5)
    s.add(second)
    group = s.schedule().groups[0]
    (q,) = group.prefills
    assert q.cached == [b for _, b in p.save[:2]] and q.save == [] and q.start == 2 * PREFIX_BLOCK
    assert group.chunk == 16  # the 5 tokens left, not the 64-token bucket
    s.prefilled(group)
    s.finish(second)
    exact = request(2, shared)  # a whole cached prompt still prefills its last block: its logits start it
    s.add(exact)
    (r,) = s.schedule().groups[0].prefills
    assert len(r.cached) == 1 and r.save == []


def test_least_recently_used_blocks_are_evicted_and_pinned_or_inner_ones_never():
    cache = PrefixCache(blocks=3)
    a = [1] * (2 * PREFIX_BLOCK)
    b = [2] * (2 * PREFIX_BLOCK)
    nodes_a, save_a = cache.reserve(a, [])
    assert [j for j, _ in save_a] == [0, 1] and len(cache) == 2
    nodes_b, save_b = cache.reserve(b, [])  # pinned: a's blocks stay; one block left for b
    assert [j for j, _ in save_b] == [0] and len(cache) == 3
    cache.unpin(nodes_a + nodes_b)
    cache.unpin(cache.lookup(a + [0]))  # a used since: b's block is the least recent
    nodes_c, save_c = cache.reserve([3] * PREFIX_BLOCK, [])
    assert save_c == [(0, save_b[0][1])] and len(cache.lookup(b + [0])) == 0
    cache.unpin(nodes_c)
    # Oldest first, a leaf before its parent (a parent is used whenever its leaf is): a's two, not c's.
    nodes_d, save_d = cache.reserve([4] * (2 * PREFIX_BLOCK), [])
    assert [blk for _, blk in save_d] == [save_a[1][1], save_a[0][1]]
    assert len(cache.lookup(a + [0])) == 0 and len(cache.lookup([3] * PREFIX_BLOCK + [0])) == 1


def test_a_full_cache_of_pinned_blocks_saves_nothing_more():
    cache = PrefixCache(blocks=1)
    held, _ = cache.reserve([1] * PREFIX_BLOCK, [])
    nodes, save = cache.reserve([2] * (3 * PREFIX_BLOCK), [])
    assert nodes == [] and save == []
    cache.unpin(held)


def test_stop_reasons_have_one_label_and_one_finish_reason_each():
    assert [r.label for r in StopReason] == ["running", "stop_token", "max_new_tokens", "cache_full", "non_finite",
                                            "cancelled", "idle"]
    assert {r.label: r.finish_reason for r in StopReason if r.finish_reason} == {
        "stop_token": "stop", "max_new_tokens": "length", "cache_full": "length", "non_finite": "error",
        "cancelled": "abort"}
    assert StopReason.of("cache_full") is StopReason.CACHE_FULL and int(StopReason.CANCELLED) == 5


def test_prompts_of_one_group_never_load_blocks_that_group_saves():
    s = Scheduler(pool(slots=4, cache_len=256, prefill_chunk=256, prefill_tokens=1024), prefix_blocks=16)
    shared = list(range(1, 2 * PREFIX_BLOCK + 1))
    a, b = request(0, shared + [5] * 3), request(1, shared + [6] * 3)
    s.add(a)
    s.add(b)
    (group,) = s.schedule().groups
    pa, pb = group.prefills
    assert pa.cached == pb.cached == [] and [j for j, _ in pa.save] == [0, 1] and pb.save == []
    s.prefilled(group)
    c = request(2, shared + [7])
    s.add(c)
    (pc,) = s.schedule().groups[0].prefills
    assert pc.cached == [blk for _, blk in pa.save]
