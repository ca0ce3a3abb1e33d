#!/usr/bin/env python3
"""MQTT checks on raw sockets, for what paho cannot show: paho acknowledges by
itself and hides the wire (topic aliases, PUBCOMP reasons, how many PUBLISH
are outstanding). Packets are packed here by hand from the MQTT 3.1.1 and 5
specifications, independently of the broker's code.

Usage: mqtt_raw.py HOST PORT CHECK, CHECK one of receive_max, keep_alive,
aliases, bad_shared, pubrel_unknown, max_packet. Exit 0 when the check
passed (its last line says what it saw); otherwise the reason is printed."""
import socket
import struct
import sys
import time

# Packet types (high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

# v5 property identifiers used here, with their wire types.
RECEIVE_MAXIMUM, TOPIC_ALIAS_MAXIMUM, TOPIC_ALIAS = 0x21, 0x22, 0x23
MAXIMUM_PACKET_SIZE = 0x27
PROP_TYPES = {
    0x01: "byte", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint",
    0x11: "u32", 0x12: "str", 0x13: "u16", 0x15: "str", 0x16: "bin", 0x17: "byte",
    0x18: "u32", 0x19: "byte", 0x1A: "str", 0x1C: "str", 0x1F: "str", 0x21: "u16",
    0x22: "u16", 0x23: "u16", 0x24: "byte", 0x25: "byte", 0x26: "pair", 0x27: "u32",
    0x28: "byte", 0x29: "byte", 0x2A: "byte",
}


class Fail(Exception):
    """A check failed; the message says what came back instead."""


