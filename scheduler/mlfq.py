"""Skip-join multi-level feedback queue (FastServe, Wu et al., arXiv 2305.05920), with a tail guard.

FastServe's mechanism, kept:
* K queues (``num_queues``); queue i holds a job for ``q0 * quantum_ratio**i`` of attained service
  (the last queue: unbounded in effect). A job that used its queue's quantum is demoted one queue.
* Skip-join: a new job's prefill is known from its prompt length; it joins the queue it will be in
  once that prefill is done, so long prompts skip queues they would leave at once.
* Order: the oldest tail-class job (below) first, then running jobs long in the system (change 13),
  then (while the system is calm, change 12) the other running jobs, then every other job by its Gittins index per
  output token at its age (change 10; FastServe's top-queue-first before 16 jobs finished; a job
  with a length hint on the lengths of jobs hinted alike, change 11), then
  its queue, fewest prompt tokens left to prefill (change 5), then FCFS (entering the queue). The
  Scheduler fills the batch in this order and preempts running jobs left out, at the token
  boundary; proactive offload/upload is the KV planner's (``kv_planner.py``).

Changed for issue 15 (one default parameter set; cells named mix/memory/arrival/load of
``scripts/sweep_scheduler.py``, dev runs of 500 jobs per cell; the committed sweep is in
``benchmarks/results/sweep_scheduler.json``):

1. Service is a job's OWN work, not the iteration time of the batches it sat in:
   ``attained = per_prefill_token * prompt tokens prefilled + token_cost * tokens generated``, with
   ``token_cost = base / max_batch + per_decode_row`` (one row's share of a full decode step). The
   old charge (whole iteration time to every member) also billed a decode row for a neighbour's
   256-token prefill chunk in the same step; levels now depend on the job's progress only (LAS).
   (Rationale, not measured on its own.) With a fixed ``base_quantum`` (the engine passes one) the
   quanta keep their old meaning: iteration seconds spent in batches (``served``).
2. Quanta derived, not fixed seconds: ``q0`` = the 90th percentile (``Q0_QUANTILE``) of the
   attained service of the last 256 finished jobs (before any finished: a 256-token prefill plus 32
   tokens); quanta double below it. With the median instead, chat_a1.2/limited/cv4/0.7 was 1.23x the
   oracle's average JCT and bimodal/limited/cv2/0.8 1.44x with 1.8x FCFS's swap traffic; with p90:
   1.10x and 1.39x (1.7x swap). Light-tailed and bimodal short jobs then finish in Q0 in arrival
   order instead of being preempted at a median they mostly exceed (LAS loses to FCFS for
   increasing-hazard sizes). ``base_quantum`` given (the engine's setting): the fixed old-style q0.
3. Tail guard instead of a fixed starvation limit: a job that has waited (time since arrival not in
   a batch) longer than ``tail_slack * (served + ahead + wait_floor)`` (``ahead``: change 7) moves to
   the tail class until the job ends; its oldest job runs before every queue (change 8). ``served`` is the time it spent in
   batches; ``wait_floor`` = the 99th percentile (``FLOOR_QUANTILE``) of finished jobs' ``served``
   (before any finished: 32 full-batch decode steps). With the median as floor, bursts (cv4)
   promoted most jobs and the policy collapsed into FCFS: chat_a0.8/limited/cv4/0.9 went 4.1x the
   oracle with TTFT only 3x below FCFS; with p99 it is 1.3x and 43x. ``starve_limit`` (seconds
   without running, when given) still promotes to Q0 as before.
   Documented bound (tests/scheduler/test_tail_guard.py, hypothesis traces): at every
   ``schedule(now)`` a job that was not in the previous batch and is outside the tail class has
   waited at most ``tail_slack * (served + ahead + wait_floor)`` (past it, that same call promotes it); the
   oldest tail-class job is in every batch its pages fit in.
4. Eviction that does not thrash: a job's KV may be evicted (offloaded or dropped) to make room only
   for a job at least ``EVICT_GAP`` = 2 queues higher (or in the tail class); an empty batch may
   still evict anyone (progress; found by the hypothesis page-accounting test). Any-rank eviction
   moved 1.40x FCFS's pages on chat_a0.8/limited/cv2/0.8 (0.90x with a gap of one queue); a gap of
   one still left chat_a1.2/limited/cv4/0.7 at 1.52x and bimodal/limited/cv2/0.8 at 1.61x, a gap
   of two 1.22x and 1.48x, average JCT within 0.02x of the oracle ratio either way. With the H200
   cost model and change 8, a gap of three traded average for tail (seeds 0 / 1 / 2: average -1 /
   -2 / -1 cells, p99 +2 / +1 / +1, swap +2 / +3 / +1); two kept.
5. Inside a queue, SRPT on the known part of the work: jobs with fewer prompt tokens left to prefill
   go first (jobs decoding have none left and keep FCFS among themselves). Prefill is one chunk per
   step, a single server, and the summarisation mix queues on it: summarise/ample/cv2/0.8 went from
   1.61x to 1.29x the oracle's average JCT, summarise/ample/cv1/0.7 1.13x -> 1.03x,
   chat_a1.2/ample/cv4/0.9 1.17x -> 1.11x; p99 moved both ways (chat_a0.8/limited/cv2/0.8 0.97x ->
   1.18x FCFS's, chat_a1.2/limited/cv4/0.7 1.51x -> 1.61x, bimodal/ample/cv4/0.9 1.25x -> 1.24x).
   Long prompts cannot starve: the tail guard (3) bounds their wait like any job's.
6. Queue order from the Gittins index of the observed service (``scheduler/gittins.py``), not always
   top first: each queue is ranked by the index at its entry age with a threshold of at least its
   quantum, on the Kaplan-Meier estimate from the last 256 finished jobs with live jobs censored at
   their attained service (finished jobs alone are biased short: under LAS the long ones are still
   running). Heavy tails (decreasing hazard) give FastServe's order; past the short mode of a bimodal
   mix a job is near its end and its queue moves up, where LAS ran the long jobs as processor sharing
   while they held the scarce KV. A queue with fewer than ``MIN_AT_RISK`` = 16 observed jobs past its
   entry age keeps the index of the one above; before 16 jobs finished, and with a fixed
   ``base_quantum``, the order is FastServe's.
   Eviction's gap (4) counts places in this order. bimodal/limited/poisson/0.7: average JCT 1.46x ->
   1.22x the oracle's and p99 2.57x -> 1.49x FCFS's; bimodal/limited/cv4/0.9 2.60x -> 1.59x. Rejected:
   thresholds just past the entry age (the index then ranked by the gap to the next sample: queues
   reordered at random, avg within 15% in 85 cells; its p99 gains came from that noise); finished jobs
   only (chat_a0.8/limited/poisson/0.8 went 1.25x -> 1.76x the oracle); Q0 at the median with this
   order (73 cells within 15%); new jobs ahead of decoding ones inside a queue (TTFT 31 cells, average
   47). Tighter tail guards, with this order, all met p99 in fewer cells than the guard of (3) (19):
   ``2 * max(served, floor)`` 14, ``2 * floor + served / 2`` 14, floor at the 90th / 95th percentile
   16 / 17 (promoted long jobs run oldest first and hold the batch and the KV, so the next ones wait
   longer); ``tail_slack`` 1 36 of 120 with the noisy order above, against its 39 at 2.
7. The tail guard (3) also allows for the wait FCFS would impose: ``ahead`` is the expected work
   left of the jobs that arrived before a job, measured at its first ``refresh`` (their prompt left
   plus the mean decode service of the last 256 finished jobs beyond what each generated). In bursts
   of long prompts every job used to outwait ``2 * (served + floor)`` and the policy fell back to
   FCFS: summarise/cv4/0.7 went 1.42x -> 1.11x the oracle's average JCT, summarise/cv2/0.8 1.21x ->
   1.12x (their p99 1.00x -> 1.24x and 1.40x -> 1.73x FCFS's, still under the oracle's 1.74x and
   1.66x); chat_a0.8/limited/cv4/0.8 p99 1.03x -> 0.92x. Over the sweep: average within 15% of the
   oracle in 87 -> 93 cells, p99 19 -> 20, TTFT and swap unchanged; with trace seeds 1 and 2 the
   average gains more (91 -> 101, 91 -> 103) but p99 loses (19 -> 15, 15 -> 9 cells): this change
   trades tail for average (benchmarks/results/sweep_scheduler_seeds.json). Rejected: ``ahead`` in place of
   ``served`` (p99 in 10 cells). Also tried inside a queue, none kept: jobs with KV on device first
   (p99 18 cells, swap 21), arrival order (worst average 2.29x the oracle, p99 17), most attained
   service first below Q0 (p99 17, swap 23; average 93 either way).
8. Measured with the H200 cost model (``gen_trace.GPU``, fitted on the engine; the sweep's targets
   at trace seeds 0 / 1 / 2 before -> after, 120 cells at load <= 0.9,
   benchmarks/results/sweep_scheduler_seeds.json): three fixes to changes 3 and 6.
   (a) The Gittins index where every observed job ends within the quantum (bimodal's long mode,
   uniform 512-1024 tokens, past 483 tokens) was None, so the oldest queue inherited its parent's
   index and FastServe's order held exactly where it is wrong; it is now 1 / the mean service left
   (``gittins.gittins_curve``). (b) With (a) a queue near its end can outrank Q0, and the
   summarisation mix's long prompts skip-joined into it jumped every new job while 4,000 tokens of
   prefill were still ahead of their end: a job still prefilling is ranked by the Gittins index with
   that known work first (``job_index``: max over y of (F(a) - F(y)) / (known F(a) + integral_a^y F)),
   so it sorts below queues its decoding neighbours outrank; pinning Q0 first instead met fewer
   cells (average 90 / 100 / 101, p99 18 / 12 / 9). The index takes the queue's curve at its entry
   age, so for a job whose prefill ends inside the queue (every new job in Q0) the prefill is counted
   twice: new jobs rank a little below decoding jobs of their queue's index. Counting it once
   (known work = what the job lacks to reach the entry age: seed 0 average 95, p99 22, swap 21; or
   the curve at the age its prefill leaves it: 95 / 22 / 23, chat_a2.0/limited/cv4/0.9 1.20x -> 1.77x
   the oracle) met fewer cells: preempting decoding jobs for new ones costs swap under scarce KV.
   It costs on the CPU model's 40-job bursty trace at batch 2 (prefill 2.5 ms a token): the
   simulator's FCFS / MLFQ average JCT there went 1.07 -> 0.92 and TTFT 2.03 -> 1.16
   (sim_bursty_cpu_40_like_engine.json). (c) Only the oldest tail-class job (``TAIL_HEADS`` = 1)
   runs before every queue and may take anyone's KV; later ones go first in the level they left: a
   burst had put up to 62 jobs in the tail class at once, which held the scarce KV and kept new short jobs out
   (bimodal/limited/cv4/0.8: TTFT 1.34 s -> 0.08 s). Average within 15% of the oracle: 88 / 99 /
   100 -> 99 / 102 / 103 cells ((a)+(b) alone: 93 / 102 / 103; (c) adds the six on seed 0); p99
   no worse than FCFS's: 20 / 12 / 9 -> 26 / 17 / 22 (the oracle's own: 24 / 24 / 16); swap within
   1.5x FCFS's: 25 / 21 / 23 -> 31 / 22 / 31 of 46; TTFT unchanged (30 / 32 / 27).
9. (Replaced by change 10.) Inside a queue, the Gittins index at the job's own age, not only at
   the queue's entry: each queue is read at ``SUB_LEVELS`` = 4 ages across its quantum (threshold
   a quarter quantum ahead), and a decoding job below Q0 takes the index at the last of them it has reached (``job_index``); the
   queue order and eviction's gap (4) still use the entry age. A queue spans a doubling of attained
   service; past bimodal's short mode the older half of a queue is much nearer its end, yet FCFS
   inside the queue ran whoever was demoted first. Found by giving the MLFQ the true remaining
   output below Q0 (a diagnostic, not a policy): bimodal/limited/gamma2/0.8 went 1.33x -> 1.04x the
   oracle, so the loss was the order of the long jobs, not the memory they hold (a cap of 4, 8 or 16
   long jobs holding KV, on top of this change, gained at most 0.04x in five limited-KV cells and
   lost up to 0.07x; not kept).
   bimodal/limited/gamma2/0.8 1.33x -> 1.20x the oracle (swap 2.07x -> 1.80x FCFS's),
   chat_a1.2/limited/gamma2/0.9 p99 1.05x -> 0.75x FCFS's. Trace seeds 0 / 1 / 2: average within
   15% of the oracle 99 / 102 / 103 -> 99 / 105 / 104 cells, p99 26 / 17 / 22 -> 35 / 23 / 24, TTFT
   unchanged, swap 31 / 22 / 31 -> 31 / 22 / 33; no count fell at any seed. Two ages per queue met
   p99 in 30 cells at seed 0, eight 32; the sub-ages in Q0 too: 99 / 106 / 106, p99 36 / 23 / 23,
   swap 29 / 21 / 30 (kept out: fewer swap cells). A cost: on the heavy-tailed 2,000-job trace
   (sim_heavy_tail_h200.json as committed then) the p99 went 1.30x -> 1.60x FCFS's while the
   average went 1.42x -> 1.31x the oracle's.
10. Every job ranked by the Gittins index per OUTPUT TOKEN at its own age, read on a grid: the
   Kaplan-Meier estimate F of output lengths (the last 256 finished jobs' generated tokens, live jobs
   censored at theirs; ``gittins.token_survival``), a decoding job's index at the grid age
   floor(``AGE_GRID``**k) at or below its generated tokens (``AGE_GRID`` = sqrt 2: two ages per
   doubling; equal grid ages keep the queue's FCFS), a job still prefilling at age 0 with its prompt
   left as known work (8b's rule, now in tokens). Queues, demotion, skip-join, the tail guard and
   the eviction gap (4, still by the queues' order of change 6) are unchanged. Found with the
   Gittins reference (``scheduler/gittins_ref.py``, same index on the true length distribution at
   every age): it met the average target in 110 cells, the MLFQ in 99, and the gap was bimodal with
   limited KV (1.17-1.31x against 1.10-1.13x). The reference with a learned distribution (256
   finished jobs, censored) or with an eviction gap lost nothing there, so the loss was the MLFQ's
   reading of the index: on attained service (the prompt's prefill blurs bimodal's short mode, which
   ends at 64 tokens while a 1,024-token prompt costs 45 tokens' worth), at 4 fixed ages per queue
   with thresholds a sub-quantum ahead, and not inside Q0. Trace seeds 0 / 1 / 2: average within 15%
   of the oracle 99 / 105 / 104 -> 108 / 108 / 111 cells (the reference: 110 / 110 / 111), TTFT
   unchanged (30 / 32 / 27), swap 31 / 22 / 33 -> 30 / 24 / 33, p99 35 / 23 / 24 -> 36 / 18 / 17:
   a trade: the p99 cells lost are mostly chat_a2.0 ones that sat at 0.96-1.00x FCFS's and went to
   1.01-1.20x (the finer order spreads the long jobs of a light tail). Heavy-tail trace
   (sim_heavy_tail_h200.json at 1a2a07c): average 1.31x -> 1.33x the oracle's, p99 1.60x -> 1.50x FCFS's.
   Variants measured at seeds 0 / 1 / 2 (average, p99): the index without a grid 108 / 104 / 111,
   30 / 13 / 17; a grid of 2**0.25 (seed 0) 107, 32; a grid of 2 105, 36; Q0 all at age 0 (FCFS
   in Q0) 107 / 108 / 111, 31 / 18 / 17; ages with fewer than 16
   jobs at risk taking the last index with 16 (as MIN_AT_RISK does for queues) 106 / 100 / 104,
   37 / 31 / 29 (swap 31 / 36 / 37, but chat_a0.8/limited at seed 1 went up to 1.84x the oracle and
   its FCFS/MLFQ TTFT ratio fell 2.5-5x), or capped at it 107 / 108 / 111, 32 / 17 / 19.
11. Length hints, for a deployment that has a length predictor (or clients that know): a job may
   carry ``length_hint``, its predicted output tokens (``Scheduler.add``, ``LLMEngine.add_request``,
   the server's ``length_hint`` field; without hints nothing changes: the seed-0 sweep is identical).
   A hinted job takes change 10's index on the Kaplan-Meier estimate of the lengths of finished jobs
   whose hint fell in its class (``HINT_CLASSES_PER_OCTAVE`` = 4 classes per doubling of the hint;
   the last ``HINT_WINDOW`` = 1024 hinted jobs, live ones censored; the nearest classes pooled until
   ``MIN_HINTED`` = 32 finished are in; the unhinted index before 32 hinted jobs finished): the
   distribution of the length GIVEN the hint, learned, so hints that say nothing give change 10's
   order back and exact ones SRPT to within a quarter doubling, whatever the predictor's bias.
   Between two hinted jobs KV makes room only for a job of at least ``HINT_EVICT_FACTOR`` = 2x the
   victim's index (queues, by attained service, say little about a hinted job's rank; with change 4's
   queue gap instead, chat_a0.8/limited/poisson/0.8 and cv4/0.9 at sigma 0.5 were 1.19x and 1.28x the
   oracle, against 1.08x and 1.17x). Measured with a synthetic predictor
   (``workload.add_length_hints``: the true length x exp(sigma N(0, 1)); at sigma 0.5 the hints' rank
   correlation with the lengths is 0.58 (chat_a2.0) to 0.84 (chat_a0.8), at sigma 1 0.35-0.66; the
   sweep's ``--hint-sigma``). Average within 15% of the oracle / p99 no worse than FCFS's / TTFT 5x /
   swap within 1.5x, at trace seeds 0 / 1 / 2, before the planner kept host copies (1a2a07c; kept in
   ``sweep_scheduler_seeds.json``, which also has the re-run with them): no hints 108 / 108 /
   111, 36 / 18 / 17, 30 / 32 / 27, 30 / 24 / 33; sigma 0.5 117 / 109 / 111, 24 / 16 / 14, 30 / 30 /
   27, 32 / 32 / 36; sigma 1 108 / 110 / 111, 26 / 13 / 19, 30 / 32 / 27, 32 / 32 / 39; exact hints
   (seed 0) 116, 24, 30, 29. Worst average over the oracle's: 1.41x / 1.54x / 1.47x without hints,
   1.27x / 1.47x / 1.33x at sigma 0.5. At seed 0 the 13 p99 cells lost (one gained) are all chat_a2.0
   ones that sat at 0.95-1.00x FCFS's and went to 1.005-1.06x: hints move the MLFQ toward SRPT, whose
   own p99 meets FCFS's in 24 cells. A poor predictor can cost: at sigma 1, seed 0,
   chat_a0.8/limited/poisson/0.9 went 1.22x -> 1.36x the oracle (small classes estimate a heavy tail
   from 32-64 jobs). Rejected: a ratio model (length = hint x R, R's Kaplan-Meier estimate per class,
   smoothed in log space), SRPT with exact hints (chat_a0.8/limited/poisson/0.8 1.05x) but at sigma
   0.5 the bimodal/limited cells went 1.11-1.14x -> 1.18-1.27x the oracle and chat_a2.0 p99 up to
   1.27x FCFS's (one R for every hint: up to 1.38x): it ignores the prior (a hint between bimodal's
   modes); one class per doubling (chat_a0.8/limited/cv4/0.9 at sigma 0.5 1.28x against 1.17x); eight
   (no better at sigma 0.5, worse in chat_a0.8 cells at sigma 1).
12. A calm system keeps its batch: while fewer than ``CALM_WAITING_SHARE`` x max_batch jobs wait (4 at
   batch 32; at least 1) and at least ``CALM_FREE_PAGES`` = a quarter of the device pages are free,
   the running jobs of the queues go before every waiting job (tail-class heads still first), so a
   newcomer takes the next slot that frees instead of preempting. A few waiting jobs get a slot within
   a few steps anyway, and each preemption stretches the job it stops, usually a long one that sets
   the p99: FCFS met all three targets in 17 cells (all at load 0.5), the MLFQ in 5 / 0 / 5 of them at
   seeds 0 / 1 / 2, its p99 1.002-1.12x FCFS's there (the sweep's ``all_three_in_one_cell``). Over the ten committed
   sweeps (seeds 0 / 1 / 2 without hints, with hints of sigma 0.5 and 1, exact hints at seed 0) the
   cells meeting each target went: average 1,106 -> 1,108, p99 215 -> 238, TTFT 295 -> 295, swap
   432 -> 435, all three in one cell 146 -> 154; without hints, seeds 0 / 1 / 2: average 108 / 108 /
   111 -> 109 / 108 / 111, p99 35 / 19 / 17 -> 39 / 21 / 20, all three 17 / 12 / 13 -> 18 / 14 / 13.
   A cost: at sigma 0.5, seed 0, chat_a0.8/limited/cv4/0.8 went 1.11x -> 1.33x the oracle (three
   short jobs can wait behind a full batch of long ones until a fourth arrives). Heavy-tail trace
   (``sim_heavy_tail_h200.json``): average 1.37x -> 1.33x the oracle's, p99 1.41x -> 1.44x FCFS's;
   with sigma-0.5 hints 1.32x -> 1.31x and 1.54x -> 1.41x. Without the page condition (scratch runs,
   seed 0: W = 2 / 4 / 8 / 16 jobs waiting met the average in 107 / 107 / 108 / 109 cells, p99 39 /
   43 / 44 / 46, TTFT 30 / 30 / 29 / 27) the heavy-tail p99 went 1.41x -> 1.59x: with scarce KV, jobs
   of 800-1,100 tokens preempted in a burst then waited behind longer running ones (a 918-token job
   34 s -> 49 s); with half the pages free as the condition, 1.48x.
13. An old running job keeps its slot: while at least ``CALM_FREE_PAGES`` of the device pages are free, a
   running job that has been in the system (arrival to now) longer than the ``PROTECT_QUANTILE`` = 95th
   percentile of the last 256 finished jobs' time in system (arrival to last batch) goes right after the
   tail-class heads. A new job preempts the running job of lowest index, and under heavy tails that is the
   oldest, the one about to set the p99; with ample KV keeping it costs a slot, not memory. Found after
   ``sweep_scheduler_pooled_boost.json`` showed that in the 62 cells where FCFS already meets the average
   target the MLFQ met FCFS's p99 in only 10: keeping every running job (calm with any number waiting, the
   tried list below) met p99 in 50 cells at seed 0 but cost 4 TTFT and 5 average cells; protecting only the
   oldest 5% costs far less. Trace seeds 0 / 1 / 2 (average / p99 / TTFT / swap / all three in one cell):
   average 109 / 108 / 111 -> 108 / 108 / 111 cells, p99 39 / 21 / 20 -> 45 / 28 / 34,
   TTFT 30 / 32 / 27 -> 29 / 30 / 27, swap 45 / 42 / 44 -> 46 / 42 / 44, all three 18 / 14 / 13 -> 20 / 14 / 17
   (the TTFT cells lost: chat_a0.8/ample/gamma2/0.9 at seeds 0 and 1, 5.1x -> 4.5x and 7.3x -> 4.7x FCFS's,
   where the p99 went 1.04x -> 1.00x and 1.11x -> 0.98x, and bimodal/ample/gamma4/0.7 at seed 1). With
   the three traces pooled (``sweep_scheduler_pooled.json``, a p99 of 2,400 jobs) the gain is smaller:
   average 109 -> 109, p99 28 -> 31, TTFT 31 -> 29, swap 44 -> 44 of 47, all three 16 -> 15.
   Heavy-tail trace: average 1.33x -> 1.32x the oracle's, p99 1.44x -> 1.38x FCFS's; with sigma-0.5
   hints 1.31x -> 1.29x and 1.41x -> 1.51x. Tried: the 90th percentile (seed 0: 107 / 49 / 27 / 21 all
   three), the 98th (108 / 42 / 29 / 19), any page share (105 / 45 / 27 / 17: holding a limited KV for old
   jobs costs TTFT, chat_a0.8/limited 94x -> 57x FCFS's); the threshold refreshed every 16 finishes
   instead of every finish (43 p99 cells).
   The counts in changes 1-7 were measured with the earlier, assumed GPU cost model.
Known limits (committed sweep, seed 0, 120 cells at load <= 0.9; with change 13, and since the planner
keeps host copies and parks device pages, ``kv_planner.py``): average JCT within 15% of the oracle in 108
(worst 1.38x, chat_a0.8/limited/cv4/0.9, a cell that moves by up to 0.09x when only swap costs change);
the 12 misses all have limited KV: 9 of chat_a0.8 (1.21-1.38x), one each of chat_a1.2, chat_a2.0 and
bimodal at cv4/0.9 (bimodal's at 1.16x). The Gittins
reference (``scheduler/gittins_ref.py``: the same index on the true length distribution at every
age, no quanta, guard or gap) meets 110 and misses nine chat_a0.8 cells and the chat_a1.2 one
too (1.16-1.30x): there a Pareto tail of index 0.8 gives an order that does not know each job's
length too little to go on (even the true remaining output below Q0 left the change-9 MLFQ at 1.16x
in chat_a0.8/limited/cv4/0.9); a length predictor is the way left (change 11: with hints of sigma
0.5, 118 cells at seed 0, 109 at seed 1, with change 13). Tried before change 10 for the
bimodal cells, none kept: the observed-service window at 512 or 1024 jobs (seed 0 average 100 / 103
cells, p99 32 / 30), evicting any lower-ranked job, no tail guard, 16 ages per queue with or without
Q0; partial eviction (only the pages a job lacks, from the end of a victim's KV) cut most limited-KV
cells' swap traffic (FCFS's by 10-20%) but not the MLFQ's ratio to FCFS's (31 swap cells either
way), took chat_a0.8/limited/poisson/0.7 1.20x -> 1.28x the oracle and met p99 in 32 cells instead
of 35. p99 no worse than FCFS's in 45 (worst 2.02x, chat_a2.0/limited/cv4/0.9, where the oracle's
is 2.20x; in 96 cells the oracle's own p99 is above FCFS's: short-first order makes long jobs wait);
TTFT 5x below FCFS's in 29 of 90 cells at load >= 0.7: 29 of the 34 where the prefill-first reference
(``scheduler/ttft_ref.py``: prompts left first, fewest first) is 5x below (the no-queueing floor, the
sweep's ``ttft_floor``, allowed 56; in the summarisation mix the reference reaches only 1.3-1.7x, the
MLFQ 1.5-1.7x); swap traffic within 1.5x FCFS's in 46 of 46 cells (30 before the planner's host
copies and parked pages). All three targets in one cell (the sweep's ``all_three_in_one_cell``): 20 / 14 /
17 cells at seeds 0 / 1 / 2, some policy of the five in 41 / 41 / 35.
Also tried, not kept (seed 0, before host copies): ranking a prefilling job with only the prompt beyond its first chunk
as known work (chat prompts then count as none): TTFT 30 -> 31 cells (chat_a1.2/limited/cv4/0.9
3.7x -> 5.6x) but p99 36 -> 28 and swap 30 -> 26 (new jobs preempt chat_a2.0's decoding ones).
Slot hysteresis (seed 0, with host copies and parked pages, before change 12): a running job's index counted F times, so
a waiting job displaces it only with F x its index. F = 1.5 / 2 / 3 / 8 / no preemption by index:
average 107 / 110 / 109 / 109 / 105 cells, p99 42 / 41 / 41 / 41 / 47, TTFT 30 / 29 / 28 / 28 / 25,
swap 46 of 46 each (the MLFQ's swap traffic -6% at F = 2, -26% with no preemption); F = 2 at seeds
1 / 2: average 108 / 110, p99 17 / 19, TTFT 32 / 27, swap 44 / 45 (against 108 / 111, 19 / 17,
32 / 27, 42 / 44), geometric-mean FCFS/MLFQ TTFT ratio 2-4% lower; heavy-tail trace 1.37x -> 1.32x
the oracle's average, p99 1.41x -> 1.45x FCFS's. Not kept: preemption is what buys TTFT in the
ample-KV cells at high load (chat_a0.8/ample/gamma2/0.9 5.4x FCFS's TTFT with it, 0.9x without) and
what costs their p99 (1.06x FCFS's with it, 1.04x without); of the nine p99 cells F = 2 gained at seed 0,
seven sat within 0.02x of 1.00 (a p99 of 800 jobs is the 8th slowest job), and it lost three from 0.83-0.95x.
Sparing new jobs (they and running jobs both counted 2x) gave TTFT back (30) and lost p99 (32).
(Both measured before change 12.)
Tried after change 12, none kept (scratch runs at trace seed 0; average / p99 / TTFT cells and all three in
one cell, against the committed 109 / 39 / 30 / 18): ``tail_slack`` 1 / 1.5 / 3: 107 / 42 / 30 / 18, 108 / 41 /
30 / 18, 110 / 37 / 30 / 18. Calm (change 12) also while the waiting jobs are no more than the running jobs
expected (Kaplan-Meier) to end within the next 8 / 16 / 32 output tokens: 108 / 44 / 30 / 18, 108 / 45 / 29 /
19, 107 / 44 / 29 / 20 (at 8 tokens, seeds 1 / 2: p99 21 -> 21 and 20 -> 24 cells), but the heavy-tail
trace's p99 went 1.44x -> 1.64x / 1.60x / 1.57x FCFS's. Every tail-class job a head while a quarter of the
pages is free: the summarisation mix's p99 1.23x -> 1.15x FCFS's (geometric mean) for average 109 -> 103
cells. An age guard (a waiting job older than the 98th percentile of finished jobs' JCT joins the tail
class): 103 / 41 / 29 / 17; with every tail-class job a head, 96 / 39 / 28 / 15 (99th percentile: 98 / 43 /
28 / 17). After gamma-Boost (Yu et al., "Strongly Tail-Optimal Scheduling in the Light-Tailed M/G/1", arXiv
2404.08826: FCFS on an arrival time moved earlier for small jobs): the arrival time minus
ln(1 / (1 - exp(-g s))) / g, with s = ``token_cost`` / the job's index (change 10) and
g = 1 / the mean excess of finished jobs' JCT over their 90th percentile: p99 39 -> 65 cells but average
78, TTFT 19, all three 7 (g halved: 84 / 61 / 22 / 12); the heavy-tailed limited-KV cells lose the most
(chat_a0.8/limited 1.22x -> 1.80x the oracle, geometric mean), and on the heavy-tail trace the p99 is still
1.17x FCFS's at 4.2x the oracle's average. Applied to chat_a2.0 only (a perfect light/heavy-tail detector),
all three in one cell 18 -> 19. g from the GI/G/1 Cramer-Lundberg equation on the observed interarrival
times and work was more FCFS-like and worse (bimodal/limited/gamma2/0.8 5.97 s against 2.38 s).
Calm (change 12) with up to 16 waiting jobs, or with any number while a quarter of the pages is free (an
ample-KV system then never preempts for new jobs): 106 / 45 / 27 / 19 and 104 / 50 / 26 / 21; the second
turned the ample-KV cells into FCFS (their TTFT ratio to FCFS's 1.8x -> 1.0x in chat_a0.8, 2.6x -> 1.0x in
bimodal, where the average went to 1.25-1.35x the oracle's at gamma4/0.8-0.9) and took the heavy-tail trace
to 1.35x the oracle's average and 1.51x FCFS's p99 (from 1.33x and 1.44x). New jobs first (fewest prompt
tokens left) and decoding jobs FCFS by their first token, while a quarter of the pages is free: 63 / 20 / 32
cells (chat_a2.0/ample/gamma4/0.9 2.97x the oracle: in bursts prefilling jobs take every slot).
After change 13, a regime detector (it learns the distribution, which the theorem below does not rule out): every 32
finishes, replay the last 256 jobs by arrival (finished ones, and live ones at their output so far) with
their true sizes, arrivals and final KV pages on a model of the batch (32 slots, the device pages, one
prefill at a time, decode steps from the cost model), under FCFS and under SRPT; while that ratio is at
most 1.03 at two evaluations in a row, serve FCFS. Offline, on whole seed-0 traces, the replay's FCFS /
SRPT tracked the simulator's FCFS / oracle within 0.1 below 1.3. In the MLFQ, seed 0: average 108 -> 102
cells, p99 45 -> 47, TTFT 29 -> 20 (at 1.02 and three in a row: 103 / 42 / 22). The ample-KV cells
it turned to FCFS ended within 1% of FCFS's p99 on either side (the first 128 jobs ran as the MLFQ),
and bimodal/limited flipped to FCFS in calm windows and then thrashed (1.13x -> 3.0x the oracle's
average); with finished jobs alone in the window (the short ones, under the MLFQ) the limited-KV chat
cells flipped too (average 92 cells). While calm (change 12), waiting jobs in arrival order (FCFS
among them; running and protected jobs as now): seeds 0 / 1 / 2 average 107 / 109 / 111, p99 46 / 34 / 33,
TTFT unchanged, all three 21 / 18 / 17; pooled 110 / 35 / 29 / 44, all three 15 -> 20. The cells gained
are mostly p99 ties: uncongested cells whose p99 sat 0.1-0.6% above FCFS's now equal it (the two
policies then serve identically). Not kept: on the heavy-tail trace the average went 1.32x -> 1.35x the
oracle's and the p99 1.38x -> 1.40x FCFS's (not analysed further). While calm, newcomers only (jobs
without their first token, waiting or running their prefill) in arrival order at one index, so that an
uncongested MLFQ serves exactly as FCFS (tested, then removed): seeds 0 / 1 / 2 average 108 / 108 / 111,
p99 48 / 35 / 25 (from 45 / 28 / 34), all three 23 / 19 / 15 (from 20 / 14 / 17); pooled 111 / 38 / 29 / 44,
all three 15 -> 22; heavy-tail trace unchanged (with sigma-0.5 hints 1.29x -> 1.31x the oracle's). Not kept:
the counts are p99 ties flipping (per mix, the geometric mean of the pooled p99 over FCFS's moved by under
0.5%: chat_a0.8 1.012 -> 1.016, bimodal 1.108 -> 1.105), while the summarisation mix, whose work is its
prefill, lost change 5's shortest-prompt-first in every calm spell: its average 1.035x -> 1.078x the
oracle's (geometric mean), at seed 2 summarise/poisson/0.5-0.8 1.01-1.03x -> 1.05-1.11x and their p99
0.96-1.00x -> 1.05-1.07x FCFS's. Newcomers waiting only (running prefills by the index): pooled p99 36, all
three 20, summarisation 1.045x; newcomers ordered by the doubling class of their expected work first: 33,
18, 1.052x. Arrival order near the end (for bimodal/limited, the one group where an order that knows sizes
is clearly ahead on the pooled geometric means: Boost 0.01 1.10x the oracle's average at 1.09x FCFS's p99,
the MLFQ 1.08x at 1.20x): at bimodal/limited/poisson/0.8, seed 0, the MLFQ had 21 long jobs started and
unfinished on average (every long job runs its first 64 tokens as a possible short one), 11 of them swapped
out, against 11.5 and 1.4 under Boost; the index then serves the long ones most attained first, so one that
got service early overtakes older ones, and the p99 was 26.3 s against Boost's 21.3 s. A decoding job whose
index at its grid age is at least its index a doubling earlier (rising: nearer its end) ranked by the index
rounded down to a power of sqrt 2 and by arrival within it: that cell 21.5 s; pooled, bimodal/limited 1.08x
-> 1.11x the oracle's average and 1.20x -> 1.14x FCFS's p99 (geometric means), the other groups within 0.01
on both but the p99 of chat_a0.8/limited (1.018x -> 1.025x) and chat_a2.0/limited (1.094x -> 1.082x); average within 15% in 109 -> 106 cells (four
bimodal/limited ones crossed 1.15x), p99 31 -> 30, TTFT 29 -> 30, all three 15 -> 16; heavy-tail trace
1.32x -> 1.33x the oracle's average and 1.38x -> 1.41x FCFS's p99. Rising against the previous grid age
instead (noisier): pooled 108 / 30 / 30, bimodal/limited 1.11x / 1.14x, chat_a0.8/limited p99 1.044x,
heavy-tail 1.36x / 1.44x; every decoding job by a sqrt-2 index class and arrival: 106 / 30 / 30, heavy-tail
1.32x / 1.43x. Not kept: a move along the average-p99 curve that costs average cells and meets no new p99
cell. This is the
trade-off Wierman and Zwart prove ("Is tail-optimal scheduling possible?", Operations Research 2012): no
work-conserving, non-anticipating policy that does not learn the size distribution optimises the response-time tail for
both light-tailed sizes (FCFS is optimal) and heavy-tailed ones (PS, SRPT); the sweep has both, and the p99
target is FCFS's.

Service is charged from the cost model, so decisions are deterministic (same inputs, same plans:
needed by multi-host lockstep and the simulator).
"""
from __future__ import annotations

