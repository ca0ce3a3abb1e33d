#!/usr/bin/env python3
"""Drives a `tributary` binary (possibly under qemu-user) through a start,
produce, read, SIGTERM, restart, read cycle, then forwards the edge's log to
a core (the same binary) and reads it there. Usage: smoke.py [RUNNER...] BINARY.
Exits non-zero, saying why, on the first thing that is wrong."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

CMD = sys.argv[1:]
if not CMD:
    sys.exit("usage: smoke.py [RUNNER...] BINARY")


def fail(msg, data_dir=None):
    if data_dir and os.path.exists(os.path.join(data_dir, "node.log")):
        sys.stderr.write(open(os.path.join(data_dir, "node.log")).read()[-4000:])
    sys.exit(f"SMOKE FAILED: {msg}")


def start(data_dir, mode="edge", extra=None):
    env = dict(os.environ, TRIBUTARY_DATA_DIR=data_dir, TRIBUTARY_HTTP__LISTEN="127.0.0.1:0", TRIBUTARY_MQTT__LISTEN="127.0.0.1:0", TRIBUTARY_AMQP__LISTEN="127.0.0.1:0", TRIBUTARY_KAFKA__LISTEN="127.0.0.1:0", TRIBUTARY_LOG="info", **(extra or {}))
    log = open(os.path.join(data_dir, "node.log"), "a")
    t0 = time.monotonic()
    proc = subprocess.Popen(CMD + [mode, "--profile", "small"], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    m = re.search(r"http=(\S+)", line)
    if not m:
        proc.kill()
        fail(f"node did not start (stdout: {line!r})", data_dir)
    url = f"http://{m.group(1)}"
    mq = re.search(r"mqtt=(\S+)", line)
    start.mqtt = mq.group(1) if mq else None
    aq = re.search(r"amqp=(\S+)", line)
    start.amqp = aq.group(1) if aq else None
    while True:  # ready means /health answers 200
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() - t0 > 60:
            fail("never healthy", data_dir)
        time.sleep(0.01)
    return proc, url, time.monotonic() - t0


def call(method, url, body=None, ctype="application/json"):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": ctype})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def read_all(url, topic, partition):
    out, offset = [], 0
    while True:
        page = call("GET", f"{url}/v1/topics/{topic}/partitions/{partition}/records?offset={offset}&limit=1000&format=binary")
        out += [(r["offset"], r["key"], r["value"]) for r in page["records"]]
        if not page["records"] or page["next_offset"] >= page["end_offset"]:
            return out
        offset = page["next_offset"]


def mqtt_publish(addr, n):
    """Raw MQTT 3.1.1: CONNECT, n QoS 1 PUBLISHes to mqttsmoke/<i>, wait for every PUBACK."""
    import socket
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=60)
    cid = b"smoke"
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(cid).to_bytes(2, "big") + cid
    s.sendall(bytes([0x10, len(body)]) + body)
    out = b""
    for i in range(n):
        topic, payload = f"mqttsmoke/{i}".encode(), f"m{i}".encode()
        var = len(topic).to_bytes(2, "big") + topic + (i + 1).to_bytes(2, "big") + payload
        out += bytes([0x32, len(var)]) + var
    s.sendall(out)
    want, got = 4 + 4 * n, b""
    while len(got) < want:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    acks = [got[i:i + 4] for i in range(4, len(got), 4)]
    if got[:4] != b"\x20\x02\x00\x00" or len(acks) != n or any(a[:2] != b"\x40\x02" for a in acks):
        fail(f"MQTT: expected CONNACK and {n} PUBACKs, got {got[:64]!r}...")


def amqp_publish(addr, n):
    """Raw AMQP 0-9-1: handshake (PLAIN), confirm.select, n publishes to exchange
    amqpsmoke, then wait until basic.ack covers every delivery tag."""
    import socket
    import struct
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=60)
    short = lambda b: bytes([len(b)]) + b
    def frame(kind, ch, payload):
        return struct.pack(">BHI", kind, ch, len(payload)) + payload + b"\xce"
    def method(ch, cls, mid, args=b""):
        return frame(1, ch, struct.pack(">HH", cls, mid) + args)
    buf = b""
    def next_frame():
        nonlocal buf
        while True:
            if len(buf) >= 7:
                kind, ch, size = struct.unpack(">BHI", buf[:7])
                if len(buf) >= 8 + size:
                    payload, buf = buf[7:7 + size], buf[8 + size:]
                    return kind, ch, payload
            chunk = s.recv(65536)
            if not chunk:
                fail(f"AMQP: connection closed, got {buf[:64]!r}")
            buf += chunk
    def expect(cls, mid):
        while True:
            kind, ch, payload = next_frame()
            if kind == 1 and struct.unpack(">HH", payload[:4]) == (cls, mid):
                return payload[4:]
            if kind == 1 and struct.unpack(">HH", payload[:4]) in ((10, 50), (20, 40)):
                fail(f"AMQP: closed by the server: {payload!r}")
    s.sendall(b"AMQP\x00\x00\x09\x01")
    expect(10, 10)  # connection.start
    s.sendall(method(0, 10, 11, struct.pack(">I", 0) + short(b"PLAIN")
                     + struct.pack(">I", 12) + b"\x00guest\x00guest" + short(b"en_US")))
    expect(10, 30)  # connection.tune
    s.sendall(method(0, 10, 31, struct.pack(">HIH", 0, 131072, 0))
              + method(0, 10, 40, short(b"/") + short(b"") + b"\x00"))
    expect(10, 41)  # connection.open-ok
    s.sendall(method(1, 20, 10, short(b"")) + method(1, 85, 10, b"\x00"))
    expect(85, 11)  # confirm.select-ok
    out = b""
    for i in range(n):
        body = f"a{i}".encode()
        out += method(1, 60, 40, struct.pack(">H", 0) + short(b"amqpsmoke") + short(f"k{i}".encode()) + b"\x00")
        out += frame(2, 1, struct.pack(">HHQH", 60, 0, len(body), 0))
        out += frame(3, 1, body)
    s.sendall(out)
    through = 0
    while through < n:
        kind, ch, payload = next_frame()
        if kind != 1:
            continue
        ids = struct.unpack(">HH", payload[:4])
        if ids in ((10, 50), (20, 40)):
            fail(f"AMQP: closed by the server: {payload!r}")
        if ids == (60, 120):
            fail("AMQP: a publish was nacked")
        if ids == (60, 80):
            tag, multiple = struct.unpack(">QB", payload[4:13])
            if not multiple and tag != through + 1:
                fail(f"AMQP: ack {tag} out of order after {through}")
            through = max(through, tag)
    s.sendall(method(0, 10, 50, struct.pack(">H", 200) + short(b"bye") + struct.pack(">HH", 0, 0)))
    s.close()


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stop(proc, data_dir):
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    if code != 0:
        fail(f"SIGTERM exit code {code}", data_dir)


def main():
    data_dir = tempfile.mkdtemp(prefix="tributary-smoke-")
    proc, url, ready = start(data_dir)
    idle_rss = rss_kib(proc.pid)
    call("POST", f"{url}/v1/topics", {"name": "smoke", "partitions": 2})
    sent = [{"key": f"sensor-{i % 7}", "value": {"i": i, "t": 20 + i / 10}} for i in range(1000)]
    for i in range(0, len(sent), 250):
        call("POST", f"{url}/v1/topics/smoke/records", {"records": sent[i:i + 250]})
    blob = bytes(range(256)) * 40
    subprocess.run(["curl", "-sSf", "-XPOST", f"{url}/v1/topics/raw/records?key=k", "-H",
                    "content-type: application/octet-stream", "--data-binary", "@-"], input=blob, check=True,
                   stdout=subprocess.DEVNULL)
    # The ARM binary's own client subcommand, also under emulation.
    lines = "".join(f"line {i}\n" for i in range(100))
    subprocess.run(CMD + ["produce", "lines", "--url", url], input=lines, text=True, check=True,
                   stderr=subprocess.DEVNULL)
    mqtt_publish(start.mqtt, 200)
    amqp_publish(start.amqp, 200)

    def check(url=url):
        got = read_all(url, "smoke", 0) + read_all(url, "smoke", 1)
        if len(got) != len(sent):
            fail(f"expected {len(sent)} records, read {len(got)}", data_dir)
        values = sorted(json.loads(__import__("base64").b64decode(v))["i"] for _, _, v in got)
        if values != list(range(1000)):
            fail("records differ after the round trip", data_dir)
        raw = read_all(url, "raw", 0)
        if len(raw) != 1 or __import__("base64").b64decode(raw[0][2]) != blob:
            fail("binary record differs", data_dir)
        if len(read_all(url, "lines", 0)) != 100:
            fail("lines produced by the CLI are missing", data_dir)
        b64 = __import__("base64").b64decode
        keys = sorted(b64(k).decode() for _, k, _ in read_all(url, "mqttsmoke", 0))
        if keys != sorted(f"mqttsmoke/{i}" for i in range(200)):
            fail(f"expected 200 PUBACKed MQTT records in topic mqttsmoke, found {len(keys)}", data_dir)
        values = sorted(b64(v).decode() for _, _, v in read_all(url, "amqpsmoke", 0))
        if values != sorted(f"a{i}" for i in range(200)):
            fail(f"expected 200 confirmed AMQP records in topic amqpsmoke, found {len(values)}", data_dir)

    check()
    busy_rss = rss_kib(proc.pid)
    stop(proc, data_dir)
    proc, url, ready2 = start(data_dir)
    check(url)
    stop(proc, data_dir)

    # Store and forward: the edge restarts with an upstream and its whole log
    # drains into a core (the same binary, also emulated).
    core_dir = tempfile.mkdtemp(prefix="tributary-smoke-core-")
    core, core_url, _ = start(core_dir, "core")
    upstream = {"TRIBUTARY_UPSTREAM__URL": f"ws://{core_url[len('http://'):]}/v1/sync",
                "TRIBUTARY_UPSTREAM__EDGE_ID": "smoke-edge"}
    proc, url, _ = start(data_dir, "edge", upstream)
    t0, status = time.monotonic(), None
    while True:
        try:
            status = call("GET", f"{url}/v1/stats")["sync"]
            if status["connected"] and all(t["lag_events"] == 0 for t in status["topics"]) and len(status["topics"]) == 5:
                break
        except OSError:
            pass
        if time.monotonic() - t0 > 120:
            fail(f"the edge did not drain into the core: {status}", data_dir)
        time.sleep(0.1)
    drained = time.monotonic() - t0
    check(core_url)
    stop(proc, data_dir)
    stop(core, core_dir)
    print(f"smoke OK: {' '.join(CMD)}: ready in {ready * 1000:.0f} ms (restart {ready2 * 1000:.0f} ms), "
          f"RSS idle {idle_rss / 1024:.1f} MiB, after the run {busy_rss / 1024:.1f} MiB (qemu included when emulated); "
          f"forwarded everything to a core in {drained:.1f} s")


main()
