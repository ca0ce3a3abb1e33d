"""Writes the seed-* inputs of the fuzz corpora (fuzz/corpus/<target>/seed-*):
real MQTT 3.1.1 and 5 sessions, an AMQP session with nested headers, the
produce bodies the HTTP tests send, the packaged config, and a certificate
chain with its key and client CA (made with openssl in a temporary
directory). Run it from anywhere: python3 fuzz/seed-corpus.py"""
import os, struct, subprocess, json, tempfile
here = os.path.dirname(os.path.abspath(__file__))
root = os.path.join(here, "corpus")
def put(target, name, data):
    d = os.path.join(root, target); os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7f; n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n: return bytes(out)
def s(x): x = x.encode() if isinstance(x, str) else x; return struct.pack(">H", len(x)) + x
def pkt(first, body): return bytes([first]) + varint(len(body)) + body

# MQTT 3.1.1: CONNECT with will and login, PUBLISH QoS 0/1, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT
c4 = pkt(0x10, s("MQTT") + bytes([4, 0b11101110]) + struct.pack(">H", 30) + s("dev-1") + s("will/t") + s("bye") + s("user") + s("pw"))
pub0 = pkt(0x30, s("sensors/temp") + b'{"c":21.5}')
pub1 = pkt(0x32, s("sensors/temp") + struct.pack(">H", 7) + b"22")
sub = pkt(0x82, struct.pack(">H", 8) + s("sensors/+/temp") + b"\x01" + s("a/#") + b"\x00")
unsub = pkt(0xA2, struct.pack(">H", 9) + s("a/#"))
put("mqtt_codec", "v4-session", c4 + pub0 + pub1 + sub + unsub + b"\xc0\x00" + b"\xe0\x00")
# MQTT 5: CONNECT with properties, PUBLISH with properties, SUBSCRIBE with options and id, DISCONNECT with reason
props = lambda b: varint(len(b)) + b
c5 = pkt(0x10, s("MQTT") + bytes([5, 0b00000010]) + struct.pack(">H", 60) + props(b"\x11" + struct.pack(">I", 3600) + b"\x21" + struct.pack(">H", 10)) + s("dev-5"))
pp = b"\x01\x01" + b"\x02" + struct.pack(">I", 60) + b"\x03" + s("application/json") + b"\x08" + s("reply/t") + b"\x09" + s(b"\x01\x02") + b"\x26" + s("k") + s("v") + b"\x23" + struct.pack(">H", 1)
p5 = pkt(0x32, s("t/5") + struct.pack(">H", 1) + props(pp) + b"hello")
p5alias = pkt(0x30, s("") + props(b"\x23" + struct.pack(">H", 1)) + b"again")
s5 = pkt(0x82, struct.pack(">H", 2) + props(b"\x0b" + varint(42)) + s("t/#") + bytes([0b00101101]))
d5 = pkt(0xE0, b"\x04" + props(b"\x11" + struct.pack(">I", 0)))
put("mqtt_codec", "v5-session", c5 + p5 + p5alias + s5 + b"\xc0\x00" + d5)

# AMQP 0-9-1: protocol header, start-ok, tune-ok, open, channel.open, basic.publish + header + body
def frame(kind, ch, payload): return struct.pack(">BHI", kind, ch, len(payload)) + payload + b"\xce"
def ss(x): x = x.encode(); return bytes([len(x)]) + x
def ls(x): x = x.encode() if isinstance(x, str) else x; return struct.pack(">I", len(x)) + x
table = lambda b: struct.pack(">I", len(b)) + b
start_ok = struct.pack(">HH", 10, 11) + table(ss("product") + b"S" + ls("seed")) + ss("PLAIN") + ls("\0guest\0guest") + ss("en_US")
tune_ok = struct.pack(">HHHIH", 10, 31, 2047, 131072, 60)
open_ = struct.pack(">HH", 10, 40) + ss("/") + ss("") + b"\x00"
ch_open = struct.pack(">HH", 20, 10) + ss("")
confirm = struct.pack(">HH", 85, 10) + b"\x00"
publish = struct.pack(">HHH", 60, 40, 0) + ss("amq.topic") + ss("sensors.temp") + b"\x00"
headers = table(ss("x-key") + b"S" + ls("k1") + ss("n") + b"F" + table(ss("a") + b"A" + struct.pack(">I", 2) + b"t\x01"))
hdr = struct.pack(">HHQH", 60, 0, 5, 0x9000 | 0x2000 | 0x1000) + ss("application/json") + headers + b"\x02"
body = b"hello"
put("amqp_frame", "session", frame(1, 0, start_ok) + frame(1, 0, tune_ok) + frame(1, 0, open_) + frame(1, 1, ch_open) + frame(1, 1, confirm) + frame(1, 1, publish) + frame(2, 1, hdr) + frame(3, 1, body) + frame(8, 0, b""))

# HTTP produce bodies, as the HTTP tests send them (every encoding, both header forms)
for i, body in enumerate([
    {"records": [{"value": {"temp": 21.5}}]},
    {"records": [{"key": "dev-1", "value": "plain text", "encoding": "string", "headers": {"source": "seed"}}]},
    {"records": [{"key": "AAEC", "value": "aGVsbG8=", "encoding": "base64", "headers": [{"key": "a", "value": "MQ=="}, {"key": "a", "value": "Mg=="}], "timestamp": 1700000000000, "partition": 0}]},
]):
    put("http_produce", f"body-{i}", json.dumps(body))