import collections
import math

import numpy as np

from ferry.scheduler.cost_model import CostModel
from ferry.scheduler.gittins import (gittins_curve, index_from_curve, last_observed_age, survival, token_index,
                                     token_survival)
from ferry.scheduler.policy import Policy
from ferry.scheduler.request_state import Job, State

PRIOR_PROMPT_TOKENS = 256    # Q0 before any job finished: a 256-token prefill ...
PRIOR_DECODE_TOKENS = 32     # ... plus 32 output tokens (and the wait floor: 32 full-batch decode steps)
SERVICE_WINDOW = 256         # finished jobs kept for the observed service distribution
Q0_QUANTILE = 0.9            # Q0 quantum = this quantile of finished jobs' attained service
EVICT_GAP = 2                # a job's KV makes room only for a job at least this many queues higher
FLOOR_QUANTILE = 0.99        # tail-guard wait floor = this quantile of finished jobs' time in batches
MIN_SEEN_FOR_ORDER = 16      # finished jobs before the queue order follows the observed distribution
MIN_AT_RISK = 16             # jobs (finished or live) older than a queue's entry age needed to rank it
TAIL_HEADS = 1               # oldest tail-class jobs served before every queue; the rest keep their level
AGE_GRID = 2 ** 0.5          # a decoding job's index is read at grid age floor(AGE_GRID**k) <= its tokens (change 10)
HINT_WINDOW = 1024           # finished jobs with a length hint kept for the per-class estimates (change 11)
HINT_CLASSES_PER_OCTAVE = 4  # hint classes per doubling of the hint
MIN_HINTED = 32              # finished hinted jobs per estimate: a hint class pools its neighbours up to it
HINT_EVICT_FACTOR = 2.0      # between hinted jobs, KV makes room for a job of at least this x the index
CALM_WAITING_SHARE = 1 / 8   # calm (change 12): fewer than this x max_batch jobs wait (at least 1) ...
CALM_FREE_PAGES = 0.25       # ... and at least this fraction of the device pages is free
PROTECT_QUANTILE = 0.95      # change 13: a running job in the system longer than this quantile of finished
                             # jobs' time in system keeps its slot (while CALM_FREE_PAGES of the pages are free)


