"""Scheduler: token budget, chunked prefill mixed with decodes, preemption and aborts."""

from pagoda_engine.block_manager import BlockManager
from pagoda_engine.sampling_params import SamplingParams
from pagoda_engine.scheduler import Scheduler
from pagoda_engine.sequence import FinishReason, Sequence, SequenceStatus


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunked=True):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_seqs, budget, max_model_len=num_blocks * block_size, enable_chunked_prefill=chunked)


def add(scheduler, request_id, prompt_len, max_tokens=4):
    """A request whose prompt shares no block with another's (so the prefix cache stays out of the way)."""
    start = 1000 * len(scheduler.waiting) + 100_000 * len(scheduler.running)
    prompt = list(range(start, start + prompt_len))
    seq = Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens), 0, frozenset())
    scheduler.add(seq)
    return seq


def run_step(scheduler):
    """One step with a stand-in model that always samples token 7."""
    batch = scheduler.schedule()
    samples = {seq.seq_id: 7 for seq, samples in zip(batch.seqs, batch.samples, strict=True) if samples}
    scheduler.update(batch, samples)
    return batch


def test_chunked_prefill_splits_prompt_and_keeps_decodes_first():
    s = make_scheduler(budget=16)
    short = add(s, "short", 5, max_tokens=10)
    batch = run_step(s)
    assert batch.num_tokens == [5] and short.num_output_tokens == 1
    long = add(s, "long", 40)
    batch = run_step(s)
    # The decode comes first and costs one token; the long prompt gets the rest of the budget.
    assert batch.seqs == [short, long] and batch.num_tokens == [1, 15] and batch.num_decodes == 1
    assert long.num_output_tokens == 0
    run_step(s)
    batch = run_step(s)
    assert batch.num_tokens == [1, 10] and long.num_output_tokens == 1


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    s = make_scheduler(budget=16, chunked=False)
    add(s, "a", 10)
    add(s, "b", 10)
    batch = run_step(s)
    assert batch.num_tokens == [10]
    batch = run_step(s)
    assert batch.num_tokens == [1, 10]


def test_preemption_frees_newest_and_resumes_as_prefill():
    # 6 blocks of 4 tokens: two 8-token prompts fit, growing to 12 tokens each does not.
    s = make_scheduler(num_blocks=6, budget=64)
    old = add(s, "old", 8, max_tokens=8)
    new = add(s, "new", 8, max_tokens=8)
    preempted = []
    for _ in range(40):
        if not s.has_unfinished():
            break
        preempted += run_step(s).preempted
        s.block_manager.check_invariants()
    assert not s.has_unfinished()
    assert new in preempted and old not in preempted
    assert old.finish_reason is FinishReason.LENGTH and new.finish_reason is FinishReason.LENGTH
    assert new.num_preemptions >= 1 and new.num_output_tokens == 8 and s.waiting_tokens == 0
    assert s.block_manager.num_free_blocks == 6


def test_a_sequence_whose_token_is_pending_waits_rather_than_preempt():
    """Step N+1 is scheduled before step N's tokens are known. The oldest sequence needs a block and none is
    free: it waits a step instead of preempting the newest, and its pending token is EOS, so nobody had to go."""
    s = make_scheduler(num_blocks=4, budget=64)
    old = Sequence("old", list(range(10, 18)), SamplingParams(max_tokens=8), 0, frozenset({2}))
    new = Sequence("new", list(range(20, 27)), SamplingParams(max_tokens=8), 0, frozenset({2}))
    s.add(old)
    s.add(new)
    first = s.schedule()  # both prompts; their first tokens are pending
    second = s.schedule()  # while the first step runs: old's next token needs a fifth block
    assert second.seqs == [new] and not second.preempted
    assert s.update(first, {old.seq_id: 2, new.seq_id: 7}) == [old]  # old drew EOS
    s.update(second, {new.seq_id: 7})
    third = s.schedule()
    assert third.seqs == [new] and s.num_preemptions == 0 and s.block_manager.num_free_blocks == 1
    s.block_manager.check_invariants()


def test_max_num_seqs_caps_running():
    s = make_scheduler(max_seqs=2)
    for i in range(4):
        add(s, str(i), 3)
    batch = run_step(s)
    assert len(batch) == 2 and len(s.waiting) == 2


def test_abort_frees_blocks_wherever_the_sequence_is():
    s = make_scheduler(num_blocks=8, budget=8)
    running = add(s, "running", 8)
    waiting = add(s, "waiting", 8)
    run_step(s)
    assert running.status is SequenceStatus.RUNNING and waiting.status is SequenceStatus.WAITING
    assert s.waiting_tokens == 8
    s.abort([running, waiting])
    assert running.finish_reason is FinishReason.ABORT and waiting.finish_reason is FinishReason.ABORT
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 8 and s.waiting_tokens == 0
    s.block_manager.check_invariants()


def test_stop_token_respects_min_tokens():
    s = make_scheduler()
    params = SamplingParams(max_tokens=10, min_tokens=3)
    seq = Sequence("r", [1, 2, 3], params, 0, stop_ids=frozenset({7}))
    s.add(seq)
    while s.has_unfinished():
        run_step(s)
    assert seq.finish_reason is FinishReason.STOP and seq.num_output_tokens == 3
