"""The floor of guarded calls on PostgreSQL, by the shape of the group commit (issue 8, target 4).

`bench/guard.py` compares the tracker with raw asyncpg making each call's two commits on its own
connection. The tracker does better than that at p99 by group commit: the reservations waiting go
in one statement, and the ledger writes (which settle them) in another, each on its own connection
(a lane). The two statements lock the same rows (the global window's above all), each until its
commit's WAL flush, so they take turns: a cycle of the two lanes is two flushes.

This measures, by raw asyncpg with no tracker, the same load (16 calls in flight, each a
reservation, a provider call of a random 10-30 ms, and a settlement) under two shapes:

- "2 lanes": the tracker's shape. One connection group-commits the reservations waiting (one
  statement: lock the windows in key order, check each reservation against its limit after those
  before it, add, insert the reservation rows), another the settlements waiting (one statement:
  insert the ledger rows, delete the reservations, add spent and take back reserved in every
  window).
- "1 statement": one connection, one statement per cycle doing both: the settlements' increments
  and the reservations' checks computed together, each window updated once with the net change
  (PostgreSQL cannot update a row twice in one statement), one flush for both.
- "async reserve": the 2 lanes, the reservations' connection with `synchronous_commit = off`: a
  reservation is visible to every check at once but durable only once a later commit (the next
  settlement) or the WAL writer flushes it, so it holds its rows for its statement only. Measured
  to show what that trade would buy; llm-spend does not make it (docs/performance.md).
- "unlocked settle": settlements that lock no window: each inserts its ledger rows, deletes its
  reservations and leaves its windows' changes in a table (`floor_pending`), on any of three
  connections that is free; the reservations' statement folds the changes waiting for the windows it
  locks before it checks them. It shows what the lock the two lanes share costs them (thirtieth
  session: little); llm-spend does not do it (the rollups would lag behind the ledger).

All check limits exactly; the windows exist beforehand. Each round runs the shapes in turn, in an
order that rotates, so a slow moment of the machine hits all; the p50 and p99 of what the two
commits add to each call are printed per round, then the median of the per-round ratios to the 2
lanes' p50.

Run: .venv/bin/python bench/pg_cycles.py [rounds]
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from guard import CALLS, CONCURRENCY, FLOOR_USERS, drop, floor_tables, percentile, pg_database
from sqlalchemy.engine import make_url

DAY_AMOUNT, COST = 1_000_000, 900_000  # a reservation, and what the call turned out to cost

# $1-$3: the reservations' (window, its position in the batch, amount); $4-$5: their rows
_WANT = "SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[]) AS x(k, j, amount)"
_KEEP = "INSERT INTO floor_reservations (id, amount) SELECT * FROM unnest($4::text[], $5::bigint[])"
_LOCKED = f"""WITH want AS ({_WANT}),
locked AS (
    SELECT w.k, w.spent + w.reserved AS used, w.lim FROM floor_windows w
    WHERE w.k IN (SELECT k FROM want) ORDER BY w.k COLLATE "C" FOR UPDATE
),
"""
"""How a reservation statement starts: what it wants, and the windows it locks, in key order."""

RESERVE = f"""
{_LOCKED}checked AS (
    SELECT l.used + sum(x.amount) OVER (PARTITION BY x.k ORDER BY x.j) <= l.lim AS ok
    FROM want x JOIN locked l USING (k)
),
verdict AS (SELECT coalesce(bool_and(ok), false) AS ok FROM checked),
granted AS (
    UPDATE floor_windows w SET reserved = w.reserved + t.amount
    FROM (SELECT k, sum(amount)::bigint AS amount FROM want GROUP BY k) t
    WHERE w.k = t.k AND (SELECT ok FROM verdict) RETURNING 1
),
kept AS ({_KEEP} WHERE (SELECT ok FROM verdict) RETURNING 1)
SELECT (SELECT ok FROM verdict), (SELECT count(*) FROM kept)
"""


def _settled(p: int) -> str:
    """The settlements' CTEs, their parameters from $p: the calls' (event id, cost), then per call and
    window (window, event id, whether the window held the call's reservation). A batch holds each
    call once here (the tracker's statement also counts a call sent twice in one batch once)."""
    return f"""
ledger AS (
    INSERT INTO floor_ledger (event_id, cost) SELECT * FROM unnest(${p}::text[], ${p + 1}::bigint[])
    ON CONFLICT (event_id) DO NOTHING RETURNING event_id, cost
),
released AS (DELETE FROM floor_reservations WHERE id = ANY(${p}::text[]) RETURNING id, amount),
d AS (
    SELECT x.k, coalesce(sum(n.cost), 0)::bigint AS spent,
           -coalesce(sum(r.amount) FILTER (WHERE x.held), 0)::bigint AS reserved
    FROM unnest(${p + 2}::text[], ${p + 3}::text[], ${p + 4}::bool[]) AS x(k, id, held)
        LEFT JOIN ledger n ON n.event_id = x.id LEFT JOIN released r ON r.id = x.id
    GROUP BY x.k
)"""


def _checked(changes: str) -> str:
    """The check of each reservation against its windows once the changes (k, spent, reserved) of the
    CTE `changes` are made, and the verdict on all of them."""
    return f"""checked AS (
    SELECT l.used + coalesce({changes}.spent + {changes}.reserved, 0)
           + sum(x.amount) OVER (PARTITION BY x.k ORDER BY x.j) <= l.lim AS ok
    FROM want x JOIN locked l USING (k) LEFT JOIN {changes} USING (k)
),
verdict AS (SELECT coalesce(bool_and(ok), false) AS ok FROM checked)"""


SETTLE = f"""
WITH {_settled(1)}
INSERT INTO floor_windows AS w (k, spent, reserved, lim)
SELECT k, spent, reserved, 0 FROM d ORDER BY k COLLATE "C"
ON CONFLICT (k) DO UPDATE SET spent = w.spent + excluded.spent, reserved = w.reserved + excluded.reserved
"""

BOTH = f"""
WITH want AS ({_WANT}),
{_settled(6)},
locked AS (
    SELECT w.k, w.spent + w.reserved AS used, w.lim FROM floor_windows w
    WHERE w.k IN (SELECT k FROM want UNION SELECT k FROM d) ORDER BY w.k COLLATE "C" FOR UPDATE
),
{_checked("d")},
net AS (
    SELECT l.k, coalesce(d.spent, 0) AS spent,
           coalesce(d.reserved, 0) + CASE WHEN (SELECT ok FROM verdict) THEN coalesce(t.amount, 0) ELSE 0 END
               AS reserved
    FROM locked l LEFT JOIN d USING (k)
        LEFT JOIN (SELECT k, sum(amount)::bigint AS amount FROM want GROUP BY k) t USING (k)
),
bumped AS (
    UPDATE floor_windows w SET spent = w.spent + net.spent, reserved = w.reserved + net.reserved
    FROM net WHERE w.k = net.k RETURNING 1
),
kept AS ({_KEEP} WHERE (SELECT ok FROM verdict) RETURNING 1)
SELECT (SELECT ok FROM verdict), (SELECT count(*) FROM kept), (SELECT count(*) FROM bumped)
"""


SETTLE_UNLOCKED = f"""
WITH {_settled(1)}
INSERT INTO floor_pending (k, spent, reserved) SELECT k, spent, reserved FROM d
"""

RESERVE_FOLDING = f"""
{_LOCKED}folded AS (
    DELETE FROM floor_pending p WHERE p.k IN (SELECT k FROM locked) RETURNING p.k, p.spent, p.reserved
),
f AS (SELECT k, sum(spent)::bigint AS spent, sum(reserved)::bigint AS reserved FROM folded GROUP BY k),
{_checked("f")},
granted AS (
    UPDATE floor_windows w SET spent = w.spent + coalesce(f.spent, 0),
        reserved = w.reserved + coalesce(f.reserved, 0)
            + CASE WHEN (SELECT ok FROM verdict) THEN t.amount ELSE 0 END
    FROM (SELECT k, sum(amount)::bigint AS amount FROM want GROUP BY k) t LEFT JOIN f USING (k)
    WHERE w.k = t.k RETURNING 1
),
kept AS ({_KEEP} WHERE (SELECT ok FROM verdict) RETURNING 1)
SELECT (SELECT ok FROM verdict), (SELECT count(*) FROM kept)
"""

PENDING = (
    "DROP TABLE IF EXISTS floor_pending;"
    " CREATE TABLE floor_pending (k text NOT NULL, spent bigint NOT NULL, reserved bigint NOT NULL);"
    " CREATE INDEX ON floor_pending (k)"
)
SETTLERS = 3


class Reserve:
    __slots__ = ("done", "event", "keys")

    def __init__(self, event: str, keys: Sequence[str], done: asyncio.Future[None]) -> None:
        self.event, self.keys, self.done = event, keys, done


class Settle(Reserve):
    __slots__ = ("held",)

    def __init__(
        self, event: str, keys: Sequence[str], held: Sequence[str], done: asyncio.Future[None]
    ) -> None:
        super().__init__(event, keys, done)
        self.held = held


def _reserve_args(batch: Sequence[Reserve]) -> list[Any]:
    keys, positions, amounts = [], [], []
    for j, item in enumerate(batch):
        for key in item.keys:
            keys.append(key)
            positions.append(j)
            amounts.append(DAY_AMOUNT)
    return [keys, positions, amounts, [item.event for item in batch], [DAY_AMOUNT] * len(batch)]


def _settle_args(batch: Sequence[Settle]) -> list[Any]:
    keys, ids, held = [], [], []
    for item in batch:
        for key in item.keys:
            keys.append(key)
            ids.append(item.event)
            held.append(key in item.held)
    return [[item.event for item in batch], [COST] * len(batch), keys, ids, held]


class Lane:
    """Group commit on one connection: what waits while a statement runs goes in the next one."""

    def __init__(self, conn: asyncpg.Connection, combined: bool, reserve: str = RESERVE) -> None:
        self.conn, self.combined, self.reserve = conn, combined, reserve
        self.reserves: list[Reserve] = []
        self.settles: list[Settle] = []
        self.task: asyncio.Task[None] | None = None

    def put(self, item: Reserve) -> asyncio.Future[None]:
        (self.settles if isinstance(item, Settle) else self.reserves).append(item)  # type: ignore[arg-type]
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.drain())
        return item.done

    async def drain(self) -> None:
        try:
            while self.reserves or self.settles:
                reserves, settles = self.reserves, self.settles
                self.reserves, self.settles = [], []
                if self.combined and reserves and settles:
                    ok, kept, _ = await self.conn.fetchrow(
                        BOTH, *_reserve_args(reserves), *_settle_args(settles)
                    )
                    assert ok and kept == len(reserves), "a reservation was refused"
                else:
                    if settles:
                        await self.conn.execute(SETTLE, *_settle_args(settles))
                    if reserves:
                        ok, kept = await self.conn.fetchrow(self.reserve, *_reserve_args(reserves))
                        assert ok and kept == len(reserves), "a reservation was refused"
                for item in (*settles, *reserves):
                    item.done.set_result(None)
        finally:
            self.task = None


class Settlers:
    """Unlocked settlements on whichever of several connections is free (they lock no shared row)."""

    def __init__(self, conns: Sequence[asyncpg.Connection]) -> None:
        self.idle = list(conns)
        self.settles: list[Settle] = []

    def put(self, item: Settle) -> asyncio.Future[None]:
        self.settles.append(item)
        if self.idle:
            asyncio.get_running_loop().create_task(self.drain(self.idle.pop()))
        return item.done

    async def drain(self, conn: asyncpg.Connection) -> None:
        try:
            while self.settles:
                settles, self.settles = self.settles, []
                await conn.execute(SETTLE_UNLOCKED, *_settle_args(settles))
                for item in settles:
                    item.done.set_result(None)
        finally:
            self.idle.append(conn)


SHAPES = ("2 lanes", "1 statement", "async reserve", "unlocked settle")


async def cycle_times(
    url: str,
    shape: str,
    provider: tuple[float, float] = (0.010, 0.030),
    concurrency: int = CONCURRENCY,
    calls: int = CALLS,
) -> list[float]:
    """Seconds the two commits add to each call, with `concurrency` calls in flight, each provider
    call a sleep of a random `provider` seconds."""
    parsed = make_url(url)
    connect = dict(host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database)
    setup = await asyncpg.connect(**connect)
    lanes: list[asyncpg.Connection] = []
    try:
        await floor_tables(setup)
        await setup.execute(PENDING)
        combined, unlocked = shape == "1 statement", shape == "unlocked settle"
        lanes = [
            await asyncpg.connect(**connect)
            for _ in range(1 if combined else 1 + SETTLERS if unlocked else 2)
        ]
        if shape == "async reserve":
            await lanes[0].execute("SET synchronous_commit = off")
        for conn in lanes:  # parsed and planned before the load, as the tracker's are (`warm`)
            for sql, n in ((RESERVE, 5), (SETTLE, 5), (BOTH, 10), (RESERVE_FOLDING, 5), (SETTLE_UNLOCKED, 5)):
                await conn.execute(sql, *[()] * n)
        reserving = Lane(lanes[0], combined, RESERVE_FOLDING if unlocked else RESERVE)
        settling: Lane | Settlers = (
            reserving if combined else Settlers(lanes[1:]) if unlocked else Lane(lanes[1], False)
        )
        added: list[float] = []
        rng = random.Random(7)

        async def worker(n: int) -> None:
            loop = asyncio.get_running_loop()
            for i in range(calls // concurrency):
                wait, user = rng.uniform(*provider), f"u{(n * 7 + i) % FLOOR_USERS}"
                day = sorted(["day:", f"day:{user}"])
                event = uuid.uuid4().hex
                started = time.perf_counter()
                await reserving.put(Reserve(event, day, loop.create_future()))
                reserved = time.perf_counter()
                await asyncio.sleep(wait)
                answered = time.perf_counter()
                every = sorted([*day, "month:", f"month:{user}"])
                await settling.put(Settle(event, every, day, loop.create_future()))
                added.append((reserved - started) + (time.perf_counter() - answered))

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        spent, reserved = await setup.fetchrow(  # with the changes an unlocked settle left unfolded
            "SELECT w.spent + coalesce(sum(p.spent), 0), w.reserved + coalesce(sum(p.reserved), 0)"
            " FROM floor_windows w LEFT JOIN floor_pending p USING (k) WHERE w.k = 'day:'"
            " GROUP BY w.spent, w.reserved"
        )
        assert (spent, reserved) == (calls * COST, 0), (spent, reserved)  # every call settled, once
        return added
    finally:
        for conn in (*lanes, setup):
            await conn.close()


def main(rounds: int) -> None:
    pg = asyncio.run(pg_database())
    if pg is None:
        print("pg_cycles: no PostgreSQL server answers, skipped")
        return
    print(f"guarded-call floor on PostgreSQL by raw asyncpg, {CONCURRENCY} in flight, provider 10-30 ms")
    print("  round" + "".join(f"{shape + ' p50':>20}{'p99':>8}" for shape in SHAPES))
    ratios: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    try:
        for n in range(rounds):
            cells = {}
            for shape in SHAPES[n % len(SHAPES) :] + SHAPES[: n % len(SHAPES)]:  # an order that rotates
                added = asyncio.run(cycle_times(pg[0], shape))
                p50 = statistics.median(added) * 1e3
                ratios[shape].append(p50)
                cells[shape] = f"{p50:>20.2f}{percentile(added, 0.99) * 1e3:>8.2f}"
            print(f"  {n + 1:<5}" + "".join(cells[shape] for shape in SHAPES))
    finally:
        asyncio.run(drop(pg[1]))
    base = ratios["2 lanes"]
    for shape in SHAPES[1:]:
        paired = [p50 / b for p50, b in zip(ratios[shape], base, strict=True)]
        print(f"  {shape} / 2 lanes, p50, median of the rounds' ratios: {statistics.median(paired):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
