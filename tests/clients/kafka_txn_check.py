#!/usr/bin/env python3
"""Kafka transactions seen by librdkafka (confluent-kafka): commits, aborts,
a zombie fenced by a newer instance, a transaction the broker has to abort
on its own (transaction.timeout.ms), and a consume-transform-produce loop
that must turn every input record into exactly one output record.

usage:
  kafka_txn_check.py basic BOOTSTRAP PREFIX
  kafka_txn_check.py ctp-seed BOOTSTRAP IN PARTITIONS FROM COUNT
  kafka_txn_check.py ctp BOOTSTRAP IN OUT GROUP STATEFILE [--follow] [--deadline-s S]
  kafka_txn_check.py ctp-verify BOOTSTRAP IN OUT [GROUP]
Each mode prints one JSON summary line and exits 1 on a mismatch.

basic: topic PREFIX (created with 3 partitions unless it exists). Every
value is "<kind>-t<txn>-<seq>", seq counting up over the whole run and the
partition seq % 3, so order and placement are checked from the value alone:
  1. transactional.id PREFIX-txn commits 10 transactions of 30 records and
     aborts 5 (kind commit / abort; an aborted one is flushed first, so its
     records are in the log).
  2. It opens one more (kind zombie, flushed); a second producer with the
     same transactional.id calls init_transactions (fencing the first and
     aborting its transaction) and commits one (kind fencer). The first then
     produces again (kind zlate) and commits: that must fail with a fatal
     error, reported as `fenced_error` (its name: _FENCED, PRODUCER_FENCED or
     INVALID_PRODUCER_EPOCH), and no zlate record may be stored.
  3. A child process (transactional.id PREFIX-hung, transaction.timeout.ms
     6000) opens a transaction over all partitions, flushes (kind hung) and
     is killed with SIGKILL: only the broker can end that transaction. The
     fencer then commits one more (kind after). A read_committed consumer
     must not see it before 60 % of the timeout (`hung_blocked`), and must
     see it once the broker has aborted the hung one (`hung_released_s`).
  4. Fresh consumers read everything: read_committed exactly the commit,
     fencer and after records, once each, in order per partition;
     read_uncommitted every record delivered (aborted ones too) and none
     other. A control record surfacing as a message counts as unexpected.
  A produce outside a transaction is not tried: librdkafka refuses it itself.
  `committed_by_partition` lists the committed values per partition in
  order, for a reader of another protocol to compare with.

ctp-seed: writes COUNT records "in-<n>" (n from FROM, partition n % PARTITIONS)
  to IN with an idempotent producer (creates IN unless it exists).
ctp: consumes IN read_committed in group GROUP and, per batch, produces
  f(value) = "f(" + value + ")" to OUT (same partition, same key) in one
  transaction (transactional.id GROUP-ctp) with send_offsets_to_transaction,
  then commits. An abortable error aborts and rewinds to the group's
  committed offsets; a fatal one (e.g. fenced after the broker aborted an open
  transaction) makes a new producer (its init_transactions aborts what was
  open) and rewinds. Ends when the group's committed offsets reach the ends
  of IN (unless --follow), on SIGTERM (after the current transaction) or at
  --deadline-s. Resumable: a restart starts from the group's committed
  offsets. A transactional call still blocked after 60 s (librdkafka can
  hang in one when the node dies under it) is given up like a fatal error:
  the stuck producer is abandoned to its thread (`stuck` counts them).
  STATEFILE keeps counts over all runs: {"runs", "transactions", "records",
  "aborts", "fatal_recoveries", "rewinds", "stuck", "errors"}.
ctp-verify: reads IN and OUT read_committed: per partition OUT must equal
  f() of IN in order (each input's result exactly once); with GROUP, the
  group's committed offsets must be the ends of IN. OUT is read
  read_uncommitted too: `aborted_outputs` counts results that aborted
  transactions left in the log.
"""
import argparse
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict

from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer,
                             TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic

PARTITIONS = 3
COMMITS, ABORTS, PER_TXN = 10, 5, 30
HUNG_TIMEOUT_MS = 6000
# Longest a transactional call of the ctp loop may block (its own timeout is 30 s).
STUCK_S = 60
FENCED_NAMES = ("_FENCED", "PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH")
# Connection errors while the node is away are expected, not reported.
TRANSIENT = (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE,
             KafkaError._TIMED_OUT)


