"""Step plans (`Scheduler.schedule`), decided without a model: the token budget of a prefill step,
turns between prefills and passes, the lead by forward time, riders within the step's budget,
preemption counted page by page (a page frees only when its last reader lets go), and mode auto's
moves and first decodings."""

from __future__ import annotations

from trimode import SamplingParams
from trimode.config import EngineConfig
from trimode.decoding import EXACT_DECODINGS, LOSSY_DECODINGS
from trimode.engine.auto import AutoPolicy, PassCosts
from trimode.engine.request import Request
from trimode.engine.scheduler import Move, PoolPages, Prefilling, RunningGroup, Scheduler

AR, SPEC = ("ar",), ("selfspec", 8, "linear")


def request(rid: str, prompt_tokens: int = 20, arrival: float = 0.0, parent: str | None = None, **params) -> Request:
    return Request(
        None,
        list(range(prompt_tokens)),
        SamplingParams(**{"temperature": 0.0, **params}),
        request_id=rid,
        arrival=arrival,
        parent_id=parent,
    )


def group(key: tuple, reqs: list[Request], pages: list[tuple[int, ...]], need: int, vtime: float = 0.0) -> RunningGroup:
    width = 1 if key == AR else key[1]
    return RunningGroup(key, tuple(reqs), tuple(pages), (need,) * len(reqs), (False,) * len(reqs), vtime, width)


def pool(free: int, held: list[tuple[int, ...]], size: int = 64) -> PoolPages:
    refs = [0] * size
    for pages in held:
        for p in pages:
            refs[p] += 1
    return PoolPages(free, refs)


def scheduler(max_batch: int = 8, budget: int = 64) -> Scheduler:
    return Scheduler(EngineConfig(max_batch, 16, kv_cache_tokens=64 * 16, page_size=16, max_num_batched_tokens=budget))


def test_newcomers_share_a_prefill_within_the_budget_and_a_long_one_is_chunked_alone():
    s = scheduler(budget=64)
    for rid, n in (("a", 30), ("b", 30), ("c", 30)):
        s.add(request(rid, n))
    plan = s.schedule([], [], pool(60, []), fuses_parts=True)
    assert [r.request_id for r in plan.prefill] == ["a", "b"] and not plan.chunked  # 60 of 64 tokens
    s = scheduler(budget=64)
    s.add(request("long", 200))
    plan = s.schedule([], [], pool(60, []), fuses_parts=True)
    assert [r.request_id for r in plan.prefill] == ["long"] and plan.chunked


def test_prefills_and_passes_take_turns_and_the_least_served_group_leads():
    s = scheduler()
    running = [request("x"), request("y")]
    diffusion = ("diffusion", 8, 0.9)
    groups = [group(SPEC, running[:1], [(1,)], 1, vtime=0.5), group(diffusion, running[1:], [(2,)], 1, vtime=0.2)]
    s.add(request("new"))
    first = s.schedule(groups, [], pool(40, [(1,), (2,)]), fuses_parts=True)
    assert first.prefills and [r.request_id for r in first.prefill] == ["new"]
    second = s.schedule(groups, [], pool(40, [(1,), (2,)]), fuses_parts=True)
    assert not second.prefills and second.lead == diffusion  # the least forward time per row


def test_riding_groups_ride_when_their_pages_are_free_and_never_beside_compiled_forwards():
    s = scheduler()
    ar, spec = request("ar"), request("spec")
    groups = [group(AR, [ar], [(1,)], 1, vtime=1.0), group(SPEC, [spec], [(2,)], 2)]
    plan = s.schedule(groups, [], pool(3, [(1,), (2,)]), fuses_parts=True)
    assert plan.lead == SPEC and plan.riders == (AR,)
    assert s.schedule(groups, [], pool(3, [(1,), (2,)]), fuses_parts=False).riders == ()
    tight = s.schedule(groups, [], pool(2, [(1,), (2,)]), fuses_parts=True)
    assert tight.lead == SPEC and tight.riders == ()  # the lead takes both free pages