def sample_quantile(values, q: float) -> float:
    """The ``q`` quantile of a non-empty sample, no interpolation: its sorted value at floor(q (n - 1))."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def hint_class(hint: int) -> int:
    """Length-hint class (change 11): floor(HINT_CLASSES_PER_OCTAVE x log2(hint))."""
    return int(math.floor(HINT_CLASSES_PER_OCTAVE * math.log2(hint) + 1e-9))


class SkipJoinMLFQ(Policy):
    name = "mlfq"

    def __init__(self, cost_model: CostModel, num_queues: int = 6, base_quantum: float | None = None,
                 quantum_ratio: float = 2.0, starve_limit: float | None = None, max_batch: int = 1,
                 tail_slack: float = 2.0) -> None:
        super().__init__()
        if (num_queues < 1 or (base_quantum is not None and base_quantum <= 0) or quantum_ratio <= 1
                or (starve_limit is not None and starve_limit <= 0) or tail_slack <= 0 or max_batch < 1):
            raise ValueError("MLFQ needs num_queues >= 1, base_quantum > 0, quantum_ratio > 1, starve_limit > 0, "
                             "tail_slack > 0, max_batch >= 1")
        self.cost = cost_model
        self.num_queues = num_queues
        self.ratio = quantum_ratio
        self.fixed_q0 = base_quantum
        self.starve_limit = starve_limit
        self.tail_slack = tail_slack
        # One decode row's share of a full-batch decode step: the cost of one output token.
        self.token_cost = cost_model.token_cost(max_batch)
        self.calm_waiting = max(1, round(CALM_WAITING_SHARE * max_batch))
        self.calm = False                            # running jobs keep their slots (change 12), as of refresh()
        self.q0 = base_quantum if base_quantum is not None else (
            cost_model.per_prefill_token * PRIOR_PROMPT_TOKENS + self.token_cost * PRIOR_DECODE_TOKENS)
        self._floor_prior = cost_model.iteration_time(decode_rows=max_batch) * PRIOR_DECODE_TOKENS
        self.wait_floor = self._floor_prior
        # Rings of the last finished jobs (order does not matter: every reader sorts or sums them).
        self._attained_seen = collections.deque(maxlen=SERVICE_WINDOW)    # f64: their attained service
        self._tokens_seen = collections.deque(maxlen=SERVICE_WINDOW)      # int: their output lengths (tokens)
        self._served_seen = collections.deque(maxlen=SERVICE_WINDOW)      # f64: their time in batches
        self._hinted_seen = collections.deque(maxlen=HINT_WINDOW)         # (hint class, tokens) of hinted ones
        self._sojourn_seen = collections.deque(maxlen=SERVICE_WINDOW)     # f64: their arrival to last batch
        self.protect_after = math.inf                # change 13: time in system past which a running job stays
        self.protected: set[str] = set()             # running jobs that keep their slots, as of refresh()
        self.mean_decode = self.token_cost * PRIOR_DECODE_TOKENS
        self._seen = 0
        self.tail_promotions = 0
        self.queue_rank = list(range(num_queues))    # priority position of each queue (0 = served first)
        self.queue_index: list[float] | None = None  # each queue's Gittins index once ranked (None: FastServe)
        self.heads: set[str] = set()                  # tail-class jobs served first, as of the last refresh()
        self.token_F = None                           # F[t] = P(output > t), Kaplan-Meier, once ranked (job_index)
        self.hint_F: dict[int, np.ndarray] = {}       # hint class -> F of its jobs' lengths (change 11), once ranked
        self._index_cache: dict[tuple[int | None, int, int], float] = {}   # (hint class or None, age, prompt left)
        self._rank_stale = False                     # re-rank at the next refresh (live jobs are censored data)

    # ------------------------------------------------------------------ derived parameters
    @property
    def quanta(self) -> list[float]:
        """Attained service each queue holds a job for (the last queue: unbounded in effect)."""
        return [self.q0 * self.ratio ** i for i in range(self.num_queues)]

    def level(self, attained: float) -> int:
        """Queue of a job with ``attained`` service: queue i holds [q0 (r^i - 1)/(r - 1), q0 (r^(i+1) - 1)/(r - 1))."""
        if attained < self.q0:
            return 0
        i = int(math.log(attained / self.q0 * (self.ratio - 1) + 1, self.ratio) + 1e-9)
        return min(i, self.num_queues - 1)

    def wait_bound(self, job: Job) -> float:
        """Tail guard: the longest ``job`` waits (time since arrival outside a batch) before promotion."""
        return self.tail_slack * (job.served + max(job.ahead, 0.0) + self.wait_floor)

    def on_finish(self, job: Job) -> None:
        """Observed service distribution: Q0 = its Q0_QUANTILE (unless ``base_quantum`` fixes Q0), the wait
        floor = its FLOOR_QUANTILE; and the time in system past which a running job stays (change 13)."""
        self._attained_seen.append(job.attained)
        self._served_seen.append(job.served)
        self._sojourn_seen.append(job.last_run - job.arrival)
        self._tokens_seen.append(job.generated)
        self._seen += 1
        if job.length_hint is not None:
            self._hinted_seen.append((hint_class(job.length_hint), job.generated))
        if self._seen < 16 or self._seen % 16 == 0:
            if self.fixed_q0 is None:
                self.q0 = max(self.token_cost, sample_quantile(self._attained_seen, Q0_QUANTILE))
                self._rank_stale = self._seen >= MIN_SEEN_FOR_ORDER
            self.wait_floor = max(self._floor_prior / 4, sample_quantile(self._served_seen, FLOOR_QUANTILE))
            self.mean_decode = self.token_cost * sum(self._tokens_seen) / len(self._tokens_seen)
        if self._seen >= MIN_SEEN_FOR_ORDER:                 # every finish: a burst moves it fast
            self.protect_after = sample_quantile(self._sojourn_seen, PROTECT_QUANTILE)

    def rank_queues(self, live: list[Job]) -> list[int]:
        """Priority position of each queue: by the Gittins index at the queue's entry age (highest first,
        ties to the lower queue), from finished jobs' attained service with live jobs censored at theirs.
        A queue with fewer than MIN_AT_RISK jobs observed past its entry age keeps the index of the one
        above (ties keep FastServe's order). Also re-estimates ``token_F`` for ``job_index`` (change 10)."""
        censored = [j.attained for j in live]
        steps = survival(self._attained_seen, censored)
        index, prev = [], math.inf
        for i in range(self.num_queues):
            age, quantum = self.q0 * (self.ratio ** i - 1) / (self.ratio - 1), self.q0 * self.ratio ** i
            at_risk = sum(x > age for x in self._attained_seen) + sum(x > age for x in censored)
            curve = gittins_curve(steps, age, quantum=quantum) if at_risk >= MIN_AT_RISK else None
            prev = index_from_curve(curve) if curve is not None else prev
            index.append(prev)
        self.queue_index = index
        self.token_F = token_survival(self._tokens_seen, [j.generated for j in live])
        self.hint_F = self.hint_estimates(live)
        self._index_cache = {}
        by_priority = sorted(range(self.num_queues), key=lambda i: (-index[i], i))
        rank = [0] * self.num_queues
        for pos, i in enumerate(by_priority):
            rank[i] = pos
        return rank

    def hint_estimates(self, live: list[Job]) -> dict[int, np.ndarray]:
        """Per hint class (change 11): the Kaplan-Meier F of the output lengths of finished jobs whose
        hint fell in the class (live ones censored at their generated tokens), pooling the nearest
        classes on both sides until MIN_HINTED finished jobs are in; none before MIN_HINTED finished."""
        if len(self._hinted_seen) < MIN_HINTED:
            return {}
        live_rows = [(hint_class(j.length_hint), j.generated) for j in live if j.length_hint is not None]
        per_class = collections.Counter(k for k, _ in self._hinted_seen)
        out = {}
        for c in set(per_class) | {c for c, _ in live_rows}:
            width = 0
            while sum(n for k, n in per_class.items() if abs(k - c) <= width) < MIN_HINTED:
                width += 1
            out[c] = token_survival([n for k, n in self._hinted_seen if abs(k - c) <= width],
                                    [n for k, n in live_rows if abs(k - c) <= width])
        return out

    def job_index(self, job: Job, queue: int) -> float:
        """A job's priority (change 10): the Gittins index per output token (``gittins.token_index`` on
        ``token_F``) at the grid age floor(AGE_GRID**k) at or below its generated tokens; for a job still
        prefilling, at age 0 with the prompt left as known work first. A job with a length hint reads
        the same index on its hint class's F (``hint_F``, change 11) once that is estimated. FastServe's
        order (-queue) before the queues are ranked."""
        if self.queue_index is None:
            return -queue
        left = job.prompt_left
        cls = hint_class(job.length_hint) if self.hinted(job) else None
        F = self.token_F if cls is None else self.hint_F[cls]
        age = 0
        if left == 0 and job.generated >= 1:
            age = int(AGE_GRID ** math.floor(math.log(job.generated, AGE_GRID) + 1e-9))
        age = last_observed_age(F, age)       # older than every observation at the last rank
        key = (cls, age, left)
        if key not in self._index_cache:
            known = self.cost.per_prefill_token * left / self.token_cost
            self._index_cache[key] = token_index(F, age, known=known)
        return self._index_cache[key]

    def service(self, job: Job) -> float:
        """What the quanta measure: own work (derived Q0) or, with a fixed ``base_quantum``, FastServe's
        iteration seconds spent in batches (the engine's historical setting keeps its meaning)."""
        return job.attained if self.fixed_q0 is None else job.served

    def join_queue(self, prompt_len: int) -> int:
        """Skip-join: the queue the job is in once its prefill (known from the prompt) is done."""
        if self.fixed_q0 is not None:
            return self.level(self.cost.prefill_time(prompt_len))
        return self.level(self.cost.per_prefill_token * prompt_len)

    # ------------------------------------------------------------------ policy hooks
    def on_add(self, job: Job, now: float) -> None:
        super().on_add(job, now)
        job.queue = self.join_queue(job.prompt_len)
        job.used = job.attained = job.served = 0.0

    def expected_left(self, job: Job) -> float:
        """Cost-model seconds of work ``job`` is expected to still need: its prompt left to prefill
        plus the mean decode service of finished jobs beyond what it has generated."""
        return (self.cost.per_prefill_token * job.prompt_left
                + max(0.0, self.mean_decode - self.token_cost * job.generated))

    def measure_ahead(self, jobs: list[Job]) -> None:
        """``ahead`` of each job not measured yet: the expected work left of the jobs that arrived
        before it (what it would wait for under FCFS), at its first refresh."""
        if all(j.ahead >= 0 for j in jobs):
            return
        total = 0.0
        for j in self.fcfs_order(jobs):
            if j.ahead < 0:
                j.ahead = total
            total += self.expected_left(j)

    @staticmethod
    def fcfs_order(jobs: list[Job]) -> list[Job]:
        """Jobs by arrival, equal arrivals in the order they were added (``jobs`` is; a stable sort, as
        FCFS's): request ids do not order ("10" < "9"; found by the hypothesis tail-guard test)."""
        return sorted(jobs, key=lambda j: j.arrival)

    def refresh(self, jobs: list[Job], now: float, free_page_share: float = 0.0) -> None:
        waiting = sum(j.state != State.RUNNING for j in jobs)
        self.calm = waiting < self.calm_waiting and free_page_share >= CALM_FREE_PAGES     # change 12
        self.protected = {j.rid for j in jobs if j.state == State.RUNNING and j.queue >= 0 and      # change 13
                          now - j.arrival > self.protect_after} if free_page_share >= CALM_FREE_PAGES else set()
        self.measure_ahead(jobs)
        if self._rank_stale:
            self.queue_rank, self._rank_stale = self.rank_queues(jobs), False
        for j in jobs:
            if j.state == State.RUNNING or j.queue < 0:
                continue
            if now - j.arrival - j.served > self.wait_bound(j):
                j.tail_from = j.queue
                j.queue, j.enqueued = -1, j.arrival          # tail class: above every queue, by arrival
                self.tail_promotions += 1
                self.promotions += 1
            elif self.starve_limit is not None and j.queue > 0 and now - j.last_run >= self.starve_limit:
                j.queue, j.enqueued, j.last_run = 0, now, now
                self.promotions += 1
        tail = self.fcfs_order([j for j in jobs if j.queue < 0])
        self.heads = {j.rid for j in tail[:TAIL_HEADS]}   # the oldest: served before every queue

    def order(self, jobs: list[Job]) -> list[Job]:
        """Tail-class heads, then the ``protected`` running jobs (change 13, by the order below), then (while
        ``calm``, change 12) the other running jobs of the queues, then every other job by its index
        (change 10), queue, prompt left and entry into the queue."""
        def key(j: Job):
            if j.queue >= 0:
                kept = 0 if self.calm and j.state == State.RUNNING else 1
                old = -0.5 if j.rid in self.protected else 0          # change 13: after the heads (-1)
                return (-j.priority, old, kept, -self.job_index(j, j.queue), j.queue, 0, j.prompt_left, j.enqueued,
                        j.arrival)
            if j.rid in self.heads:
                return (-j.priority, -1, 0, 0.0, 0, 0, 0, j.arrival, j.arrival)
            return (-j.priority, 0, 1, -self.job_index(j, j.tail_from), j.tail_from, -1, 0, j.arrival, j.arrival)
        return sorted(jobs, key=key)

    def on_served(self, job: Job, seconds: float, now: float) -> None:
        job.last_run = now
        job.served += seconds
        prefilled = min(job.num_computed, job.prompt_len) if job.generated == 0 else job.prompt_len
        job.attained = max(job.attained, self.cost.per_prefill_token * prefilled + self.token_cost * job.generated)
        job.used = self.service(job)
        if job.queue < 0:
            return
        lvl = self.level(job.used)
        if lvl > job.queue:
            job.queue, job.enqueued = lvl, now
            self.demotions += 1

    def may_evict(self, victim: Job, for_job: Job) -> bool:
        """Only a job at least EVICT_GAP places lower in the queue order loses its KV; a tail-class head
        may take anyone's, another tail-class job evicts as a job of the level it left, and tail-class
        jobs keep theirs."""
        if for_job.queue < 0 and for_job.rid in self.heads:
            return True
        if victim.queue < 0:
            return False
        mine = for_job.tail_from if for_job.queue < 0 else for_job.queue
        if self.hinted(victim) and self.hinted(for_job):
            return self.job_index(for_job, mine) >= HINT_EVICT_FACTOR * self.job_index(victim, victim.queue)
        return self.queue_rank[victim.queue] >= self.queue_rank[mine] + EVICT_GAP

    def hinted(self, job: Job) -> bool:
        """Is ``job`` ranked by its length hint (change 11)?"""
        return job.length_hint is not None and hint_class(job.length_hint) in self.hint_F

    def queue_stats(self, waiting: list[Job]) -> dict[str, int]:
        counts = {f"waiting_q{i}": 0 for i in range(self.num_queues)}
        counts["waiting_tail"] = 0
        for j in waiting:
            counts["waiting_tail" if j.queue < 0 else f"waiting_q{j.queue}"] += 1
        return counts