def fatal(err):
    # A call refused because the producer already failed fatally answers _FATAL.
    return err.fatal() or err.code() == KafkaError._FATAL


class Stuck(Exception):
    """A librdkafka call that did not return in time."""


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ensure_topic(bootstrap, topic, partitions):
    """Creates `topic` unless it exists; returns its partition ids. (Metadata
    for all topics: asking for this one alone could auto-create it with the
    node's default partition count.)"""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 60
    while True:
        try:
            meta = admin.list_topics(timeout=10).topics.get(topic)
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
                try:
                    f.result(timeout=30)
                except KafkaException as e:
                    if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
        except KafkaException as e:
            if time.monotonic() > deadline:
                raise
            log(f"ensure_topic {topic}: {e}")
            time.sleep(0.5)


def end_offsets(bootstrap, topic, partitions):
    """The high watermark of each partition (read_uncommitted: the log's end)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "txn-check-ends",
                  "isolation.level": "read_uncommitted"})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=30, cached=False)[1]
                for p in partitions}
    finally:
        c.close()


def read_all(bootstrap, topic, isolation, deadline_s=60):
    """Every message of `topic` from the beginning, by assignment (no group):
    {partition: [(offset, key, value)]} in the order read, and whether each
    partition was read to the log's end (for read_committed: the LSO reached
    it, i.e. no transaction was left open)."""
    partitions = ensure_topic(bootstrap, topic, PARTITIONS)
    ends = end_offsets(bootstrap, topic, partitions)
    c = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"txn-check-read-{isolation}",
        "isolation.level": isolation,
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "fetch.wait.max.ms": 100,
    })
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    got = defaultdict(list)
    reached = {p: ends[p] == 0 for p in partitions}
    deadline = time.monotonic() + deadline_s
    while not all(reached.values()) and time.monotonic() < deadline:
        for m in c.consume(num_messages=1000, timeout=0.5):
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    # The EOF offset is the end the fetch saw (read_committed:
                    # the last stable offset).
                    if m.offset() >= ends[m.partition()]:
                        reached[m.partition()] = True
                elif m.error().code() not in TRANSIENT:
                    log(f"read {topic} {isolation}: {m.error()}")
                continue
            got[m.partition()].append((m.offset(), m.key(), m.value()))
            if m.offset() + 1 >= ends[m.partition()]:
                reached[m.partition()] = True
    c.close()
    return got, all(reached.values())


# ---------------------------------------------------------------- basic

class Basic:
    def __init__(self, bootstrap, prefix):
        self.bootstrap = bootstrap
        self.topic = prefix
        self.txn_id = f"{prefix}-txn"
        self.seq = 0
        self.produced = {}  # value -> kind, every value handed to a producer
        self.delivered = set()
        self.delivery_errors = []
        self.zlate_errors = []
        self.fatal = defaultdict(list)  # producer name -> fatal errors from error_cb

    def producer(self, name, txn_id, **extra):
        def on_error(err):
            if err.fatal():
                self.fatal[name].append(err)
            elif err.code() not in TRANSIENT:
                log(f"{name}: {err}")
        conf = {"bootstrap.servers": self.bootstrap, "transactional.id": txn_id,
                "linger.ms": 5, "error_cb": on_error}
        conf.update(extra)
        return Producer(conf)

    def produce(self, p, kind, txn, n):
        def delivered(err, msg):
            v = msg.value().decode()
            if err is None:
                self.delivered.add(v)
            elif kind == "zlate":
                self.zlate_errors.append(err.name())
            else:
                self.delivery_errors.append(f"{v}: {err}")
        for _ in range(n):
            s = self.seq
            self.seq += 1
            v = f"{kind}-t{txn}-{s:06d}"
            self.produced[v] = kind
            while True:
                try:
                    p.produce(self.topic, key=kind.encode(), value=v.encode(),
                              partition=s % PARTITIONS, on_delivery=delivered)
                    break
                except BufferError:
                    p.poll(0.05)

    def run(self):
        out = {}
        parts = ensure_topic(self.bootstrap, self.topic, PARTITIONS)
        assert parts == list(range(PARTITIONS)), f"{self.topic} has partitions {parts}"

        # 1. Commits and aborts.
        p1 = self.producer("p1", self.txn_id)
        p1.init_transactions(60)
        txn = 0
        for t in range(COMMITS + ABORTS):
            abort = t % 3 == 1
            p1.begin_transaction()
            self.produce(p1, "abort" if abort else "commit", txn, PER_TXN)
            if abort:
                assert p1.flush(30) == 0, "aborted records not flushed"
                p1.abort_transaction(30)
            else:
                p1.commit_transaction(30)
            txn += 1
        out["committed_txns"], out["aborted_txns"] = COMMITS, ABORTS

        # 2. A zombie: p1 has a transaction open when p2 takes its id.
        p1.begin_transaction()
        self.produce(p1, "zombie", txn, PER_TXN)
        txn += 1
        assert p1.flush(30) == 0, "zombie records not flushed"
        p2 = self.producer("p2", self.txn_id)
        t = time.monotonic()
        p2.init_transactions(60)
        out["fencer_init_s"] = round(time.monotonic() - t, 2)
        p2.begin_transaction()
        self.produce(p2, "fencer", txn, PER_TXN)
        txn += 1
        p2.commit_transaction(30)
        errors = []  # (name, fatal) in the order the zombie met them
        try:
            self.produce(p1, "zlate", txn, PER_TXN)
            txn += 1
            try:
                p1.flush(15)
            except SystemError:
                # confluent-kafka can lose the fatal error a flush() meets
                # ("returned NULL without setting an exception", seen in CI);
                # the next call raises it.
                pass
            p1.commit_transaction(15)
            out["zombie_committed"] = True
        except KafkaException as e:
            err = e.args[0]
            errors.append((err.name(), fatal(err)))
            if not fatal(err) and err.txn_requires_abort():
                # Abortable (e.g. INVALID_PRODUCER_EPOCH on produce): the
                # abort goes to the coordinator with the old epoch and is
                # refused there.
                try:
                    p1.abort_transaction(15)
                    errors.append(("abort accepted", False))
                except KafkaException as e2:
                    errors.append((e2.args[0].name(), fatal(e2.args[0])))
        errors += [(e.name(), True) for e in self.fatal["p1"]]
        # The name of the fatal error; a call refused afterwards says only _FATAL.
        fatal_names = sorted({n for n, f in errors if f}, key=lambda n: n not in FENCED_NAMES)
        out["fenced_errors"] = [f"{n}{' (fatal)' if f else ''}" for n, f in errors]
        out["fenced_error"] = fatal_names[0] if fatal_names else None
        out["zombie_committed"] = out.get("zombie_committed", False)
        out["zlate_delivery_errors"] = sorted(set(self.zlate_errors))
        try:
            p1.purge()
        except KafkaException:
            pass
        del p1

        # 3. A transaction only the broker can end.
        hung_first = self.seq
        self.seq += PER_TXN
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "hang", self.bootstrap, self.topic,
             f"{self.topic}-hung", str(HUNG_TIMEOUT_MS), str(hung_first), str(PER_TXN)],
            stdout=subprocess.PIPE)
        ready, _, _ = select.select([child.stdout], [], [], 90)
        line = child.stdout.readline() if ready else b""
        t0 = time.monotonic()
        child.kill()
        child.wait()
        hung = json.loads(line or b"{}")
        assert hung.get("delivered"), f"the hung transaction's records were not delivered: {hung}"
        for v in hung["delivered"]:
            self.produced[v] = "hung"
            self.delivered.add(v)
        p2.begin_transaction()
        first_after = self.seq
        self.produce(p2, "after", txn, PER_TXN)
        after = {f"after-t{txn}-{s:06d}" for s in range(first_after, self.seq)}
        txn += 1
        p2.commit_transaction(30)
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "txn-check-hung",
                      "isolation.level": "read_committed", "enable.auto.commit": False,
                      "fetch.wait.max.ms": 100})
        c.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        early_until = t0 + HUNG_TIMEOUT_MS / 1000 * 0.6
        seen_after, early, hung_seen = set(), 0, 0
        released = None
        deadline = t0 + 120
        while time.monotonic() < deadline:
            for m in c.consume(num_messages=1000, timeout=0.2):
                if m.error():
                    continue
                v = (m.value() or b"").decode(errors="replace")
                if v in after:
                    seen_after.add(v)
                    early += time.monotonic() < early_until
                hung_seen += v.startswith("hung-")
            if seen_after == after:
                released = time.monotonic() - t0
                break
        c.close()
        out["hung_timeout_ms"] = HUNG_TIMEOUT_MS
        out["hung_after_seen_early"] = early
        out["hung_blocked"] = early == 0 and time.monotonic() > early_until
        out["hung_released_s"] = None if released is None else round(released, 2)
        out["hung_seen_read_committed"] = hung_seen
        p2.close()

        # 4. Everything, read back both ways.
        committed_kinds = ("commit", "fencer", "after")
        aborted_kinds = ("abort", "zombie", "hung", "zlate")
        committed = {v for v in self.delivered if self.produced[v] in committed_kinds}
        out["delivery_errors"] = self.delivery_errors[:10]
        rc, rc_end = read_all(self.bootstrap, self.topic, "read_committed")
        ru, ru_end = read_all(self.bootstrap, self.topic, "read_uncommitted")
        for name, got, end, want in (("rc", rc, rc_end, committed), ("ru", ru, ru_end, self.delivered)):
            values = [v.decode(errors="replace") if v is not None else None
                      for p in sorted(got) for _, _, v in got[p]]
            counts = Counter(values)
            order_ok = True
            for p, records in got.items():
                seqs = []
                for _, _, v in records:
                    v = (v or b"").decode(errors="replace")
                    if v in self.produced:
                        s = int(v.rsplit("-", 1)[1])
                        order_ok &= s % PARTITIONS == p
                        seqs.append(s)
                order_ok &= all(a < b for a, b in zip(seqs, seqs[1:]))
            out[f"{name}_expected"] = len(want)
            out[f"{name}_seen"] = len(values)
            out[f"{name}_missing"] = len(want - counts.keys())
            out[f"{name}_duplicates"] = sum(1 for n in counts.values() if n > 1)
            out[f"{name}_unexpected"] = sum(1 for v in counts if v not in self.produced)
            out[f"{name}_aborted_seen"] = sum(1 for v in counts
                                              if self.produced.get(v) in aborted_kinds)
            out[f"{name}_order_ok"] = order_ok
            out[f"{name}_to_end"] = end
            bad = [v for v in counts if v not in self.produced][:3]
            if bad:
                log(f"{name}: unexpected values, e.g. {bad!r}")
        out["zombie_late_stored"] = sum(1 for p in ru for _, _, v in ru[p]
                                        if (v or b"").startswith(b"zlate-"))
        by_part = defaultdict(list)
        for v in sorted(committed, key=lambda v: int(v.rsplit("-", 1)[1])):
            by_part[str(int(v.rsplit("-", 1)[1]) % PARTITIONS)].append(v)
        out["committed_by_partition"] = by_part
        out["ok"] = bool(
            not self.delivery_errors
            and out["fenced_error"] in FENCED_NAMES and not out["zombie_committed"]
            and out["zombie_late_stored"] == 0
            and out["hung_blocked"] and out["hung_released_s"] is not None
            and out["hung_seen_read_committed"] == 0
            and all(out[f"{n}_missing"] == 0 and out[f"{n}_duplicates"] == 0
                    and out[f"{n}_unexpected"] == 0 and out[f"{n}_order_ok"] and out[f"{n}_to_end"]
                    and out[f"{n}_seen"] == out[f"{n}_expected"] for n in ("rc", "ru"))
            and out["rc_aborted_seen"] == 0)
        return out


def hang(bootstrap, topic, txn_id, timeout_ms, first, count):
    """Child of `basic`: opens a transaction, flushes, reports, and waits to
    be killed."""
    delivered = []
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id,
                  "transaction.timeout.ms": int(timeout_ms), "linger.ms": 5})
    p.init_transactions(60)
    p.begin_transaction()
    for s in range(int(first), int(first) + int(count)):
        v = f"hung-t0-{s:06d}"
        p.produce(topic, key=b"hung", value=v.encode(), partition=s % PARTITIONS,
                  on_delivery=lambda err, msg: err is None and delivered.append(msg.value().decode()))
    p.flush(30)
    print(json.dumps({"delivered": delivered}), flush=True)
    time.sleep(3600)


# ---------------------------------------------------------------- ctp

def f(value):
    return b"f(" + value + b")"


def seed(bootstrap, topic, partitions, first, count):
    ensure_topic(bootstrap, topic, partitions)
    errors = []
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                  "linger.ms": 5})
    for n in range(first, first + count):
        while True:
            try:
                p.produce(topic, key=f"k{n % 97}".encode(), value=f"in-{n:07d}".encode(),
                          partition=n % partitions,
                          on_delivery=lambda err, msg: err and errors.append(str(err)))
                break
            except BufferError:
                p.poll(0.05)
    left = p.flush(60)
    print(json.dumps({"seeded": count - len(errors) - left, "from": first,
                      "errors": errors[:5], "left": left}))
    return not errors and not left


class Ctp:
    def __init__(self, a):
        self.a = a
        self.stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        self.state = {"runs": 0, "transactions": 0, "records": 0, "aborts": 0,
                      "fatal_recoveries": 0, "rewinds": 0, "stuck": 0, "errors": []}
        try:
            with open(a.statefile) as fh:
                self.state.update(json.load(fh))
        except (OSError, ValueError):
            pass
        self.state["runs"] += 1
        self.run = Counter()
        self.errors = []
        self.abandoned = []
        self.deadline = time.monotonic() + a.deadline_s

    def note(self, what):
        log(f"ctp: {what}")
        if what not in self.errors:
            self.errors.append(what)
            self.state["errors"] = (self.state["errors"] + [what])[-20:]

    def save(self):
        tmp = self.a.statefile + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.state, fh)
        os.replace(tmp, self.a.statefile)

    def alive(self):
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def bounded(self, what, fn, *args):
        """fn(*args) in a thread, waited for at most STUCK_S: librdkafka can
        block in a transactional call long past its timeout when the
        coordinator went away mid-call (e.g. send_offsets_to_transaction,
        librdkafka issue 5456)."""
        box = {}

        def call():
            try:
                box["ok"] = fn(*args)
            except BaseException as e:  # handed to the caller
                box["err"] = e
        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(STUCK_S)
        if t.is_alive():
            raise Stuck(what)
        if "err" in box:
            raise box["err"]
        return box.get("ok")

    def retrying(self, what, fn, *args):
        """Calls fn (bounded) until it succeeds or fails otherwise than retriably."""
        while True:
            try:
                return self.bounded(what, fn, *args)
            except KafkaException as e:
                err = e.args[0]
                # Stopping, a new producer does not wait for the node.
                if err.retriable() and not fatal(err) and not err.txn_requires_abort() \
                        and time.monotonic() < self.deadline \
                        and not (self.stop.is_set() and what == "init_transactions"):
                    self.note(f"{what}: {err.name()} (retried)")
                    time.sleep(0.2)
                    continue
                raise

    def new_producer(self):
        """A producer with transactions initialised: the first of an instance
        fences the one before and ends what it left open."""
        def on_error(err):
            if err.code() not in TRANSIENT:
                self.note(f"producer: {err.name()}{' (fatal)' if err.fatal() else ''}")
        while True:
            p = Producer({"bootstrap.servers": self.a.bootstrap,
                          "transactional.id": f"{self.a.group}-ctp",
                          "transaction.timeout.ms": 30000, "linger.ms": 5,
                          "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 200,
                          "topic.metadata.refresh.interval.ms": 2000,
                          "error_cb": on_error})
            try:
                self.retrying("init_transactions", p.init_transactions, 30)
                return p
            except Stuck as e:
                self.abandon(p, e)

    def abandon(self, producer, stuck):
        """A producer stuck in a call is left to its thread, never used or
        destroyed again (destroying it under the call would crash)."""
        self.note(f"stuck: {stuck.args[0]} did not return in {STUCK_S} s")
        self.run["stuck"] += 1
        self.state["stuck"] = self.state.get("stuck", 0) + 1
        self.abandoned.append(producer)

    def new_consumer(self):
        def on_error(err):
            if err.code() not in TRANSIENT:
                self.note(f"consumer: {err.name()}")
        c = Consumer({"bootstrap.servers": self.a.bootstrap, "group.id": self.a.group,
                      "isolation.level": "read_committed", "enable.auto.commit": False,
                      "auto.offset.reset": "earliest", "enable.partition.eof": True,
                      "session.timeout.ms": 10000, "heartbeat.interval.ms": 1000,
                      "fetch.wait.max.ms": 100, "topic.metadata.refresh.interval.ms": 2000,
                      "reconnect.backoff.ms": 50, "reconnect.backoff.max.ms": 200,
                      "error_cb": on_error})
        c.subscribe([self.a.input])
        return c

    def rewind(self):
        """Back to the group's committed offsets after an abort."""
        self.run["rewinds"] += 1
        self.state["rewinds"] += 1
        for _ in range(50):
            try:
                assignment = self.consumer.assignment()
                if not assignment:
                    return
                for tp in self.consumer.committed(assignment, timeout=10):
                    offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                    self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
                return
            except KafkaException as e:
                self.note(f"rewind: {e.args[0].name()}")
                time.sleep(0.2)
        # Could not seek: a new member reads the committed offsets on joining.
        self.note("rewind: new consumer")
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError):
            pass
        self.consumer = self.new_consumer()

    def caught_up(self):
        """The group's committed offsets are at the ends of every partition of IN."""
        try:
            parts = [TopicPartition(self.a.input, p) for p in self.in_partitions]
            if {tp.partition for tp in self.consumer.assignment()} != set(self.in_partitions):
                return False
            for tp in self.consumer.committed(parts, timeout=10):
                _, high = self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)
                if max(tp.offset, 0) < high:
                    return False
            return True
        except KafkaException:
            return False

    def main(self):
        a = self.a
        self.in_partitions = ensure_topic(a.bootstrap, a.input, PARTITIONS)
        ensure_topic(a.bootstrap, a.output, len(self.in_partitions))
        self.consumer = self.new_consumer()
        self.producer = self.new_producer()
        done = False
        while self.alive():
            msgs = self.consumer.consume(num_messages=100, timeout=0.5)
            batch = []
            for m in msgs:
                if not m.error():
                    batch.append(m)
                elif m.error().code() not in TRANSIENT + (KafkaError._PARTITION_EOF,):
                    self.note(f"consume: {m.error().name()}")
            if not batch:
                if not a.follow and self.caught_up():
                    done = True
                    break
                continue
            try:
                self.producer.begin_transaction()
                offsets = {}
                for m in batch:
                    while True:
                        try:
                            self.producer.produce(a.output, key=m.key(), value=f(m.value()),
                                                  partition=m.partition())
                            break
                        except BufferError:
                            self.producer.poll(0.05)
                    offsets[m.partition()] = m.offset() + 1
                tps = [TopicPartition(a.input, p, o) for p, o in offsets.items()]
                self.retrying("send_offsets_to_transaction", self.producer.send_offsets_to_transaction,
                              tps, self.consumer.consumer_group_metadata(), 30)
                self.retrying("commit_transaction", self.producer.commit_transaction, 30)
                self.run["transactions"] += 1
                self.run["records"] += len(batch)
                self.state["transactions"] += 1
                self.state["records"] += len(batch)
                self.save()
            except Stuck as e:
                self.abandon(self.producer, e)
                self.producer = self.new_producer()
                self.rewind()
                self.save()
            except KafkaException as e:
                err = e.args[0]
                self.note(f"transaction: {err.name()}{' (fatal)' if fatal(err) else ''}")
                try:
                    if not fatal(err):
                        try:
                            self.retrying("abort_transaction", self.producer.abort_transaction, 30)
                            self.run["aborts"] += 1
                            self.state["aborts"] += 1
                        except KafkaException as e2:
                            err = e2.args[0]
                            self.note(f"abort: {err.name()}{' (fatal)' if fatal(err) else ''}")
                except Stuck as e2:
                    self.abandon(self.producer, e2)
                    self.producer = self.new_producer()
                if fatal(err):
                    # A new instance: its init_transactions ends whatever the
                    # old one left open.
                    self.run["fatal_recoveries"] += 1
                    self.state["fatal_recoveries"] += 1
                    self.producer.purge()
                    del self.producer
                    self.producer = self.new_producer()
                self.rewind()
                self.save()
        self.save()
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError):
            pass
        summary = {"done": done, "follow": a.follow, "stopped": self.stop.is_set(),
                   "processed": self.run["records"], "transactions": self.run["transactions"],
                   "aborts": self.run["aborts"], "fatal_recoveries": self.run["fatal_recoveries"],
                   "rewinds": self.run["rewinds"], "stuck": self.run["stuck"],
                   "errors": self.errors[:20], "state": self.state}
        print(json.dumps(summary), flush=True)
        sys.stderr.flush()
        # Not a normal exit: an abandoned producer's thread may still be
        # inside librdkafka, and tearing it down would wait for it.
        os._exit(0 if done or (a.follow and self.stop.is_set()) else 1)