def varint(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(buf, i):
    value, mult = 0, 1
    while True:
        b = buf[i]
        i += 1
        value += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return value, i


def utf8(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def props(**by_id):
    """v5 properties from {id: value} pairs given as p0x21=1 etc."""
    body = b""
    for name, value in by_id.items():
        pid = int(name[1:], 16)
        kind = PROP_TYPES[pid]
        body += bytes([pid]) + {
            "byte": lambda v: bytes([v]),
            "u16": lambda v: struct.pack("!H", v),
            "u32": lambda v: struct.pack("!I", v),
            "varint": varint,
            "str": utf8,
            "bin": utf8,
        }[kind](value)
    return varint(len(body)) + body


def parse_props(buf, i):
    """(list of (id, value), index after the properties)."""
    length, i = read_varint(buf, i)
    end, out = i + length, []
    while i < end:
        pid = buf[i]
        i += 1
        kind = PROP_TYPES.get(pid)
        if kind == "byte":
            v, i = buf[i], i + 1
        elif kind == "u16":
            v, i = struct.unpack_from("!H", buf, i)[0], i + 2
        elif kind == "u32":
            v, i = struct.unpack_from("!I", buf, i)[0], i + 4
        elif kind == "varint":
            v, i = read_varint(buf, i)
        elif kind in ("str", "bin"):
            n = struct.unpack_from("!H", buf, i)[0]
            v, i = bytes(buf[i + 2:i + 2 + n]), i + 2 + n
        elif kind == "pair":
            n = struct.unpack_from("!H", buf, i)[0]
            k = bytes(buf[i + 2:i + 2 + n])
            i += 2 + n
            n = struct.unpack_from("!H", buf, i)[0]
            v, i = (k, bytes(buf[i + 2:i + 2 + n])), i + 2 + n
        else:
            raise Fail(f"unknown property 0x{pid:02x} in {bytes(buf)!r}")
        out.append((pid, v))
    return out, end


class Conn:
    """One raw MQTT connection: CONNECT sent and CONNACK read on creation."""

    def __init__(self, host, port, client_id, version=5, keep_alive=30, connect_props=None):
        self.v5 = version == 5
        self.sock = socket.create_connection((host, port), timeout=5)
        self.buf = b""
        body = utf8("MQTT") + bytes([5 if self.v5 else 4, 0x02]) + struct.pack("!H", keep_alive)
        if self.v5:
            body += connect_props or props()
        body += utf8(client_id)
        self.send(CONNECT << 4, body)
        kind, _, body = self.read(5)
        if kind != CONNACK:
            raise Fail(f"{client_id}: expected CONNACK, got packet type {kind}")
        self.connack_code = body[1]
        self.connack_props = dict(parse_props(body, 2)[0]) if self.v5 else {}
        if self.connack_code != 0:
            raise Fail(f"{client_id}: CONNACK 0x{self.connack_code:02x}")

    def send(self, first, body):
        self.sock.sendall(bytes([first]) + varint(len(body)) + body)

    def read(self, timeout):
        """(type, flags, body) of the next packet, None when nothing came
        within `timeout` seconds; EOFError when the server closed."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                try:
                    length, start = read_varint(self.buf, 1)
                except IndexError:
                    length = None
                if length is not None and len(self.buf) >= start + length:
                    first, body = self.buf[0], self.buf[start:start + length]
                    self.buf = self.buf[start + length:]
                    return first >> 4, first & 0x0F, body
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except ConnectionResetError:
                raise EOFError("connection reset")
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk

    def expect(self, kind, timeout=5):
        got = self.read(timeout)
        if got is None:
            raise Fail(f"no packet of type {kind} within {timeout} s")
        if got[0] != kind:
            raise Fail(f"expected packet type {kind}, got {got[0]} {got[2]!r}")
        return got

    def subscribe(self, pkid, filters, sub_props=None):
        """SUBSCRIBE [(filter, qos)]; returns the SUBACK's reason codes."""
        body = struct.pack("!H", pkid)
        if self.v5:
            body += sub_props or props()
        for f, qos in filters:
            body += utf8(f) + bytes([qos])
        self.send((SUBSCRIBE << 4) | 0x02, body)
        _, _, ack = self.expect(SUBACK)
        if struct.unpack_from("!H", ack, 0)[0] != pkid:
            raise Fail(f"SUBACK for another packet id: {ack!r}")
        i = parse_props(ack, 2)[1] if self.v5 else 2
        return list(ack[i:])

    def publish(self, topic, payload, qos=1, pkid=1):
        """PUBLISH; at QoS 1 waits for its PUBACK."""
        body = utf8(topic) + (struct.pack("!H", pkid) if qos else b"")
        if self.v5:
            body += props()
        self.send((PUBLISH << 4) | (qos << 1), body + payload)
        if qos == 1:
            _, _, ack = self.expect(PUBACK)
            reason = ack[2] if len(ack) > 2 else 0
            if reason >= 0x80:
                raise Fail(f"PUBACK 0x{reason:02x} for {topic}")

    def read_publish(self, timeout=5):
        """The next PUBLISH as a dict, None if nothing came in time."""
        got = self.read(timeout)
        if got is None:
            return None
        kind, flags, body = got
        if kind != PUBLISH:
            raise Fail(f"expected PUBLISH, got packet type {kind} {body!r}")
        n = struct.unpack_from("!H", body, 0)[0]
        topic, i = body[2:2 + n].decode(), 2 + n
        qos, pkid = (flags >> 1) & 3, None
        if qos:
            pkid, i = struct.unpack_from("!H", body, i)[0], i + 2
        p = {}
        if self.v5:
            plist, i = parse_props(body, i)
            p = dict(plist)
        return {"topic": topic, "qos": qos, "pkid": pkid, "props": p, "payload": bytes(body[i:])}

    def close(self):
        try:
            self.send(DISCONNECT << 4, b"")
        except OSError:
            pass
        self.sock.close()


def still_serving(host, port, what):
    """A new connection after `what` still gets CONNACK 0 and PINGRESP."""
    c = Conn(host, port, f"after-{what}")
    c.send(PINGREQ << 4, b"")
    c.expect(PINGRESP)
    c.close()


def check_receive_max(host, port):
    """Receive Maximum 1: never more than one unacknowledged PUBLISH."""
    sub = Conn(host, port, "rm-sub", connect_props=props(p0x21=1))
    if sub.subscribe(1, [("rm/#", 1)]) != [1]:
        raise Fail("SUBACK did not grant QoS 1")
    pub = Conn(host, port, "rm-pub")
    for i in range(5):
        pub.publish("rm/t", f"m{i}".encode(), qos=1, pkid=i + 1)
    got = []
    for i in range(5):
        p = sub.read_publish(5)
        if p is None:
            raise Fail(f"delivery {i + 1} did not come after {got}")
        if p["qos"] != 1:
            raise Fail(f"delivery at QoS {p['qos']}")
        got.append(p["payload"].decode())
        extra = sub.read(1.0)
        if extra is not None:
            raise Fail(f"a second PUBLISH while {p['payload']!r} is unacknowledged: {extra}")
        sub.send(PUBACK << 4, struct.pack("!H", p["pkid"]))
    if got != [f"m{i}" for i in range(5)]:
        raise Fail(f"deliveries {got}")
    still_serving(host, port, "receive-max")
    print("receive maximum 1: 5 deliveries, one outstanding at a time")


def check_keep_alive(host, port):
    """A silent 3.1.1 client asking keep alive 60 is held to the node's
    maximum (5 s, so closed after 1.5 x 5 s)."""
    c = Conn(host, port, "ka-silent", version=4, keep_alive=60)
    started = time.monotonic()
    try:
        got = c.read(15)
    except EOFError:
        got = "closed"
    took = time.monotonic() - started
    if got != "closed":
        raise Fail(f"still open after {took:.1f} s ({got})")
    if not 7.0 <= took <= 15:
        raise Fail(f"closed after {took:.1f} s, expected about 7.5 s")
    still_serving(host, port, "keep-alive")
    print(f"silent 3.1.1 client closed after {took:.1f} s")


def check_aliases(host, port):
    """Topic Alias Maximum 5: the second delivery on a topic comes as an
    empty topic name with the alias the first one set."""
    sub = Conn(host, port, "ta-sub", connect_props=props(p0x22=5))
    if sub.subscribe(1, [("ta/#", 0)]) != [0]:
        raise Fail("SUBACK did not grant QoS 0")
    pub = Conn(host, port, "ta-pub")
    for i, t in enumerate(["ta/one", "ta/one", "ta/two", "ta/two"]):
        pub.publish(t, f"m{i}".encode(), qos=1, pkid=i + 1)
    got = [sub.read_publish(5) for _ in range(4)]
    if None in got:
        raise Fail(f"only {got}")
    a1, a2 = (got[0]["props"].get(TOPIC_ALIAS), got[2]["props"].get(TOPIC_ALIAS))
    want = [("ta/one", a1), ("", a1), ("ta/two", a2), ("", a2)]
    seen = [(p["topic"], p["props"].get(TOPIC_ALIAS)) for p in got]
    if seen != want or None in (a1, a2) or a1 == a2 or not all(1 <= a <= 5 for a in (a1, a2)):
        raise Fail(f"(topic, alias) of the deliveries: {seen}")
    if [p["payload"] for p in got] != [f"m{i}".encode() for i in range(4)]:
        raise Fail(f"payloads {[p['payload'] for p in got]}")
    print(f"topic aliases: {seen}")


def check_bad_shared(host, port):
    """Malformed shared subscription filters: v5 0x8F, 3.1.1 0x80."""
    bad = ["$share/g", "$share//a", "$share/g+/a", "$share/g#/a"]
    for version, want in [(5, 0x8F), (4, 0x80)]:
        c = Conn(host, port, f"bad-shared-{version}", version=version)
        for i, f in enumerate(bad):
            codes = c.subscribe(i + 1, [(f, 1)])
            if codes != [want]:
                raise Fail(f"v{version} SUBSCRIBE {f!r}: SUBACK {[hex(x) for x in codes]}")
        c.close()
    still_serving(host, port, "bad-shared")
    print("bad shared filters: v5 0x8F, 3.1.1 0x80")


def check_pubrel_unknown(host, port):
    """PUBREL for a packet id the node never saw: v5 PUBCOMP 0x92."""
    c = Conn(host, port, "pubrel-unknown")
    c.send((PUBREL << 4) | 0x02, struct.pack("!H", 0x1234))
    _, _, body = c.expect(PUBCOMP)
    pkid = struct.unpack_from("!H", body, 0)[0]
    reason = body[2] if len(body) > 2 else 0
    if (pkid, reason) != (0x1234, 0x92):
        raise Fail(f"PUBCOMP packet id 0x{pkid:04x} reason 0x{reason:02x}")
    c.send(PINGREQ << 4, b"")
    c.expect(PINGRESP)
    c.close()
    still_serving(host, port, "pubrel")
    print("PUBREL for an unknown id: PUBCOMP 0x92")


def check_max_packet(host, port):
    """Maximum Packet Size 100: a 1 KB delivery is not sent, a small one is."""
    sub = Conn(host, port, "mp-sub", connect_props=props(p0x27=100))
    if sub.subscribe(1, [("mp/#", 1)]) != [1]:
        raise Fail("SUBACK did not grant QoS 1")
    pub = Conn(host, port, "mp-pub")
    pub.publish("mp/big", b"x" * 1024, qos=1, pkid=1)
    pub.publish("mp/small", b"small", qos=1, pkid=2)
    p = sub.read_publish(5)
    if p is None or (p["topic"], p["payload"]) != ("mp/small", b"small"):
        raise Fail(f"first delivery {p}")
    sub.send(PUBACK << 4, struct.pack("!H", p["pkid"]))
    extra = sub.read(1.0)
    if extra is not None:
        raise Fail(f"then {extra}")
    sub.send(PINGREQ << 4, b"")
    sub.expect(PINGRESP)
    still_serving(host, port, "max-packet")
    print("maximum packet size 100: the 1 KB delivery skipped, the small one sent")


if __name__ == "__main__":
    host, port, check = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        globals()[f"check_{check}"](host, port)
    except (Fail, EOFError, OSError) as e:
        sys.exit(f"{check}: {type(e).__name__}: {e}")
