#!/usr/bin/env python3
"""An idempotent librdkafka producer (confluent-kafka, enable.idempotence=true,
acks=all) writing numbered records without pause while the test kills and
restarts the node it writes to. Each value is sent once ("p<partition>-<n>",
n counting up per partition), so the log must hold every acknowledged value
exactly once and, per partition, in the order sent.

usage: kafka_idempotent.py BOOTSTRAP TOPIC PARTITIONS
Runs until SIGTERM, then waits for what is in flight and prints one JSON line:
{"acked": [[partition, value], ...], "errors": [...], "fatal": null|"..."}
"""
import json
import signal
import sys
import threading

from confluent_kafka import KafkaError, Producer

bootstrap, topic, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())

acked = []
errors = []
fatal = []


def on_error(err):
    # Connection errors while the node is down are expected; fatal is not.
    if err.fatal():
        fatal.append(str(err))
    elif err.code() not in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                            KafkaError._RESOLVE, KafkaError._TIMED_OUT):
        errors.append(str(err))


def delivered(err, msg):
    if err is None:
        acked.append([msg.partition(), msg.value().decode()])
    else:
        errors.append(f"not delivered: {err}")


p = Producer({
    "bootstrap.servers": bootstrap,
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 2,
    "message.timeout.ms": 300000,
    "reconnect.backoff.ms": 50,
    "reconnect.backoff.max.ms": 200,
    "error_cb": on_error,
})
n = [0] * partitions
while not stop.is_set() and not fatal:
    for part in range(partitions):
        try:
            p.produce(topic, value=f"p{part}-{n[part]}".encode(), partition=part,
                      on_delivery=delivered)
            n[part] += 1
        except BufferError:
            p.poll(0.05)
    p.poll(0)
    if len(p) > 2000:
        p.poll(0.01)
left = p.flush(120)
if left:
    errors.append(f"{left} records still in flight at the end")
print(json.dumps({"acked": acked, "errors": errors[:20], "fatal": fatal[0] if fatal else None,
                  "sent": sum(n)}))