def verify(bootstrap, topic_in, topic_out, group):
    out = {}
    got_in, in_end = read_all(bootstrap, topic_in, "read_committed")
    got_out, out_end = read_all(bootstrap, topic_out, "read_committed")
    ru_out, _ = read_all(bootstrap, topic_out, "read_uncommitted")
    inputs = {v for p in got_in for _, _, v in got_in[p]}
    results = {f(v) for v in inputs}
    counts = Counter(v for p in got_out for _, _, v in got_out[p])
    equal = True
    for p in set(got_in) | set(got_out):
        want = [(k, f(v)) for _, k, v in got_in.get(p, [])]
        have = [(k, v) for _, k, v in got_out.get(p, [])]
        if want != have:
            equal = False
            i = next((i for i, (x, y) in enumerate(zip(want, have)) if x != y),
                     min(len(want), len(have)))
            log(f"partition {p}: first difference at {i}: want {want[i:i + 2]} have {have[i:i + 2]}")
    out["in_records"] = sum(len(r) for r in got_in.values())
    out["out_records"] = sum(counts.values())
    out["missing"] = len(results - counts.keys())
    out["duplicates"] = sum(n - 1 for n in counts.values() if n > 1)
    out["unexpected"] = sum(1 for v in counts if v not in results)
    out["equal"] = equal
    out["to_end"] = in_end and out_end
    out["out_uncommitted"] = sum(len(r) for r in ru_out.values())
    out["aborted_outputs"] = out["out_uncommitted"] - out["out_records"]
    ok = equal and out["to_end"] and out["in_records"] > 0
    if group:
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        parts = [TopicPartition(topic_in, p) for p in sorted(got_in)]
        ends = end_offsets(bootstrap, topic_in, sorted(got_in))
        committed = {tp.partition: tp.offset for tp in c.committed(parts, timeout=30)}
        c.close()
        out["committed_ok"] = all(committed[p] == ends[p] for p in ends)
        out["committed"] = sum(max(o, 0) for o in committed.values())
        ok &= out["committed_ok"]
    out["ok"] = ok
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "hang":
        hang(*sys.argv[2:8])
        return
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("basic")
    b.add_argument("bootstrap")
    b.add_argument("prefix")
    s = sub.add_parser("ctp-seed")
    s.add_argument("bootstrap")
    s.add_argument("input")
    s.add_argument("partitions", type=int)
    s.add_argument("first", type=int)
    s.add_argument("count", type=int)
    c = sub.add_parser("ctp")
    c.add_argument("bootstrap")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("group")
    c.add_argument("statefile")
    c.add_argument("--follow", action="store_true")
    c.add_argument("--deadline-s", type=float, default=600)
    v = sub.add_parser("ctp-verify")
    v.add_argument("bootstrap")
    v.add_argument("input")
    v.add_argument("output")
    v.add_argument("group", nargs="?")
    a = ap.parse_args()
    if a.mode == "basic":
        basic = Basic(a.bootstrap, a.prefix)
        try:
            out = basic.run()
        except (KafkaException, AssertionError) as e:
            import traceback
            traceback.print_exc()
            out = {"ok": False, "error": repr(e), "produced": len(basic.produced),
                   "delivered": len(basic.delivered)}
        print(json.dumps(out))
        sys.exit(0 if out["ok"] else 1)
    elif a.mode == "ctp-seed":
        sys.exit(0 if seed(a.bootstrap, a.input, a.partitions, a.first, a.count) else 1)
    elif a.mode == "ctp":
        sys.exit(0 if Ctp(a).main() else 1)
    else:
        out = verify(a.bootstrap, a.input, a.output, a.group)
        print(json.dumps(out))
        sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