def test_a_lead_without_pages_preempts_the_newest_and_counts_shared_pages_once_freed():
    """The newest request shares page 5 with the oldest: preempting it frees only its own page 6,
    so the next newest goes too."""
    s = scheduler()
    old, mid, new = request("old", arrival=1.0), request("mid", arrival=2.0), request("new", arrival=3.0)
    pages = [(5, 7), (8,), (5, 6)]
    groups = [group(SPEC, [old, mid, new], pages, 1)]
    plan = s.schedule(groups, [], pool(0, pages), fuses_parts=True)
    assert [(r.request_id, why) for r, why in plan.preempt] == [("new", "KV pool full"), ("mid", "KV pool full")]
    assert plan.lead == SPEC and [r.request_id for r in s.waiting] == ["mid", "new"]


def test_a_lead_that_gives_up_its_own_rows_runs_nothing_this_step():
    s = scheduler()
    only = request("only")
    plan = s.schedule([group(SPEC, [only], [(3,)], 2)], [], pool(0, [(3,)]), fuses_parts=True)
    assert [r.request_id for r, _ in plan.preempt] == ["only"] and plan.lead is None and not plan.prefills


def test_a_parent_holding_every_row_gives_one_to_a_waiting_request_in_the_same_step():
    s = scheduler(max_batch=2)
    big = [request(f"big-{j}", parent="big", arrival=float(j)) for j in range(2)]
    for j, r in enumerate(big):
        r.token_ids = [7] * (5 - j)
    s.add(request("short", 8))
    plan = s.schedule([group(AR, big, [(1,), (2,)], 0)], [], pool(2, [(1,), (2,)]), fuses_parts=True)
    assert [(r.request_id, why) for r, why in plan.preempt] == [("big-1", "its row went to a request holding fewer")]
    assert [r.request_id for r in plan.prefill] == ["short"]


def test_chunks_alternate_with_newcomers():
    s = scheduler()
    long = request("long", 300)
    job = Prefilling(long, (1, 2), 4)
    s.add(request("new"))
    first = s.schedule([], [job], pool(30, [(1, 2)]), fuses_parts=True)
    assert [r.request_id for r in first.prefill] == ["new"]  # newcomers first, then the chunk
    s.add(request("newer"))
    second = s.schedule([], [job], pool(30, [(1, 2)]), fuses_parts=True)
    assert second.chunk is long and not second.prefill


def test_block_groups_ride_together_while_their_tokens_fit_the_step_budget():
    """Two shards of b8 rows (32 tokens each) and a diffusion group (16): under a 64-token budget
    the lead takes one shard beside it, least forward time first; AR rows ride beyond the budget."""
    s = scheduler(budget=64)
    rows = [request(f"r{i}") for i in range(11)]
    shard0, shard1, diffusion = ("selfspec", 8, "linear", 0), ("selfspec", 8, "linear", 1), ("diffusion", 16, 0.9)
    groups = [
        group(shard0, rows[:4], [(i,) for i in range(4)], 0, vtime=0.1),
        group(shard1, rows[4:8], [(i,) for i in range(4, 8)], 0, vtime=0.3),
        group(diffusion, rows[8:9], [(8,)], 0, vtime=0.2),
        group(AR, rows[9:], [(9,), (10,)], 0, vtime=0.5),
    ]
    plan = s.schedule(groups, [], pool(40, [(i,) for i in range(11)]), fuses_parts=True)
    assert plan.lead == shard0 and plan.riders == (diffusion, AR)  # 32 + 16 tokens; shard1's 32 would not fit
    wide = Scheduler(
        EngineConfig(8, 16, kv_cache_tokens=64 * 16, page_size=16, max_num_batched_tokens=64, max_decode_tokens=96)
    )
    assert wide.schedule(groups, [], pool(40, []), fuses_parts=True).riders == (diffusion, shard1, AR)


def auto_policy(per_token: float) -> AutoPolicy:
    """Block passes as cheap as an AR step (`per_token` ~ 0: self-spec wins) or dear (AR wins)."""
    return AutoPolicy(EXACT_DECODINGS, PassCosts({n: 1e-3 + per_token * n for n in (1, 8, 32, 128, 512, 4096)}))