# Config: the packaged config file
put("config_toml", "debian", open(os.path.join(here, "..", "cross", "debian", "tributary.toml")).read())

# TLS: a certificate chain, its key and a client CA, split at 0xFF; and a bare DER certificate
os.chdir(tempfile.mkdtemp())
subprocess.run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -out cert.pem -days 3650 -subj /CN=tributary-seed -addext subjectAltName=DNS:localhost 2>/dev/null", shell=True, check=True)
subprocess.run("openssl x509 -in cert.pem -outform der -out cert.der", shell=True, check=True)
cert, key, der = open("cert.pem","rb").read(), open("key.pem","rb").read(), open("cert.der","rb").read()
put("tls_certs", "cert-key", cert + b"\xff" + key)
put("tls_certs", "cert-key-ca", cert + b"\xff" + key + b"\xff" + cert)
put("tls_certs", "der", der)

# A compacted (version 3) stored batch: span after the header, records with
# offset deltas, a tombstone with its delete horizon (storage/src/batch.rs).
import zlib
def zz(n): return (n << 1) ^ (n >> 63)
def v3_record(delta, ts, key, value, horizon=0):
    body = varint(delta) + varint(zz(ts)) + varint(len(key) + 1) + key
    body += (varint(len(value) + 1) + value) if value is not None else (varint(0) + varint(horizon))
    body += varint(1) + varint(1) + b"h" + varint(2) + b"hv"
    return varint(len(body)) + body
records = v3_record(0, 1_700_000_000_000, b"dev-1", b"on") + v3_record(7, 1_700_000_000_500, b"dev-2", None, 1_700_086_400_000)
count, span, end = 2, 12, 4096
tail = struct.pack("<IqqQQ", count, 1_700_000_000_000, 1_700_000_000_500, end, span) + records
put("stored_batch", "compacted-v3", bytes([0x54, 3]) + struct.pack("<I", zlib.crc32(b"\x03" + tail)) + tail)

# Pipelines: statements of every shape, then records (NUL, then lines:
# eight bytes of time, then the value).
rec = b"\x00" + b"\n".join([
    struct.pack("<q", 1_700_000_000_000 + i * 700) + json.dumps({"t": i * 1.5, "v": i % 3, "id": i, "n": "abc"}).encode()
    for i in range(12)
]) + b"\n" + struct.pack("<q", 5) + b"not json"
for name, sql in [
    ("tumble", "INSERT INTO o SELECT _key, COUNT(*) AS n, AVG(t), STDDEV(t), APPROX_PERCENTILE(t, 0.9), window_start FROM s WHERE t IS NOT NULL GROUP BY _key, TUMBLE(_ts, INTERVAL '2' SECOND) HAVING COUNT(*) > 1 WITH (lateness = '1s')"),
    ("hop", "INSERT INTO o SELECT COUNT(*), SUM(v) FROM s GROUP BY HOP(_ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND)"),
    ("session", "INSERT INTO o SELECT _key, FIRST_VALUE(t), LAST_VALUE(t) FROM s GROUP BY _key, SESSION(_ts, INTERVAL '1' SECOND)"),
    ("count", "INSERT INTO o SELECT _key, MIN(t), MAX(n) FROM s GROUP BY _key, COUNT_WINDOW(3)"),
    ("project", "INSERT INTO o SELECT id, CASE WHEN t > 3 THEN 'hi' ELSE 'lo' END AS b, CAST(t AS INT), UPPER(n), _headers['h'] FROM s WHERE v IN (0, 1)"),
    ("table-join", "INSERT INTO o SELECT s.id, t.n FROM s LEFT JOIN t ON s._key = t._key"),
    ("interval-join", "INSERT INTO o SELECT a.id, b.id FROM a JOIN b ON a.v = b.v AND b._ts BETWEEN a._ts - INTERVAL '1' SECOND AND a._ts + INTERVAL '1' SECOND"),
]:
    put("pipeline_sql", name, sql.encode() + rec)

# The Raft log's segment files (raft_wal): the first byte picks the purged
# index; then records as the target frames them (a 2-byte length before each
# body), each body a log id (term, node id, index: postcard varints) and the
# rest of an entry.
def wal_body(term, node, index, rest=b"\x00"):
    return varint(term) + varint(node) + varint(index) + rest
def wal_framed(bodies):
    return b"".join(struct.pack(">H", len(b)) + b for b in bodies)
put("raft_wal", "four-entries", b"\x00" + wal_framed([wal_body(1, 1, i) for i in range(1, 5)]))
put("raft_wal", "new-term-purged-2", b"\x02" + wal_framed([wal_body(1, 1, 1), wal_body(1, 1, 2), wal_body(2, 3, 3, b"\x01\x05hello")]))
put("raft_wal", "out-of-order", b"\x00" + wal_framed([wal_body(1, 1, 1), wal_body(1, 1, 3)]))