def test_auto_rows_between_cycles_move_to_the_policys_pick_and_nothing_else_moves():
    s = scheduler(budget=512)
    plain, auto_free, auto_busy = request("plain"), request("a", mode="auto"), request("b", mode="auto")
    for r in (auto_free, auto_busy):
        r.decoding = SamplingParams(temperature=0.0, mode="ar")
    ar_group = RunningGroup(
        AR, (plain, auto_free, auto_busy), ((1,), (2,), (3,)), (0, 0, 0), (False,) * 3, 0.0, 1,
        choice=EXACT_DECODINGS[0], boundary=(True, True, False),
    )  # fmt: skip
    plan = s.schedule([ar_group], [], pool(40, [(1,), (2,), (3,)]), fuses_parts=True, policy=auto_policy(1e-7))
    (move,) = plan.moves
    assert move.key == AR and move.rows == (1,) and move.choice[0] == "selfspec"  # not the plain row, nor b mid-cycle
    assert not plan.prefills and plan.lead is None  # the forward is planned on the groups the move forms
    # The plan after a move runs a pass; once moved, the same pick holds and nothing moves.
    moved = RunningGroup(
        move.choice, (auto_free,), ((2,),), (0,), (False,), 0.0, move.choice[1], choice=move.choice, boundary=(True,)
    )
    rest = RunningGroup(
        AR, (plain, auto_busy), ((1,), (3,)), (0, 0), (False,) * 2, 0.0, 1, choice=EXACT_DECODINGS[0],
        boundary=(False, False),
    )  # fmt: skip
    again = s.schedule([rest, moved], [], pool(40, [(1,), (2,), (3,)]), fuses_parts=True, policy=auto_policy(1e-7))
    assert not again.moves and again.lead is not None
    assert not s.schedule([rest, moved], [], pool(40, [(1,), (2,), (3,)]), False, auto_policy(1e-7)).moves
    # Dear block passes: auto rows stay on (or move back to) AR.
    assert s.schedule([moved], [], pool(40, [(2,)]), fuses_parts=True, policy=auto_policy(1e-3)).moves == (
        Move(move.choice, (0,), EXACT_DECODINGS[0]),
    )


def test_auto_newcomers_get_the_decoding_picked_for_the_whole_auto_load():
    """One auto newcomer alone decodes as self-spec when block passes are cheap; the same newcomer
    admitted beside 63 waiting auto requests, each of whose passes costs per token, decodes as AR."""
    s = scheduler(budget=512)
    s.add(request("new", mode="auto"))
    plan = s.schedule([], [], pool(40, []), fuses_parts=True, policy=auto_policy(1e-7))
    assert [r.request_id for r in plan.prefill] == ["new"] and [r.request_id for r, _ in plan.first] == ["new"]
    assert plan.first[0][1][0] == "selfspec"
    s = Scheduler(EngineConfig(1, 128, kv_cache_tokens=64 * 16, page_size=16, max_num_batched_tokens=512))
    for i in range(64):
        s.add(request(f"w{i}", mode="auto"))
    plan = s.schedule([], [], pool(40, []), fuses_parts=True, policy=auto_policy(2e-4))
    assert len(plan.prefill) == 1 and plan.first[0][1] == EXACT_DECODINGS[0]
    # Rows that opted in to diffusion are a load of their own, with diffusion among their choices.
    s = scheduler(budget=512)
    s.add(request("exact", mode="auto"))
    s.add(request("lossy", mode="auto", auto_lossy=True))
    policy = auto_policy(1e-7)
    policy.lossy, policy.tokens_per_cycle[LOSSY_DECODINGS[0]] = LOSSY_DECODINGS, 15.0
    first = dict((r.request_id, c) for r, c in s.schedule([], [], pool(40, []), True, policy).first)
    assert first["lossy"] == LOSSY_DECODINGS[0] and first["exact"][0] == "selfspec"
    plain = scheduler()
    plain.add(request("ar"))
    assert plain.schedule([], [], pool(40, []), fuses_parts=True, policy=auto_policy(1e-7)).first == ()
