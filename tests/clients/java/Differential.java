// Differential Kafka-compatibility suite: one list of scenarios run with the
// Apache Kafka Java client (kafka-clients 4.x: producer, consumer, admin, and a
// few hand-built requests for what the client cannot be made to send) against
// one broker; the observable results are written as normalized JSON, and two
// such files (Apache Kafka's and Tributary's) are compared field by field.
//
// Build (from the repository root):
//   mkdir -p target/differential
//   javac -d target/differential -cp 'target/kafka-reference/lib/*' tests/clients/java/Differential.java
// (docs/kafka-compatibility.md has the whole procedure: both brokers, both runs, the comparison.)
// Run against one broker (writes OUT.json; exit 0 unless the broker cannot be reached):
//   java -cp 'target/differential:target/kafka-reference/lib/*' Differential BOOTSTRAP OUT.json [SCENARIO...]
// Compare (exit 1 on any difference not allowed by ALLOWED.md):
//   java -cp 'target/differential:target/kafka-reference/lib/*' Differential compare A.json B.json ALLOWED.md
//
// Normalization: every topic and group name carries a per-run prefix (so reruns
// on the same broker work) and is written without it; timestamps are the ones
// the suite chose, written relative to the run's base time; cluster ids,
// producer ids, member ids and durations are never written; offsets are
// absolute (every topic is fresh, so they must be equal). Errors are written
// as the client's exception class (ExecutionException and plain
// KafkaException wrappers removed); raw requests as the protocol error code.
//
// JSON: {"meta": {...}, "scenarios": {NAME: {FIELD: VALUE}}, "notes": {...},
// "timings_ms": {...}}. compare looks only at "scenarios": maps are walked
// (path NAME.FIELD.SUB...), anything else is one leaf compared as JSON text; a
// path present on one side only is a difference ("<absent>"). "notes" holds
// what differs legitimately from run to run (error messages, elapsed times) and
// is kept for reading, never compared. Every scenario has a "status" field: ok, timeout
// (the scenario hung past its limit: a failure, not a stall) or
// "failed: ExceptionClass" (an unexpected exception; the fields written before
// it stay).
//
// ALLOWED.md: every line of the form
//   - `PATH`: reason
// allows differences at PATH (`*` matches any run of characters, so
// `compaction.*` allows the whole scenario). docs/kafka-compatibility.md is
// written in that form and is the allow-list of the known differences.

import java.io.DataInputStream;
import java.io.EOFException;
import java.io.File;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.SocketTimeoutException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.Set;
import java.util.TreeMap;
import java.util.TreeSet;
import java.util.concurrent.Callable;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Collectors;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.SerializationFeature;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.AlterConfigOp;
import org.apache.kafka.clients.admin.Config;
import org.apache.kafka.clients.admin.ConfigEntry;
import org.apache.kafka.clients.admin.ConsumerGroupDescription;
import org.apache.kafka.clients.admin.CreateTopicsOptions;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.clients.admin.ListOffsetsOptions;
import org.apache.kafka.clients.admin.ListOffsetsResult.ListOffsetsResultInfo;
import org.apache.kafka.clients.admin.MemberDescription;
import org.apache.kafka.clients.admin.NewPartitions;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.admin.TransactionDescription;
import org.apache.kafka.clients.admin.TransactionListing;
import org.apache.kafka.clients.consumer.CloseOptions;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerGroupMetadata;
import org.apache.kafka.clients.consumer.ConsumerRebalanceListener;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.IsolationLevel;
import org.apache.kafka.common.KafkaException;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.TopicPartitionInfo;
import org.apache.kafka.common.compress.Compression;
import org.apache.kafka.common.config.ConfigResource;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.message.ApiVersionsRequestData;
import org.apache.kafka.common.message.InitProducerIdRequestData;
import org.apache.kafka.common.message.InitProducerIdResponseData;
import org.apache.kafka.common.message.MetadataRequestData;
import org.apache.kafka.common.message.MetadataResponseData;
import org.apache.kafka.common.message.ProduceRequestData;
import org.apache.kafka.common.message.ProduceResponseData;
import org.apache.kafka.common.message.RequestHeaderData;
import org.apache.kafka.common.protocol.ApiKeys;
import org.apache.kafka.common.protocol.ApiMessage;
import org.apache.kafka.common.protocol.ByteBufferAccessor;
import org.apache.kafka.common.protocol.ObjectSerializationCache;
import org.apache.kafka.common.record.internal.MemoryRecords;
import org.apache.kafka.common.record.internal.SimpleRecord;
import org.apache.kafka.common.requests.AbstractResponse;
import org.apache.kafka.common.requests.InitProducerIdResponse;
import org.apache.kafka.common.requests.MetadataResponse;
import org.apache.kafka.common.requests.ProduceResponse;
import org.apache.kafka.common.requests.RequestHeader;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class Differential {
    static final int FUTURE_S = 20;
    static final ObjectMapper JSON = new ObjectMapper().enable(SerializationFeature.INDENT_OUTPUT);

    static String bootstrap;
    static String prefix;
    /** Timestamps the suite gives records are BASE + small offsets; written as "+N". */
    static long base;

    // ------------------------------------------------------------------ main

    public static void main(String[] args) throws Exception {
        if (args.length == 4 && args[0].equals("compare")) {
            System.exit(compare(Path.of(args[1]), Path.of(args[2]), Path.of(args[3])));
        }
        if (args.length < 2) {
            System.err.println("usage: Differential BOOTSTRAP OUT.json [SCENARIO...]\n"
                + "       Differential compare A.json B.json ALLOWED.md");
            System.exit(2);
        }
        bootstrap = args[0];
        Set<String> only = new HashSet<>(List.of(args).subList(2, args.length));
        System.exit(run(Path.of(args[1]), only));
    }

    interface Body {
        void run(Ctx c) throws Exception;
    }

    record Scenario(String name, int timeoutS, Body body) {}

    static List<Scenario> scenarios() {
        List<Scenario> l = new ArrayList<>();
        for (String codec : List.of("none", "gzip", "snappy", "lz4", "zstd")) {
            l.add(new Scenario("compression_" + codec, 60, c -> compression(c, codec)));
        }
        l.add(new Scenario("list_offsets", 60, Differential::listOffsets));
        l.add(new Scenario("metadata_configs", 60, Differential::metadataConfigs));
        l.add(new Scenario("topic_admin", 90, Differential::topicAdmin));
        for (String a : List.of("range", "roundrobin", "cooperative-sticky")) {
            l.add(new Scenario("group_" + a.replace('-', '_'), 120, c -> groupAssignor(c, a)));
        }
        l.add(new Scenario("group_static", 120, Differential::groupStatic));
        l.add(new Scenario("group_offsets", 60, Differential::groupOffsets));
        l.add(new Scenario("idempotence", 60, Differential::idempotence));
        l.add(new Scenario("transactions", 120, Differential::transactions));
        l.add(new Scenario("compaction", 120, Differential::compaction));
        l.add(new Scenario("errors", 90, Differential::errors));
        l.add(new Scenario("raw_requests", 60, Differential::rawRequests));
        return l;
    }

    static int run(Path out, Set<String> only) throws Exception {
        prefix = "dt" + Long.toString(System.currentTimeMillis(), 36)
            + Integer.toString((int) (Math.random() * 1296), 36);
        base = (System.currentTimeMillis() / 1000) * 1000;
        try (Admin a = admin()) {
            a.describeCluster().nodes().get(15, TimeUnit.SECONDS);
        } catch (Exception e) {
            System.err.println("cannot reach " + bootstrap + ": " + errName(e));
            return 2;
        }
        Map<String, Object> root = new LinkedHashMap<>();
        Map<String, Object> meta = new LinkedHashMap<>();
        meta.put("bootstrap", bootstrap);
        meta.put("prefix", prefix);
        meta.put("client", org.apache.kafka.common.utils.internals.AppInfoParser.getVersion());
        Map<String, Object> results = new LinkedHashMap<>(), notes = new LinkedHashMap<>(),
            timings = new LinkedHashMap<>();
        root.put("meta", meta);
        root.put("scenarios", results);
        root.put("notes", notes);
        root.put("timings_ms", timings);
        long t0 = System.nanoTime();
        for (Scenario s : scenarios()) {
            if (!only.isEmpty() && !only.contains(s.name())) continue;
            Ctx c = new Ctx(s.name());
            long st = System.nanoTime();
            ExecutorService ex = Executors.newSingleThreadExecutor(r -> {
                Thread t = new Thread(r, "scenario-" + s.name());
                t.setDaemon(true);
                return t;
            });
            Future<?> f = ex.submit(() -> {
                s.body().run(c);
                return null;
            });
            String status;
            try {
                f.get(s.timeoutS(), TimeUnit.SECONDS);
                status = "ok";
            } catch (java.util.concurrent.TimeoutException e) {
                status = "timeout";
                f.cancel(true);
            } catch (ExecutionException e) {
                status = "failed: " + errName(e.getCause());
                c.note("failure", String.valueOf(e.getCause()));
                e.getCause().printStackTrace();
            }
            c.closeAll();
            ex.shutdownNow();
            long ms = (System.nanoTime() - st) / 1_000_000;
            Map<String, Object> r = new LinkedHashMap<>();
            r.put("status", status);
            synchronized (c.out) {
                r.putAll(c.out);
            }
            results.put(s.name(), r);
            if (!c.notes.isEmpty()) notes.put(s.name(), new LinkedHashMap<>(c.notes));
            timings.put(s.name(), ms);
            System.err.printf("%-28s %-10s %6d ms%n", s.name(), status, ms);
            // Written after each scenario, so a killed run still leaves what it had.
            JSON.writeValue(out.toFile(), root);
        }
        timings.put("total", (System.nanoTime() - t0) / 1_000_000);
        JSON.writeValue(out.toFile(), root);
        return 0;
    }

    // ------------------------------------------------------------- context

    static class Ctx {
        final String name;
        final Map<String, Object> out = new LinkedHashMap<>();
        final Map<String, Object> notes = Collections.synchronizedMap(new LinkedHashMap<>());
        final List<AutoCloseable> resources = Collections.synchronizedList(new ArrayList<>());

        Ctx(String name) {
            this.name = name;
        }

        void put(String k, Object v) {
            synchronized (out) {
                out.put(k, v);
            }
        }

        void note(String k, Object v) {
            notes.put(k, v);
        }

        <T extends AutoCloseable> T track(T t) {
            resources.add(t);
            return t;
        }

        String topic(String s) {
            return prefix + "-" + name + "-" + s;
        }

        String group(String s) {
            return prefix + "-" + name + "-g" + s;
        }

        /** Runs `body`; returns "ok" or the error's class (the message goes to notes). */
        String attempt(String field, Callable<?> body) {
            String r;
            try {
                Object v = body.call();
                r = v instanceof String s ? s : "ok";
            } catch (Exception e) {
                r = errName(e);
                note(field, String.valueOf(unwrap(e)));
            }
            put(field, r);
            return r;
        }

        void closeAll() {
            List<AutoCloseable> l;
            synchronized (resources) {
                l = new ArrayList<>(resources);
                resources.clear();
            }
            Collections.reverse(l);
            for (AutoCloseable a : l) {
                try {
                    if (a instanceof KafkaConsumer<?, ?> k) k.close(CloseOptions.timeout(Duration.ofSeconds(2)));
                    else if (a instanceof KafkaProducer<?, ?> p) p.close(Duration.ofSeconds(2));
                    else if (a instanceof Admin ad) ad.close(Duration.ofSeconds(2));
                    else a.close();
                } catch (Exception e) {
                    // already closed, or closed from the wrong thread after a timeout
                }
            }
        }
    }

    // ------------------------------------------------------------- clients

    static Admin admin() {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, 10000);
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, 20000);
        p.put(AdminClientConfig.CLIENT_ID_CONFIG, "differential-admin");
        return Admin.create(p);
    }

    static Admin admin(Ctx c) {
        return c.track(admin());
    }

    static Properties producerProps(Object... kv) {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, 15000);
        p.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, 10000);
        p.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, 20000);
        p.put(ProducerConfig.LINGER_MS_CONFIG, 0);
        for (int i = 0; i < kv.length; i += 2) p.put(kv[i], kv[i + 1]);
        return p;
    }

    static KafkaProducer<String, String> producer(Ctx c, Object... kv) {
        return c.track(new KafkaProducer<>(producerProps(kv)));
    }

    static Properties consumerProps(String group, Object... kv) {
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.ALLOW_AUTO_CREATE_TOPICS_CONFIG, "false");
        p.put(ConsumerConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, 15000);
        p.put(ConsumerConfig.REQUEST_TIMEOUT_MS_CONFIG, 10000);
        p.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, 200);
        if (group != null) {
            p.put(ConsumerConfig.GROUP_ID_CONFIG, group);
            p.put(ConsumerConfig.GROUP_PROTOCOL_CONFIG, "classic");
            p.put(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, 10000);
            p.put(ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG, 1000);
            p.put(ConsumerConfig.MAX_POLL_INTERVAL_MS_CONFIG, 30000);
        }
        for (int i = 0; i < kv.length; i += 2) p.put(kv[i], kv[i + 1]);
        return p;
    }

    static KafkaConsumer<String, String> consumer(Ctx c, String group, Object... kv) {
        return c.track(new KafkaConsumer<>(consumerProps(group, kv)));
    }

    static void createTopic(Admin a, String name, int partitions, Map<String, String> configs)
        throws Exception {
        a.createTopics(List.of(new NewTopic(name, Optional.of(partitions), Optional.empty())
            .configs(configs))).all().get(FUTURE_S, TimeUnit.SECONDS);
        awaitTopic(a, name, partitions);
    }

    /** Until every partition of `name` has a leader (a just-created topic may lag). */
    static void awaitTopic(Admin a, String name, int partitions) throws Exception {
        long deadline = System.currentTimeMillis() + 15000;
        while (true) {
            try {
                TopicDescription d = a.describeTopics(List.of(name)).allTopicNames()
                    .get(FUTURE_S, TimeUnit.SECONDS).get(name);
                if (d.partitions().size() == partitions
                    && d.partitions().stream().allMatch(p -> p.leader() != null)) return;
            } catch (ExecutionException e) {
                // not there yet
            }
            if (System.currentTimeMillis() > deadline) throw new IllegalStateException("topic " + name + " never appeared");
            Thread.sleep(100);
        }
    }

    // ------------------------------------------------------------- helpers

    static Throwable unwrap(Throwable t) {
        while (t != null && t.getCause() != null
            && (t instanceof ExecutionException || t instanceof CompletionException
                || t.getClass() == KafkaException.class
                || t.getClass() == RuntimeException.class)) {
            t = t.getCause();
        }
        return t;
    }

    static String errName(Throwable t) {
        t = unwrap(t);
        if (t instanceof java.util.concurrent.TimeoutException) return "FutureTimedOut";
        return t.getClass().getSimpleName();
    }

    static String rel(long ts) {
        if (ts < 0) return String.valueOf(ts);
        long d = ts - base;
        if (Math.abs(d) > 86_400_000L) return "abs";
        return (d >= 0 ? "+" : "") + d;
    }

    static String q(String s) {
        if (s == null) return "null";
        if (s.length() > 40) return "<" + s.length() + " chars sha " + sha(s) + ">";
        return "\"" + s + "\"";
    }

    static String qb(byte[] b) {
        return b == null ? "null" : q(new String(b, StandardCharsets.UTF_8));
    }

    static String sha(String s) {
        try {
            byte[] d = MessageDigest.getInstance("SHA-256").digest(s.getBytes(StandardCharsets.UTF_8));
            StringBuilder sb = new StringBuilder();
            for (int i = 0; i < 4; i++) sb.append(String.format("%02x", d[i]));
            return sb.toString();
        } catch (Exception e) {
            throw new RuntimeException(e);
        }
    }

    static String fmt(ConsumerRecord<String, String> r) {
        StringBuilder sb = new StringBuilder();
        sb.append('p').append(r.partition()).append('@').append(r.offset())
            .append(" k=").append(q(r.key())).append(" v=").append(q(r.value()))
            .append(" ts=").append(rel(r.timestamp())).append(' ').append(r.timestampType())
            .append(" h=[");
        boolean first = true;
        for (Header h : r.headers()) {
            if (!first) sb.append(',');
            first = false;
            sb.append(h.key()).append('=').append(qb(h.value()));
        }
        return sb.append(']').toString();
    }

    static String fmt(RecordMetadata m) {
        return "p" + m.partition() + "@" + m.offset() + " ts=" + rel(m.timestamp());
    }

    static List<TopicPartition> tps(String topic, int n) {
        List<TopicPartition> l = new ArrayList<>();
        for (int i = 0; i < n; i++) l.add(new TopicPartition(topic, i));
        return l;
    }

    /**
     * Every record of `topic` from its start up to its end as the isolation
     * level sees it, in partition then offset order, read by a fresh
     * assign()-ing consumer; "INCOMPLETE" last when the end was not reached.
     */
    static List<ConsumerRecord<String, String>> readAll(Ctx c, String topic, int parts, String isolation,
        long timeoutMs) {
        KafkaConsumer<String, String> k = consumer(c, null,
            ConsumerConfig.ISOLATION_LEVEL_CONFIG, isolation);
        try {
            List<TopicPartition> tps = tps(topic, parts);
            k.assign(tps);
            k.seekToBeginning(tps);
            Map<TopicPartition, Long> end = k.endOffsets(tps);
            List<ConsumerRecord<String, String>> got = new ArrayList<>();
            long deadline = System.currentTimeMillis() + timeoutMs;
            while (tps.stream().anyMatch(tp -> k.position(tp) < end.get(tp))) {
                if (System.currentTimeMillis() > deadline) {
                    c.note("readAll_incomplete_" + topic.substring(prefix.length()), true);
                    got.add(null);
                    break;
                }
                for (ConsumerRecord<String, String> r : k.poll(Duration.ofMillis(200))) got.add(r);
            }
            got.sort((a, b) -> a == null ? 1 : b == null ? -1
                : a.partition() != b.partition() ? Integer.compare(a.partition(), b.partition())
                : Long.compare(a.offset(), b.offset()));
            return got;
        } finally {
            k.close(CloseOptions.timeout(Duration.ofSeconds(2)));
            c.resources.remove(k);
        }
    }

    static List<String> fmtAll(List<ConsumerRecord<String, String>> l) {
        return l.stream().map(r -> r == null ? "INCOMPLETE" : fmt(r)).collect(Collectors.toList());
    }

    static Map<String, Object> offsets(Admin a, String topic, int parts, OffsetSpec spec,
        IsolationLevel iso) throws Exception {
        Map<TopicPartition, OffsetSpec> req = new LinkedHashMap<>();
        for (TopicPartition tp : tps(topic, parts)) req.put(tp, spec);
        Map<TopicPartition, ListOffsetsResultInfo> r = a.listOffsets(req, new ListOffsetsOptions(iso))
            .all().get(FUTURE_S, TimeUnit.SECONDS);
        Map<String, Object> m = new TreeMap<>();
        for (var e : r.entrySet()) {
            m.put("p" + e.getKey().partition(), e.getValue().offset() + " ts=" + rel(e.getValue().timestamp()));
        }
        return m;
    }

    static String offsetOne(Admin a, TopicPartition tp, OffsetSpec spec) {
        try {
            ListOffsetsOptions o = new ListOffsetsOptions();
            o.timeoutMs(8000);
            ListOffsetsResultInfo i = a.listOffsets(Map.of(tp, spec), o).partitionResult(tp)
                .get(FUTURE_S, TimeUnit.SECONDS);
            return i.offset() + " ts=" + rel(i.timestamp());
        } catch (Exception e) {
            return errName(e);
        }
    }

    static Map<String, Object> committed(Admin a, String group) throws Exception {
        // require_stable: offsets of a transaction whose markers are still being written are
        // waited for (Kafka answers UNSTABLE_OFFSET_COMMIT and the admin client asks again).
        Map<TopicPartition, OffsetAndMetadata> m = a.listConsumerGroupOffsets(Map.of(group,
            new org.apache.kafka.clients.admin.ListConsumerGroupOffsetsSpec()),
            new org.apache.kafka.clients.admin.ListConsumerGroupOffsetsOptions().requireStable(true))
            .partitionsToOffsetAndMetadata(group).get(FUTURE_S, TimeUnit.SECONDS);
        Map<String, Object> r = new TreeMap<>();
        for (var e : m.entrySet()) {
            String t = e.getKey().topic();
            t = t.startsWith(prefix) ? t.substring(t.lastIndexOf('-') + 1) : t;
            OffsetAndMetadata o = e.getValue();
            // The offset, and the commit metadata after a slash when there is some.
            r.put(t + "-p" + e.getKey().partition(), o == null ? "null"
                : o.metadata() == null || o.metadata().isEmpty() ? String.valueOf(o.offset())
                : o.offset() + "/" + o.metadata());
        }
        return r;
    }

    static Map<String, Object> describeGroup(Admin a, String group) throws Exception {
        ConsumerGroupDescription d = a.describeConsumerGroups(List.of(group)).describedGroups().get(group)
            .get(FUTURE_S, TimeUnit.SECONDS);
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("state", String.valueOf(d.groupState()));
        m.put("type", String.valueOf(d.type()));
        m.put("simple", d.isSimpleConsumerGroup());
        m.put("assignor", d.partitionAssignor());
        m.put("coordinator", d.coordinator() == null ? "none" : String.valueOf(d.coordinator().id()));
        m.put("members", d.members().size());
        List<Integer> sizes = new ArrayList<>();
        List<String> instances = new ArrayList<>();
        for (MemberDescription md : d.members()) {
            sizes.add(md.assignment().topicPartitions().size());
            instances.add(md.groupInstanceId().orElse("-"));
        }
        Collections.sort(sizes);
        Collections.sort(instances);
        m.put("member_assignment_sizes", sizes);
        m.put("member_instance_ids", instances);
        return m;
    }

    static List<String> assignment(KafkaConsumer<?, ?> k) {
        return k.assignment().stream().map(tp -> "p" + tp.partition()).sorted().collect(Collectors.toList());
    }

    /**
     * Polls every consumer in turn (records go to `seen`) until their
     * assignments cover `total` partitions without overlap and have not changed
     * for 1.5 s. Returns whether that happened before the deadline.
     */
    static boolean stabilize(List<KafkaConsumer<String, String>> cs, int total,
        Map<String, ConsumerRecord<String, String>> seen, long timeoutMs) {
        long deadline = System.currentTimeMillis() + timeoutMs;
        String last = "";
        long since = System.currentTimeMillis();
        while (System.currentTimeMillis() < deadline) {
            for (KafkaConsumer<String, String> k : cs) {
                for (ConsumerRecord<String, String> r : k.poll(Duration.ofMillis(100))) {
                    seen.put(r.partition() + "@" + r.offset(), r);
                }
            }
            Set<TopicPartition> union = new HashSet<>();
            int sum = 0;
            StringBuilder sig = new StringBuilder();
            for (KafkaConsumer<String, String> k : cs) {
                union.addAll(k.assignment());
                sum += k.assignment().size();
                sig.append(assignment(k)).append('|');
            }
            boolean ok = union.size() == total && sum == total;
            if (!sig.toString().equals(last)) {
                last = sig.toString();
                since = System.currentTimeMillis();
            } else if (ok && System.currentTimeMillis() - since >= 1500) {
                return true;
            }
        }
        return false;
    }

    static void pollFor(List<KafkaConsumer<String, String>> cs, Map<String, ConsumerRecord<String, String>> seen,
        long ms) {
        long deadline = System.currentTimeMillis() + ms;
        while (System.currentTimeMillis() < deadline) {
            for (KafkaConsumer<String, String> k : cs) {
                for (ConsumerRecord<String, String> r : k.poll(Duration.ofMillis(100))) {
                    seen.put(r.partition() + "@" + r.offset(), r);
                }
            }
        }
    }

    static Map<String, Object> configValues(Admin a, String topic, List<String> names) throws Exception {
        ConfigResource res = new ConfigResource(ConfigResource.Type.TOPIC, topic);
        Config cfg = a.describeConfigs(List.of(res)).all().get(FUTURE_S, TimeUnit.SECONDS).get(res);
        Map<String, Object> m = new LinkedHashMap<>();
        for (String n : names) {
            ConfigEntry e = cfg.get(n);
            m.put(n, e == null ? "<absent>" : e.value() + " (" + e.source() + (e.isReadOnly() ? ", read-only" : "") + ")");
        }
        return m;
    }

    // ------------------------------------------------------------- scenarios

    /** Produce/consume round trip with one codec: headers, null key, tombstone, empty and large values. */
    static void compression(Ctx c, String codec) throws Exception {
        Admin a = admin(c);
        String topic = c.topic("t");
        createTopic(a, topic, 1, Map.of());
        KafkaProducer<String, String> p = producer(c, ProducerConfig.COMPRESSION_TYPE_CONFIG, codec,
            ProducerConfig.LINGER_MS_CONFIG, 100, ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        String big = "0123456789abcdef".repeat(1000);
        List<ProducerRecord<String, String>> recs = new ArrayList<>();
        recs.add(new ProducerRecord<>(topic, 0, base + 1, "k1", "v1", List.of(
            new RecordHeader("a", "1".getBytes(StandardCharsets.UTF_8)),
            new RecordHeader("a", "2".getBytes(StandardCharsets.UTF_8)),
            new RecordHeader("b", null))));
        recs.add(new ProducerRecord<>(topic, 0, base + 2, null, "v-nullkey"));
        recs.add(new ProducerRecord<>(topic, 0, base + 3, "k3", (String) null));
        recs.add(new ProducerRecord<>(topic, 0, base + 4, "k4", "", List.of(
            new RecordHeader("e", new byte[0]))));
        recs.add(new ProducerRecord<>(topic, 0, base + 5, "k5", big));
        recs.add(new ProducerRecord<>(topic, 0, base + 6, "ключ", "värde ✓"));
        List<Future<RecordMetadata>> fs = new ArrayList<>();
        for (var r : recs) fs.add(p.send(r));
        p.flush();
        List<String> sent = new ArrayList<>();
        for (var f : fs) sent.add(fmt(f.get(FUTURE_S, TimeUnit.SECONDS)));
        // A second, separate batch after the first.
        sent.add(fmt(p.send(new ProducerRecord<>(topic, 0, base + 7, "k7", "second-batch")).get(FUTURE_S,
            TimeUnit.SECONDS)));
        c.put("sent", sent);
        c.put("records", fmtAll(readAll(c, topic, 1, "read_uncommitted", 15000)));
        c.put("end_offset", offsetOne(a, new TopicPartition(topic, 0), OffsetSpec.latest()));
    }

    static void listOffsets(Ctx c) throws Exception {
        Admin a = admin(c);
        String topic = c.topic("t");
        createTopic(a, topic, 2, Map.of());
        TopicPartition p0 = new TopicPartition(topic, 0), p1 = new TopicPartition(topic, 1);
        c.put("empty_earliest", offsetOne(a, p0, OffsetSpec.earliest()));
        c.put("empty_latest", offsetOne(a, p0, OffsetSpec.latest()));
        c.put("empty_by_timestamp", offsetOne(a, p0, OffsetSpec.forTimestamp(base)));
        c.put("empty_max_timestamp", offsetOne(a, p0, OffsetSpec.maxTimestamp()));
        KafkaProducer<String, String> p = producer(c);
        // p0: one batch per record, timestamps out of order.
        long[] ts = {100, 50, 300, 200, 250};
        for (int i = 0; i < ts.length; i++) {
            p.send(new ProducerRecord<>(topic, 0, base + ts[i], "k" + i, "v" + i)).get(FUTURE_S, TimeUnit.SECONDS);
        }
        // p1: one batch of five records.
        KafkaProducer<String, String> pb = producer(c, ProducerConfig.LINGER_MS_CONFIG, 200);
        List<Future<RecordMetadata>> fs = new ArrayList<>();
        for (int i = 0; i < ts.length; i++) {
            fs.add(pb.send(new ProducerRecord<>(topic, 1, base + ts[i], "k" + i, "v" + i)));
        }
        pb.flush();
        for (var f : fs) f.get(FUTURE_S, TimeUnit.SECONDS);
        for (TopicPartition tp : List.of(p0, p1)) {
            String n = "p" + tp.partition() + "_";
            c.put(n + "earliest", offsetOne(a, tp, OffsetSpec.earliest()));
            c.put(n + "latest", offsetOne(a, tp, OffsetSpec.latest()));
            for (long t : new long[] {-10_000, 0, 50, 100, 101, 250, 260, 300, 301}) {
                c.put(n + "ts_" + t, offsetOne(a, tp, OffsetSpec.forTimestamp(base + t)));
            }
            c.put(n + "max_timestamp", offsetOne(a, tp, OffsetSpec.maxTimestamp()));
        }
        c.put("latest_read_committed", offsets(a, topic, 2, OffsetSpec.latest(), IsolationLevel.READ_COMMITTED));
        // The consumer's view: offsetsForTimes / beginningOffsets / endOffsets.
        KafkaConsumer<String, String> k = consumer(c, null);
        Map<TopicPartition, Long> q = new LinkedHashMap<>();
        q.put(p0, base + 260);
        q.put(p1, base + 1000);
        Map<String, String> oft = new TreeMap<>();
        k.offsetsForTimes(q).forEach((tp, o) -> oft.put("p" + tp.partition(),
            o == null ? "null" : o.offset() + " ts=" + rel(o.timestamp())));
        c.put("consumer_offsets_for_times", oft);
        // DeleteRecords moves the log start offset.
        c.attempt("delete_records_p0_before_2", () -> String.valueOf(a.deleteRecords(Map.of(p0,
            org.apache.kafka.clients.admin.RecordsToDelete.beforeOffset(2))).lowWatermarks().get(p0)
            .get(FUTURE_S, TimeUnit.SECONDS).lowWatermark()));
        c.put("after_delete_records_p0_earliest", offsetOne(a, p0, OffsetSpec.earliest()));
    }

    static final List<String> CONFIGS = List.of("cleanup.policy", "retention.ms", "retention.bytes",
        "max.message.bytes", "min.compaction.lag.ms", "delete.retention.ms", "segment.bytes");
    static final List<String> EXTRA_CONFIGS = List.of("max.compaction.lag.ms", "min.cleanable.dirty.ratio",
        "segment.ms", "compression.type", "message.timestamp.type", "min.insync.replicas",
        "unclean.leader.election.enable");

    static void metadataConfigs(Ctx c) throws Exception {
        Admin a = admin(c);
        String plain = c.topic("plain"), conf = c.topic("conf");
        createTopic(a, plain, 3, Map.of());
        Map<String, String> cfg = new LinkedHashMap<>();
        cfg.put("cleanup.policy", "compact");
        cfg.put("retention.ms", "3600000");
        cfg.put("retention.bytes", "10485760");
        cfg.put("max.message.bytes", "65536");
        cfg.put("min.compaction.lag.ms", "1000");
        cfg.put("delete.retention.ms", "5000");
        cfg.put("segment.bytes", "2097152");
        createTopic(a, conf, 2, cfg);
        DescribeClusterResult cl = a.describeCluster();
        Collection<Node> nodes = cl.nodes().get(FUTURE_S, TimeUnit.SECONDS);
        c.put("cluster_node_ids", nodes.stream().map(Node::id).sorted().collect(Collectors.toList()));
        Node ctl = cl.controller().get(FUTURE_S, TimeUnit.SECONDS);
        c.put("cluster_controller_present", ctl != null && !ctl.isEmpty());
        Set<String> listed = a.listTopics().names().get(FUTURE_S, TimeUnit.SECONDS);
        c.put("list_topics_has_both", listed.contains(plain) && listed.contains(conf));
        c.put("list_topics_internal_visible", listed.stream().anyMatch(t -> t.startsWith("__")));
        Map<String, TopicDescription> d = a.describeTopics(List.of(plain, conf)).allTopicNames()
            .get(FUTURE_S, TimeUnit.SECONDS);
        for (String t : List.of(plain, conf)) {
            String n = t.equals(plain) ? "plain" : "conf";
            TopicDescription td = d.get(t);
            Map<String, Object> m = new LinkedHashMap<>();
            m.put("partitions", td.partitions().size());
            m.put("internal", td.isInternal());
            m.put("topic_id_set", td.topicId() != null && !td.topicId().equals(org.apache.kafka.common.Uuid.ZERO_UUID));
            List<String> ps = new ArrayList<>();
            for (TopicPartitionInfo pi : td.partitions()) {
                ps.add("p" + pi.partition() + " leader=" + (pi.leader() == null ? "none" : pi.leader().id())
                    + " replicas=" + pi.replicas().size() + " isr=" + pi.isr().size());
            }
            m.put("partition_info", ps);
            c.put("describe_" + n, m);
            c.put("configs_" + n, configValues(a, t, CONFIGS));
            c.put("extra_configs_" + n, configValues(a, t, EXTRA_CONFIGS));
        }
        // Metadata as the consumer sees it.
        KafkaConsumer<String, String> k = consumer(c, null);
        List<PartitionInfo> pi = k.partitionsFor(conf);
        c.put("consumer_partitions_for", pi.stream().map(x -> "p" + x.partition() + " leader="
            + (x.leader() == null ? "none" : x.leader().id())).sorted().collect(Collectors.toList()));
        // Broker resource.
        try {
            ConfigResource br = new ConfigResource(ConfigResource.Type.BROKER,
                String.valueOf(nodes.iterator().next().id()));
            Config bc = a.describeConfigs(List.of(br)).all().get(FUTURE_S, TimeUnit.SECONDS).get(br);
            c.put("broker_configs_nonempty", !bc.entries().isEmpty());
            ConfigEntry e = bc.get("log.retention.hours");
            c.put("broker_log_retention_hours", e == null ? "<absent>" : e.value());
            c.note("broker_config_count", bc.entries().size());
        } catch (Exception e) {
            c.put("broker_configs_nonempty", errName(e));
        }
    }

    static void topicAdmin(Ctx c) throws Exception {
        Admin a = admin(c);
        String t = c.topic("t");
        Map<String, String> cfg = Map.of("retention.ms", "7200000", "cleanup.policy", "delete");
        c.attempt("validate_only_create", () -> a.createTopics(List.of(new NewTopic(c.topic("vo"), 2, (short) 1)),
            new CreateTopicsOptions().validateOnly(true)).all().get(FUTURE_S, TimeUnit.SECONDS));
        c.put("validate_only_listed", a.listTopics().names().get(FUTURE_S, TimeUnit.SECONDS).contains(c.topic("vo")));
        var cr = a.createTopics(List.of(new NewTopic(t, 2, (short) 1).configs(cfg)));
        c.attempt("create_with_configs", () -> cr.all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("create_result_partitions", () -> String.valueOf(cr.numPartitions(t).get(FUTURE_S, TimeUnit.SECONDS)));
        c.attempt("create_result_replication", () -> String.valueOf(cr.replicationFactor(t).get(FUTURE_S, TimeUnit.SECONDS)));
        c.attempt("create_result_retention_ms", () -> {
            Config rc = cr.config(t).get(FUTURE_S, TimeUnit.SECONDS);
            ConfigEntry e = rc.get("retention.ms");
            return e == null ? "<absent>" : e.value() + " (" + e.source() + ")";
        });
        awaitTopic(a, t, 2);
        c.put("configs_after_create", configValues(a, t, List.of("retention.ms", "cleanup.policy")));
        // Errors at create.
        c.attempt("create_existing", () -> a.createTopics(List.of(new NewTopic(t, 2, (short) 1))).all()
            .get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("create_partitions_0", () -> a.createTopics(List.of(new NewTopic(c.topic("z0"), 0, (short) 1)))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("create_partitions_minus5", () -> a.createTopics(List.of(new NewTopic(c.topic("m5"), -5, (short) 1)))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("create_default_partitions", () -> {
            String n = c.topic("dflt");
            a.createTopics(List.of(new NewTopic(n, Optional.empty(), Optional.empty()))).all()
                .get(FUTURE_S, TimeUnit.SECONDS);
            return "ok partitions=" + a.describeTopics(List.of(n)).allTopicNames().get(FUTURE_S, TimeUnit.SECONDS)
                .get(n).partitions().size();
        });
        c.attempt("create_replication_3", () -> a.createTopics(List.of(new NewTopic(c.topic("r3"), 1, (short) 3)))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("create_retention_ms_abc", () -> a.createTopics(List.of(new NewTopic(c.topic("abc"), 1, (short) 1)
            .configs(Map.of("retention.ms", "abc")))).all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("create_cleanup_policy_nope", () -> a.createTopics(List.of(new NewTopic(c.topic("nope"), 1, (short) 1)
            .configs(Map.of("cleanup.policy", "nope")))).all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("create_unknown_config", () -> a.createTopics(List.of(new NewTopic(c.topic("unk"), 1, (short) 1)
            .configs(Map.of("no.such.config", "1")))).all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("create_bad_name", () -> a.createTopics(List.of(new NewTopic(c.topic("bad/name"), 1, (short) 1)))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("create_name_dotdot", () -> a.createTopics(List.of(new NewTopic("..", 1, (short) 1)))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        c.put("failed_creates_listed", a.listTopics().names().get(FUTURE_S, TimeUnit.SECONDS).stream()
            .filter(n -> n.startsWith(c.topic(""))).map(n -> n.substring(c.topic("").length())).sorted()
            .collect(Collectors.toList()));
        // Partitions.
        c.attempt("increase_to_5", () -> a.createPartitions(Map.of(t, NewPartitions.increaseTo(5))).all()
            .get(FUTURE_S, TimeUnit.SECONDS));
        awaitTopic(a, t, 5);
        c.put("partitions_after_increase", a.describeTopics(List.of(t)).allTopicNames()
            .get(FUTURE_S, TimeUnit.SECONDS).get(t).partitions().size());
        c.attempt("increase_to_fewer_3", () -> a.createPartitions(Map.of(t, NewPartitions.increaseTo(3))).all()
            .get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("increase_to_same_5", () -> a.createPartitions(Map.of(t, NewPartitions.increaseTo(5))).all()
            .get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("increase_unknown_topic", () -> a.createPartitions(Map.of(c.topic("nosuch"),
            NewPartitions.increaseTo(5))).all().get(FUTURE_S, TimeUnit.SECONDS));
        // Produce into a new partition.
        KafkaProducer<String, String> p = producer(c);
        c.attempt("produce_to_new_partition_4", () -> fmt(p.send(new ProducerRecord<>(t, 4, base, "k", "v"))
            .get(FUTURE_S, TimeUnit.SECONDS)));
        // Config changes.
        ConfigResource res = new ConfigResource(ConfigResource.Type.TOPIC, t);
        c.attempt("incremental_set_retention", () -> a.incrementalAlterConfigs(Map.of(res, List.of(
            new AlterConfigOp(new ConfigEntry("retention.ms", "1234567"), AlterConfigOp.OpType.SET))))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        c.put("after_set", configValues(a, t, List.of("retention.ms", "cleanup.policy")));
        c.attempt("incremental_delete_retention", () -> a.incrementalAlterConfigs(Map.of(res, List.of(
            new AlterConfigOp(new ConfigEntry("retention.ms", null), AlterConfigOp.OpType.DELETE))))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        c.put("after_delete", configValues(a, t, List.of("retention.ms", "cleanup.policy")));
        c.attempt("incremental_set_bad_value", () -> a.incrementalAlterConfigs(Map.of(res, List.of(
            new AlterConfigOp(new ConfigEntry("retention.ms", "abc"), AlterConfigOp.OpType.SET))))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("incremental_append_cleanup_policy", () -> a.incrementalAlterConfigs(Map.of(res, List.of(
            new AlterConfigOp(new ConfigEntry("cleanup.policy", "compact"), AlterConfigOp.OpType.APPEND))))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        c.put("after_append", configValues(a, t, List.of("cleanup.policy")));
        // Delete.
        c.attempt("delete", () -> a.deleteTopics(List.of(t)).all().get(FUTURE_S, TimeUnit.SECONDS));
        long deadline = System.currentTimeMillis() + 15000;
        String after = "still there";
        while (System.currentTimeMillis() < deadline) {
            try {
                a.describeTopics(List.of(t)).allTopicNames().get(FUTURE_S, TimeUnit.SECONDS);
            } catch (ExecutionException e) {
                after = errName(e);
                break;
            }
            Thread.sleep(200);
        }
        c.put("describe_after_delete", after);
        c.put("listed_after_delete", a.listTopics().names().get(FUTURE_S, TimeUnit.SECONDS).contains(t));
        c.attempt("delete_again", () -> a.deleteTopics(List.of(t)).all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("delete_unknown", () -> a.deleteTopics(List.of(c.topic("nosuch"))).all()
            .get(FUTURE_S, TimeUnit.SECONDS));
        // Recreate after delete (Kafka may still be deleting: retried for up to 10 s).
        String rc = "?";
        deadline = System.currentTimeMillis() + 10000;
        while (System.currentTimeMillis() < deadline) {
            try {
                a.createTopics(List.of(new NewTopic(t, 1, (short) 1))).all().get(FUTURE_S, TimeUnit.SECONDS);
                rc = "ok";
                break;
            } catch (ExecutionException e) {
                rc = errName(e);
                Thread.sleep(300);
            }
        }
        c.put("recreate_after_delete", rc);
        if (rc.equals("ok")) {
            awaitTopic(a, t, 1);
            c.put("recreated_end_offset", offsetOne(a, new TopicPartition(t, 0), OffsetSpec.latest()));
            c.put("recreated_retention_ms", configValues(a, t, List.of("retention.ms")));
        }
    }

    static class Counter implements ConsumerRebalanceListener {
        final AtomicInteger revoked = new AtomicInteger(), assigned = new AtomicInteger(), lost = new AtomicInteger();

        public void onPartitionsRevoked(Collection<TopicPartition> p) {
            if (!p.isEmpty()) revoked.incrementAndGet();
        }

        public void onPartitionsAssigned(Collection<TopicPartition> p) {
            assigned.incrementAndGet();
        }

        public void onPartitionsLost(Collection<TopicPartition> p) {
            lost.incrementAndGet();
        }

        int total() {
            return revoked.get() + assigned.get() + lost.get();
        }
    }

    static void produceSpread(KafkaProducer<String, String> p, String topic, int parts, int per) throws Exception {
        List<Future<RecordMetadata>> fs = new ArrayList<>();
        for (int part = 0; part < parts; part++) {
            for (int i = 0; i < per; i++) {
                fs.add(p.send(new ProducerRecord<>(topic, part, base + i, "k" + part + "-" + i, "v" + part + "-" + i)));
            }
        }
        p.flush();
        for (var f : fs) f.get(FUTURE_S, TimeUnit.SECONDS);
    }

    static void groupAssignor(Ctx c, String assignor) throws Exception {
        String cls = switch (assignor) {
            case "range" -> "org.apache.kafka.clients.consumer.RangeAssignor";
            case "roundrobin" -> "org.apache.kafka.clients.consumer.RoundRobinAssignor";
            default -> "org.apache.kafka.clients.consumer.CooperativeStickyAssignor";
        };
        Admin a = admin(c);
        String topic = c.topic("t"), group = c.group("");
        createTopic(a, topic, 4, Map.of());
        KafkaProducer<String, String> p = producer(c);
        produceSpread(p, topic, 4, 2);
        Counter l1 = new Counter(), l2 = new Counter();
        KafkaConsumer<String, String> c1 = consumer(c, group,
            ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG, cls, ConsumerConfig.CLIENT_ID_CONFIG, "c1");
        KafkaConsumer<String, String> c2 = consumer(c, group,
            ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG, cls, ConsumerConfig.CLIENT_ID_CONFIG, "c2");
        c1.subscribe(List.of(topic), l1);
        c2.subscribe(List.of(topic), l2);
        Map<String, ConsumerRecord<String, String>> seen = new HashMap<>();
        boolean stable = stabilize(List.of(c1, c2), 4, seen, 45000);
        c.put("stable_with_two", stable);
        List<Integer> sizes = new ArrayList<>(List.of(c1.assignment().size(), c2.assignment().size()));
        Collections.sort(sizes);
        c.put("assignment_sizes", sizes);
        long deadline = System.currentTimeMillis() + 15000;
        while (seen.size() < 8 && System.currentTimeMillis() < deadline) pollFor(List.of(c1, c2), seen, 200);
        c.put("consumed_distinct", seen.size());
        c.put("consumed", seen.values().stream().map(Differential::fmt).sorted().collect(Collectors.toList()));
        c.attempt("commit_c1", () -> {
            c1.commitSync(Duration.ofSeconds(15));
            return null;
        });
        c.attempt("commit_c2", () -> {
            c2.commitSync(Duration.ofSeconds(15));
            return null;
        });
        c.put("describe_two", describeGroup(a, group));
        c.put("committed", committed(a, group));
        // Lag as an admin computes it: latest - committed.
        produceSpread(p, topic, 1, 3);
        Map<String, Object> latest = offsets(a, topic, 4, OffsetSpec.latest(), IsolationLevel.READ_UNCOMMITTED);
        Map<String, Object> comm = committed(a, group);
        Map<String, Object> lag = new TreeMap<>();
        for (int i = 0; i < 4; i++) {
            long end = Long.parseLong(((String) latest.get("p" + i)).split(" ")[0]);
            Object co = comm.get("t-p" + i);
            lag.put("p" + i, co instanceof Number n ? end - n.longValue() : "no commit");
        }
        c.put("lag", lag);
        // Member leaves: the other one gets everything.
        c2.close(CloseOptions.timeout(Duration.ofSeconds(10)));
        c.resources.remove(c2);
        boolean restable = stabilize(List.of(c1), 4, seen, 45000);
        c.put("stable_after_leave", restable);
        c.put("after_leave_c1_size", c1.assignment().size());
        c.put("describe_one", describeGroup(a, group));
        c.put("c1_rebalance_callbacks_nonzero", l1.total() > 0);
        c1.close(CloseOptions.timeout(Duration.ofSeconds(10)));
        c.resources.remove(c1);
        c.put("describe_empty", describeGroup(a, group));
        c.put("committed_after_close", committed(a, group));
    }

    static void groupStatic(Ctx c) throws Exception {
        Admin a = admin(c);
        String topic = c.topic("t"), group = c.group("");
        createTopic(a, topic, 4, Map.of());
        String cls = "org.apache.kafka.clients.consumer.RangeAssignor";
        Counter l1 = new Counter();
        KafkaConsumer<String, String> c1 = consumer(c, group, ConsumerConfig.GROUP_INSTANCE_ID_CONFIG, "i1",
            ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG, cls, ConsumerConfig.CLIENT_ID_CONFIG, "c1");
        c1.subscribe(List.of(topic), l1);
        Map<String, ConsumerRecord<String, String>> seen = new HashMap<>();
        c.put("c1_alone_stable", stabilize(List.of(c1), 4, seen, 30000));
        c.put("c1_alone_size", c1.assignment().size());
        KafkaConsumer<String, String> c2 = consumer(c, group, ConsumerConfig.GROUP_INSTANCE_ID_CONFIG, "i2",
            ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG, cls, ConsumerConfig.CLIENT_ID_CONFIG, "c2");
        c2.subscribe(List.of(topic));
        c.put("two_stable", stabilize(List.of(c1, c2), 4, seen, 45000));
        List<String> c2Before = assignment(c2);
        c.put("c1_assignment", assignment(c1));
        c.put("c2_assignment", c2Before);
        c.put("describe_two", describeGroup(a, group));
        int gen1 = c1.groupMetadata().generationId();
        int cb1 = l1.total();
        // A static member closes without leaving, and a new instance with its id comes back.
        c2.close(CloseOptions.timeout(Duration.ofSeconds(10)));
        c.resources.remove(c2);
        pollFor(List.of(c1), seen, 1000);
        c.put("describe_after_static_close", describeGroup(a, group));
        KafkaConsumer<String, String> c2b = consumer(c, group, ConsumerConfig.GROUP_INSTANCE_ID_CONFIG, "i2",
            ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG, cls, ConsumerConfig.CLIENT_ID_CONFIG, "c2b");
        c2b.subscribe(List.of(topic));
        c.put("rejoin_stable", stabilize(List.of(c1, c2b), 4, seen, 45000));
        c.put("rejoin_same_assignment", assignment(c2b).equals(c2Before));
        c.put("rejoin_c1_generation_unchanged", c1.groupMetadata().generationId() == gen1);
        c.put("rejoin_c2b_generation_equals_c1", c2b.groupMetadata().generationId() == c1.groupMetadata().generationId());
        c.put("rejoin_c1_callbacks", l1.total() - cb1);
        c.put("describe_rejoined", describeGroup(a, group));
        // A second live instance with c1's id: the older one is fenced.
        KafkaConsumer<String, String> c3 = consumer(c, group, ConsumerConfig.GROUP_INSTANCE_ID_CONFIG, "i1",
            ConsumerConfig.PARTITION_ASSIGNMENT_STRATEGY_CONFIG, cls, ConsumerConfig.CLIENT_ID_CONFIG, "c3");
        c3.subscribe(List.of(topic));
        String fenced = "not fenced";
        long deadline = System.currentTimeMillis() + 25000;
        boolean c1Alive = true;
        while (System.currentTimeMillis() < deadline) {
            c3.poll(Duration.ofMillis(100));
            c2b.poll(Duration.ofMillis(100));
            if (c1Alive) {
                try {
                    c1.poll(Duration.ofMillis(100));
                } catch (Exception e) {
                    fenced = errName(e);
                    c.note("fenced", String.valueOf(e));
                    c1Alive = false;
                }
            }
            if (!c1Alive && c3.assignment().size() + c2b.assignment().size() == 4) break;
        }
        c.put("duplicate_instance_old_member", fenced);
        c.put("duplicate_instance_new_size", c3.assignment().size());
        c.put("describe_final", describeGroup(a, group));
    }

    static void groupOffsets(Ctx c) throws Exception {
        Admin a = admin(c);
        String topic = c.topic("t"), group = c.group("");
        createTopic(a, topic, 2, Map.of());
        KafkaProducer<String, String> p = producer(c);
        produceSpread(p, topic, 2, 3);
        // A consumer that assigns its partitions and commits with the group's id.
        KafkaConsumer<String, String> k = consumer(c, group);
        TopicPartition p0 = new TopicPartition(topic, 0), p1 = new TopicPartition(topic, 1);
        k.assign(List.of(p0, p1));
        c.attempt("commit_with_metadata", () -> {
            k.commitSync(Map.of(p0, new OffsetAndMetadata(2, "meta-p0"), p1, new OffsetAndMetadata(1)),
                Duration.ofSeconds(15));
            return null;
        });
        Map<TopicPartition, OffsetAndMetadata> m = a.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata()
            .get(FUTURE_S, TimeUnit.SECONDS);
        Map<String, Object> r = new TreeMap<>();
        for (var e : m.entrySet()) {
            r.put("p" + e.getKey().partition(), e.getValue().offset() + " metadata=" + q(e.getValue().metadata())
                + " leader_epoch=" + e.getValue().leaderEpoch().map(String::valueOf).orElse("none"));
        }
        c.put("admin_committed", r);
        Map<String, String> kc = new TreeMap<>();
        k.committed(Set.of(p0, p1), Duration.ofSeconds(15)).forEach((tp, o) -> kc.put("p" + tp.partition(),
            o == null ? "null" : o.offset() + " metadata=" + q(o.metadata())));
        c.put("consumer_committed", kc);
        c.attempt("commit_past_end", () -> {
            k.commitSync(Map.of(p0, new OffsetAndMetadata(100)), Duration.ofSeconds(15));
            return null;
        });
        c.put("after_commit_past_end", committed(a, group));
        c.attempt("commit_to_end", () -> {
            k.commitSync(Map.of(p0, new OffsetAndMetadata(3)), Duration.ofSeconds(15));
            return null;
        });
        k.close(CloseOptions.timeout(Duration.ofSeconds(5)));
        c.resources.remove(k);
        // A group member starts where the group committed.
        KafkaConsumer<String, String> g = consumer(c, group);
        g.subscribe(List.of(topic));
        Map<String, ConsumerRecord<String, String>> seen = new HashMap<>();
        stabilize(List.of(g), 2, seen, 30000);
        long deadline = System.currentTimeMillis() + 10000;
        while (seen.size() < 2 && System.currentTimeMillis() < deadline) pollFor(List.of(g), seen, 200);
        c.put("member_reads_from_committed", seen.values().stream().map(Differential::fmt).sorted()
            .collect(Collectors.toList()));
        c.put("member_positions", Map.of("p0", g.position(p0), "p1", g.position(p1)));
        c.attempt("admin_alter_while_member", () -> a.alterConsumerGroupOffsets(group,
            Map.of(p0, new OffsetAndMetadata(0))).all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("delete_group_while_member", () -> a.deleteConsumerGroups(List.of(group)).all()
            .get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("admin_delete_offsets_while_member", () -> a.deleteConsumerGroupOffsets(group, Set.of(p1))
            .all().get(FUTURE_S, TimeUnit.SECONDS));
        g.close(CloseOptions.timeout(Duration.ofSeconds(10)));
        c.resources.remove(g);
        c.attempt("admin_alter_empty", () -> a.alterConsumerGroupOffsets(group,
            Map.of(p0, new OffsetAndMetadata(1), p1, new OffsetAndMetadata(2))).all().get(FUTURE_S, TimeUnit.SECONDS));
        c.put("after_admin_alter", committed(a, group));
        c.attempt("admin_delete_offsets", () -> a.deleteConsumerGroupOffsets(group, Set.of(p1)).all()
            .get(FUTURE_S, TimeUnit.SECONDS));
        c.put("after_delete_offsets", committed(a, group));
        c.attempt("delete_offsets_unknown_group", () -> a.deleteConsumerGroupOffsets(c.group("nosuch"),
            Set.of(p0)).all().get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("delete_offsets_unknown_partition", () -> a.deleteConsumerGroupOffsets(group,
            Set.of(new TopicPartition(topic, 9))).all().get(FUTURE_S, TimeUnit.SECONDS));
        Set<String> listed = new TreeSet<>();
        a.listGroups().all().get(FUTURE_S, TimeUnit.SECONDS).forEach(x -> listed.add(x.groupId()));
        c.put("listed", listed.contains(group));
        c.attempt("delete_group_empty", () -> a.deleteConsumerGroups(List.of(group)).all()
            .get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("committed_after_delete_group", () -> String.valueOf(committed(a, group)));
        c.attempt("delete_group_unknown", () -> a.deleteConsumerGroups(List.of(c.group("nosuch"))).all()
            .get(FUTURE_S, TimeUnit.SECONDS));
        c.attempt("describe_group_unknown", () -> String.valueOf(describeGroup(a, c.group("nosuch"))));
        c.attempt("offsets_group_unknown", () -> String.valueOf(committed(a, c.group("nosuch"))));
    }

    static void idempotence(Ctx c) throws Exception {
        Admin a = admin(c);
        String topic = c.topic("t");
        createTopic(a, topic, 2, Map.of());
        KafkaProducer<String, String> p = producer(c, ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true",
            "max.in.flight.requests.per.connection", 5, ProducerConfig.RETRIES_CONFIG,
            Integer.MAX_VALUE, ProducerConfig.LINGER_MS_CONFIG, 5, ProducerConfig.BATCH_SIZE_CONFIG, 200);
        List<Future<RecordMetadata>> fs = new ArrayList<>();
        for (int i = 0; i < 200; i++) {
            fs.add(p.send(new ProducerRecord<>(topic, i % 2, base + i, "k" + i, "value-" + i)));
        }
        p.flush();
        Map<Integer, List<Long>> offs = new TreeMap<>();
        for (var f : fs) {
            RecordMetadata md = f.get(FUTURE_S, TimeUnit.SECONDS);
            offs.computeIfAbsent(md.partition(), x -> new ArrayList<>()).add(md.offset());
        }
        Map<String, Object> dense = new TreeMap<>();
        for (var e : offs.entrySet()) {
            List<Long> l = e.getValue();
            boolean d = true;
            for (int i = 0; i < l.size(); i++) d &= l.get(i) == i;
            dense.put("p" + e.getKey(), l.size() + " records, offsets 0.." + (l.size() - 1) + " in order: " + d);
        }
        c.put("java_producer_offsets", dense);
        c.put("end_offsets", offsets(a, topic, 2, OffsetSpec.latest(), IsolationLevel.READ_UNCOMMITTED));
        List<ConsumerRecord<String, String>> all = readAll(c, topic, 2, "read_uncommitted", 15000);
        boolean inOrder = true;
        Map<Integer, Integer> next = new HashMap<>(Map.of(0, 0, 1, 1));
        for (ConsumerRecord<String, String> r : all) {
            if (r == null) {
                inOrder = false;
                break;
            }
            int n = next.get(r.partition());
            inOrder &= r.value().equals("value-" + n);
            next.put(r.partition(), n + 2);
        }
        c.put("read_back_count", all.size());
        c.put("read_back_in_send_order", inOrder);
        for (int part = 0; part < 2; part++) {
            TopicPartition tp = new TopicPartition(topic, part);
            c.attempt("describe_producers_p" + part, () -> String.valueOf(producersOf(a, tp, true)));
        }
        TopicPartition beyond = new TopicPartition(topic, 7);
        c.attempt("describe_producers_unknown_partition", () -> String.valueOf(producersOf(a, beyond, true)));

        // Hand-built batches: a duplicate, a gap, an unknown producer.
        String t2 = c.topic("raw");
        createTopic(a, t2, 1, Map.of());
        try (Raw raw = new Raw(bootstrap)) {
            InitProducerIdResponseData ip = ((InitProducerIdResponse) raw.call(ApiKeys.INIT_PRODUCER_ID, (short) 4,
                new InitProducerIdRequestData().setTransactionalId(null).setTransactionTimeoutMs(60000)
                    .setProducerId(-1).setProducerEpoch((short) -1))).data();
            c.put("init_producer_id", "error=" + ip.errorCode() + " epoch=" + ip.producerEpoch()
                + " id_valid=" + (ip.producerId() >= 0));
            long pid = ip.producerId();
            short ep = ip.producerEpoch();
            MemoryRecords b0 = MemoryRecords.withIdempotentRecords(Compression.NONE, pid, ep, 0,
                new SimpleRecord(base, "a".getBytes(), "1".getBytes()),
                new SimpleRecord(base, "b".getBytes(), "2".getBytes()),
                new SimpleRecord(base, "c".getBytes(), "3".getBytes()));
            c.put("batch_seq0", raw.produce(t2, 0, b0.buffer().duplicate(), null));
            c.put("batch_seq0_again", raw.produce(t2, 0, b0.buffer().duplicate(), null));
            MemoryRecords b3 = MemoryRecords.withIdempotentRecords(Compression.NONE, pid, ep, 3,
                new SimpleRecord(base, "d".getBytes(), "4".getBytes()),
                new SimpleRecord(base, "e".getBytes(), "5".getBytes()));
            c.put("batch_seq3", raw.produce(t2, 0, b3.buffer().duplicate(), null));
            c.put("batch_seq0_after_seq3", raw.produce(t2, 0, b0.buffer().duplicate(), null));
            c.put("batch_seq3_again", raw.produce(t2, 0, b3.buffer().duplicate(), null));
            MemoryRecords gap = MemoryRecords.withIdempotentRecords(Compression.NONE, pid, ep, 10,
                new SimpleRecord(base, "x".getBytes(), "gap".getBytes()));
            c.put("batch_seq10_gap", raw.produce(t2, 0, gap.buffer().duplicate(), null));
            MemoryRecords old = MemoryRecords.withIdempotentRecords(Compression.NONE, pid, (short) (ep + 1), 0,
                new SimpleRecord(base, "n".getBytes(), "newer-epoch".getBytes()));
            c.put("batch_newer_epoch_seq0", raw.produce(t2, 0, old.buffer().duplicate(), null));
            MemoryRecords older = MemoryRecords.withIdempotentRecords(Compression.NONE, pid, ep, 5,
                new SimpleRecord(base, "o".getBytes(), "older-epoch".getBytes()));
            c.put("batch_older_epoch", raw.produce(t2, 0, older.buffer().duplicate(), null));
            MemoryRecords unknown = MemoryRecords.withIdempotentRecords(Compression.NONE, pid + 100000, (short) 0, 7,
                new SimpleRecord(base, "u".getBytes(), "unknown".getBytes()));
            c.put("batch_unknown_producer_seq7", raw.produce(t2, 0, unknown.buffer().duplicate(), null));
        }
        c.put("raw_records", fmtAll(readAll(c, t2, 1, "read_uncommitted", 15000)));
        TopicPartition rp = new TopicPartition(t2, 0);
        c.attempt("describe_producers", () -> String.valueOf(producersOf(a, rp, true)));
    }

    /** What DescribeProducers says of a partition, without the producer ids (they differ). */
    static List<String> producersOf(Admin a, TopicPartition tp, boolean withEpoch) throws Exception {
        List<String> out = new ArrayList<>();
        for (var x : a.describeProducers(List.of(tp)).partitionResult(tp).get(FUTURE_S, TimeUnit.SECONDS)
                .activeProducers()) {
            out.add("seq=" + x.lastSequence() + (withEpoch ? " epoch=" + x.producerEpoch() : "")
                + " ts=" + rel(x.lastTimestamp())
                + " coordinator_epoch=" + (x.coordinatorEpoch().isPresent()
                    ? String.valueOf(x.coordinatorEpoch().getAsInt()) : "none")
                + " txn_start=" + (x.currentTransactionStartOffset().isPresent()
                    ? String.valueOf(x.currentTransactionStartOffset().getAsLong()) : "none"));
        }
        Collections.sort(out);
        return out;
    }

    static void transactions(Ctx c) throws Exception {
        Admin a = admin(c);
        String topic = c.topic("t"), txid = c.topic("txn"), group = c.group("");
        createTopic(a, topic, 2, Map.of());
        KafkaProducer<String, String> p1 = producer(c, ProducerConfig.TRANSACTIONAL_ID_CONFIG, txid,
            ProducerConfig.TRANSACTION_TIMEOUT_CONFIG, 30000);
        p1.initTransactions();
        p1.beginTransaction();
        p1.send(new ProducerRecord<>(topic, 0, base + 1, "k", "c1"));
        p1.send(new ProducerRecord<>(topic, 0, base + 2, "k", "c2"));
        p1.send(new ProducerRecord<>(topic, 1, base + 3, "k", "c3"));
        p1.commitTransaction();
        p1.beginTransaction();
        p1.send(new ProducerRecord<>(topic, 0, base + 4, "k", "a1"));
        p1.send(new ProducerRecord<>(topic, 1, base + 5, "k", "a2"));
        p1.flush();
        p1.abortTransaction();
        p1.beginTransaction();
        p1.send(new ProducerRecord<>(topic, 0, base + 6, "k", "c4"));
        p1.commitTransaction();
        awaitTxnDone(a, txid);
        c.put("read_committed", fmtAll(readAll(c, topic, 2, "read_committed", 15000)));
        c.put("read_uncommitted", fmtAll(readAll(c, topic, 2, "read_uncommitted", 15000)));
        c.put("latest_committed", offsets(a, topic, 2, OffsetSpec.latest(), IsolationLevel.READ_COMMITTED));
        c.put("latest_uncommitted", offsets(a, topic, 2, OffsetSpec.latest(), IsolationLevel.READ_UNCOMMITTED));
        c.put("describe_after_commit", describeTxn(a, txid));
        // An open transaction: the last stable offset stays before it.
        p1.beginTransaction();
        p1.send(new ProducerRecord<>(topic, 1, base + 7, "k", "open1"));
        p1.flush();
        c.put("open_latest_committed", offsets(a, topic, 2, OffsetSpec.latest(), IsolationLevel.READ_COMMITTED));
        c.put("open_latest_uncommitted", offsets(a, topic, 2, OffsetSpec.latest(), IsolationLevel.READ_UNCOMMITTED));
        c.put("open_read_committed", fmtAll(readAll(c, topic, 2, "read_committed", 15000)));
        c.put("describe_open", describeTxn(a, txid));
        // Epochs apart: Kafka's transaction protocol V2 bumps them at every commit (see `zombie`).
        TopicPartition t1 = new TopicPartition(topic, 1);
        c.attempt("describe_producers_open", () -> String.valueOf(producersOf(a, t1, false)));
        Set<String> listed = new HashSet<>();
        for (TransactionListing tl : a.listTransactions().all().get(FUTURE_S, TimeUnit.SECONDS)) {
            if (tl.transactionalId().equals(txid)) listed.add(String.valueOf(tl.state()));
        }
        c.put("list_transactions", listed);
        // Zombie fencing: a second producer with the same id.
        KafkaProducer<String, String> p2 = producer(c, ProducerConfig.TRANSACTIONAL_ID_CONFIG, txid,
            ProducerConfig.TRANSACTION_TIMEOUT_CONFIG, 30000);
        c.attempt("fencer_init", () -> {
            p2.initTransactions();
            return null;
        });
        String fenced;
        try {
            Future<RecordMetadata> f = p1.send(new ProducerRecord<>(topic, 0, base + 8, "k", "zombie"));
            try {
                p1.commitTransaction();
                fenced = "commit ok";
            } catch (Exception e) {
                fenced = "commit: " + errName(e);
                c.note("zombie_commit", String.valueOf(e));
            }
            try {
                f.get(FUTURE_S, TimeUnit.SECONDS);
                fenced += ", send ok";
            } catch (Exception e) {
                fenced += ", send: " + errName(e);
            }
        } catch (Exception e) {
            fenced = "send threw: " + errName(e);
            c.note("zombie_send", String.valueOf(e));
        }
        c.put("zombie", fenced);
        // Offsets in a transaction, for a group no member has joined (generation -1, no member id).
        ConsumerGroupMetadata gm = consumer(c, group).groupMetadata();
        p2.beginTransaction();
        p2.send(new ProducerRecord<>(topic, 0, base + 9, "k", "f1"));
        p2.sendOffsetsToTransaction(Map.of(new TopicPartition(topic, 0), new OffsetAndMetadata(2, "in-txn")),
            gm);
        c.attempt("offsets_txn_commit", () -> {
            p2.commitTransaction();
            return null;
        });
        // Kafka's OffsetFetch answers nothing (rather than UNSTABLE_OFFSET_COMMIT) for a group whose
        // only offsets are a transaction's until its marker is written: wait for the markers.
        awaitTxnDone(a, txid);
        c.put("committed_after_commit", committed(a, group));
        p2.beginTransaction();
        p2.sendOffsetsToTransaction(Map.of(new TopicPartition(topic, 0), new OffsetAndMetadata(3),
            new TopicPartition(topic, 1), new OffsetAndMetadata(1)), gm);
        p2.abortTransaction();
        awaitTxnDone(a, txid);
        c.put("committed_after_abort", committed(a, group));
        c.put("describe_after_abort", describeTxn(a, txid));
        c.put("final_read_committed", fmtAll(readAll(c, topic, 2, "read_committed", 15000)));
        c.put("final_read_uncommitted", fmtAll(readAll(c, topic, 2, "read_uncommitted", 15000)));
        c.put("final_latest_committed", offsets(a, topic, 2, OffsetSpec.latest(), IsolationLevel.READ_COMMITTED));
        // A transaction timeout beyond the broker's maximum (Kafka: 15 minutes).
        KafkaProducer<String, String> p3 = producer(c, ProducerConfig.TRANSACTIONAL_ID_CONFIG, c.topic("txn-long"),
            ProducerConfig.TRANSACTION_TIMEOUT_CONFIG, 1_000_000);
        c.attempt("init_timeout_over_max", () -> {
            p3.initTransactions();
            return null;
        });
        c.attempt("describe_unknown_txn", () -> String.valueOf(describeTxn(a, c.topic("txn-nosuch"))));
    }

    /**
     * Kafka answers EndTxn once the commit or abort is decided and writes the markers after:
     * until DescribeTransactions shows the transaction complete (10 s at most), a read_committed
     * reader may still stop before it.
     */
    static void awaitTxnDone(Admin a, String txid) throws Exception {
        long deadline = System.currentTimeMillis() + 10000;
        while (System.currentTimeMillis() < deadline) {
            TransactionDescription d = a.describeTransactions(List.of(txid)).description(txid)
                .get(FUTURE_S, TimeUnit.SECONDS);
            String st = String.valueOf(d.state());
            if (!st.startsWith("Prepare") && !st.equals("Ongoing")) return;
            Thread.sleep(50);
        }
    }

    static Map<String, Object> describeTxn(Admin a, String txid) throws Exception {
        TransactionDescription d = a.describeTransactions(List.of(txid)).description(txid)
            .get(FUTURE_S, TimeUnit.SECONDS);
        // Kafka completes a commit or abort after answering EndTxn: wait (up to 5 s) for Complete*.
        long deadline = System.currentTimeMillis() + 5000;
        while (String.valueOf(d.state()).startsWith("Prepare") && System.currentTimeMillis() < deadline) {
            Thread.sleep(100);
            d = a.describeTransactions(List.of(txid)).description(txid).get(FUTURE_S, TimeUnit.SECONDS);
        }
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("state", String.valueOf(d.state()));
        m.put("partitions", d.topicPartitions().stream().map(tp -> (tp.topic().startsWith(prefix)
            ? tp.topic().substring(tp.topic().lastIndexOf('-') + 1) : tp.topic()) + "-p" + tp.partition()).sorted()
            .collect(Collectors.toList()));
        m.put("timeout_ms", d.transactionTimeoutMs());
        m.put("start_time_set", d.transactionStartTimeMs().isPresent());
        return m;
    }

    static void compaction(Ctx c) throws Exception {
        Admin a = admin(c);
        String topic = c.topic("t");
        Map<String, String> cfg = new LinkedHashMap<>();
        cfg.put("cleanup.policy", "compact");
        cfg.put("segment.ms", "100");
        cfg.put("min.cleanable.dirty.ratio", "0.01");
        cfg.put("delete.retention.ms", "1000");
        // Nothing is compacted until the records below are read back as written
        // (the cleaners run on their own clocks); then the lag goes to 0.
        cfg.put("min.compaction.lag.ms", "3600000");
        createTopic(a, topic, 1, cfg);
        KafkaProducer<String, String> p = producer(c);
        String[][] seq = {{"k0", "v0a"}, {"k1", "v1a"}, {"k2", "v2a"}, {"k0", "v0b"}, {"k1", null},
            {"k3", "v3a"}, {"k2", "v2b"}, {"k0", "v0c"}, {"k3", null}, {"k3", "v3b"}, {"k4", null}};
        Map<String, Long> lastOffset = new TreeMap<>();
        Map<String, String> expectLive = new TreeMap<>();
        for (int i = 0; i < seq.length; i++) {
            RecordMetadata md = p.send(new ProducerRecord<>(topic, 0, base + i, seq[i][0], seq[i][1]))
                .get(FUTURE_S, TimeUnit.SECONDS);
            lastOffset.put(seq[i][0], md.offset());
            if (seq[i][1] == null) expectLive.remove(seq[i][0]);
            else expectLive.put(seq[i][0], seq[i][1]);
        }
        // Roll Kafka's segments (segment.ms) so the records above are cleanable.
        for (int i = 0; i < 2; i++) {
            Thread.sleep(300);
            // Kafka rolls on record timestamps (newest minus the segment's first), not on the clock.
            p.send(new ProducerRecord<>(topic, 0, base + 100_000L * (i + 1), "filler" + i, "x"))
                .get(FUTURE_S, TimeUnit.SECONDS);
        }
        Set<Long> expectSurvivors = new TreeSet<>();
        for (var e : expectLive.entrySet()) expectSurvivors.add(lastOffset.get(e.getKey()));
        c.put("before_records", fmtAll(readAll(c, topic, 1, "read_uncommitted", 15000)));
        ConfigResource res = new ConfigResource(ConfigResource.Type.TOPIC, topic);
        a.incrementalAlterConfigs(Map.of(res, List.of(new AlterConfigOp(
            new ConfigEntry("min.compaction.lag.ms", "0"), AlterConfigOp.OpType.SET))))
            .all().get(FUTURE_S, TimeUnit.SECONDS);
        long t0 = System.currentTimeMillis();
        long deadline = t0 + 75000;
        boolean compacted = false;
        List<ConsumerRecord<String, String>> rs = List.of();
        while (System.currentTimeMillis() < deadline) {
            rs = readAll(c, topic, 1, "read_uncommitted", 10000);
            Set<Long> dataOffsets = new TreeSet<>();
            for (ConsumerRecord<String, String> r : rs) {
                if (r != null && r.key() != null && r.key().matches("k[0-9]") && r.value() != null) {
                    dataOffsets.add(r.offset());
                }
            }
            if (dataOffsets.equals(expectSurvivors)) {
                compacted = true;
                break;
            }
            Thread.sleep(2000);
        }
        c.note("compaction_wait_ms", System.currentTimeMillis() - t0);
        c.put("compacted_within_75s", compacted);
        Map<String, String> live = new TreeMap<>();
        List<String> tombs = new ArrayList<>();
        for (ConsumerRecord<String, String> r : rs) {
            if (r == null) continue;
            if (r.value() == null) {
                live.remove(r.key());
                tombs.add(r.key() + "@" + r.offset());
            } else {
                live.put(r.key(), r.value());
            }
        }
        c.put("latest_per_key", live);
        c.put("expected_latest_per_key_matches", live.entrySet().stream().filter(e -> e.getKey().matches("k[0-9]"))
            .collect(Collectors.toMap(Map.Entry::getKey, Map.Entry::getValue)).equals(expectLive));
        c.put("after_data_records", rs.stream().filter(r -> r != null && r.value() != null)
            .map(Differential::fmt).collect(Collectors.toList()));
        c.note("after_tombstones", tombs);
        c.note("after_records", fmtAll(rs));
        // Tombstones go once delete.retention.ms (1 s) has passed since compaction kept them; Kafka
        // drops them only in a later cleaning, so make the log dirty again and roll once more.
        Thread.sleep(1500);
        for (int i = 2; i < 4; i++) {
            p.send(new ProducerRecord<>(topic, 0, base + 100_000L * (i + 1), "filler" + i, "x"))
                .get(FUTURE_S, TimeUnit.SECONDS);
            Thread.sleep(300);
        }
        List<String> tombsLeft = List.of();
        long t1 = System.currentTimeMillis();
        deadline = t1 + 40000;
        while (System.currentTimeMillis() < deadline) {
            tombsLeft = readAll(c, topic, 1, "read_uncommitted", 10000).stream()
                .filter(r -> r != null && r.value() == null).map(r -> r.key() + "@" + r.offset())
                .collect(Collectors.toList());
            if (tombsLeft.isEmpty()) break;
            Thread.sleep(2000);
        }
        c.note("tombstone_wait_ms", System.currentTimeMillis() - t1);
        c.put("tombstones_left_after_40s", tombsLeft);
        c.put("after_earliest", offsetOne(a, new TopicPartition(topic, 0), OffsetSpec.earliest()));
        c.put("after_latest", offsetOne(a, new TopicPartition(topic, 0), OffsetSpec.latest()));
        // A consumer positioned at a compacted-away offset moves to the next record.
        KafkaConsumer<String, String> k = consumer(c, null);
        TopicPartition tp = new TopicPartition(topic, 0);
        k.assign(List.of(tp));
        k.seek(tp, 1);
        String first = "none";
        long dl = System.currentTimeMillis() + 10000;
        while (System.currentTimeMillis() < dl) {
            ConsumerRecords<String, String> got = k.poll(Duration.ofMillis(200));
            if (!got.isEmpty()) {
                first = fmt(got.iterator().next());
                break;
            }
        }
        c.put("first_record_from_offset_1", first);
        // A record without a key on a compacted topic.
        c.attempt("produce_null_key", () -> fmt(p.send(new ProducerRecord<>(topic, 0, base + 30, null, "nokey"))
            .get(FUTURE_S, TimeUnit.SECONDS)));
    }

    static void errors(Ctx c) throws Exception {
        Admin a = admin(c);
        String missing = c.topic("nosuch");
        KafkaProducer<String, String> p = producer(c, ProducerConfig.MAX_BLOCK_MS_CONFIG, 4000);
        c.attempt("produce_unknown_topic", () -> fmt(p.send(new ProducerRecord<>(missing, "k", "v"))
            .get(FUTURE_S, TimeUnit.SECONDS)));
        c.put("unknown_topic_created", a.listTopics().names().get(FUTURE_S, TimeUnit.SECONDS).contains(missing));
        c.attempt("describe_unknown_topic", () -> String.valueOf(a.describeTopics(List.of(missing))
            .allTopicNames().get(FUTURE_S, TimeUnit.SECONDS).size()));
        KafkaConsumer<String, String> k = consumer(c, null);
        c.attempt("consumer_partitions_for_unknown", () -> {
            List<PartitionInfo> l = k.partitionsFor(missing, Duration.ofSeconds(5));
            return "ok " + (l == null ? "null" : l.size() + " partitions");
        });
        c.attempt("describe_configs_unknown_topic", () -> String.valueOf(a.describeConfigs(List.of(
            new ConfigResource(ConfigResource.Type.TOPIC, missing))).all().get(FUTURE_S, TimeUnit.SECONDS).size()));
        c.attempt("list_offsets_unknown_topic", () -> offsetOne(a, new TopicPartition(missing, 0), OffsetSpec.latest()));
        String known = c.topic("small");
        createTopic(a, known, 1, Map.of("max.message.bytes", "1024"));
        c.attempt("list_offsets_unknown_partition", () -> offsetOne(a, new TopicPartition(known, 5), OffsetSpec.latest()));
        // max.message.bytes=1024: Kafka counts the whole batch (61 bytes of header + records).
        for (int size : new int[] {500, 940, 1000, 1100, 2000}) {
            String v = "x".repeat(size);
            c.attempt("produce_value_" + size + "_to_max_1024", () -> fmt(p.send(new ProducerRecord<>(known, 0, base,
                "k", v)).get(FUTURE_S, TimeUnit.SECONDS)));
        }
        // Ten 200-byte records in one batch (over the limit together; Kafka's producer splits it).
        String known2 = c.topic("small2");
        createTopic(a, known2, 1, Map.of("max.message.bytes", "1024"));
        KafkaProducer<String, String> pb = producer(c, ProducerConfig.LINGER_MS_CONFIG, 300,
            ProducerConfig.BATCH_SIZE_CONFIG, 65536);
        List<Future<RecordMetadata>> fs = new ArrayList<>();
        for (int i = 0; i < 10; i++) fs.add(pb.send(new ProducerRecord<>(known2, 0, base, "b" + i, "y".repeat(200))));
        pb.flush();
        List<String> br = new ArrayList<>();
        for (var f : fs) {
            try {
                br.add(fmt(f.get(FUTURE_S, TimeUnit.SECONDS)));
            } catch (Exception e) {
                br.add(errName(e));
            }
        }
        c.put("batch_of_ten_200_byte_records", br);
        // A client-side limit: over the producer's max.request.size.
        c.attempt("produce_over_max_request_size", () -> fmt(p.send(new ProducerRecord<>(known, 0, base, "k",
            "z".repeat(1_100_000))).get(FUTURE_S, TimeUnit.SECONDS)));
        // Fetching outside the log.
        String two = c.topic("two");
        createTopic(a, two, 1, Map.of());
        p.send(new ProducerRecord<>(two, 0, base, "k", "1")).get(FUTURE_S, TimeUnit.SECONDS);
        p.send(new ProducerRecord<>(two, 0, base, "k", "2")).get(FUTURE_S, TimeUnit.SECONDS);
        KafkaConsumer<String, String> none = consumer(c, null, ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "none");
        TopicPartition tp = new TopicPartition(two, 0);
        none.assign(List.of(tp));
        none.seek(tp, 50);
        String oor = "no error";
        long dl = System.currentTimeMillis() + 10000;
        while (System.currentTimeMillis() < dl) {
            try {
                if (!none.poll(Duration.ofMillis(200)).isEmpty()) {
                    oor = "records";
                    break;
                }
            } catch (Exception e) {
                oor = errName(e);
                break;
            }
        }
        c.put("fetch_offset_50_of_2_reset_none", oor);
        KafkaConsumer<String, String> latest = consumer(c, null, ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "latest");
        latest.assign(List.of(tp));
        latest.seek(tp, 50);
        latest.poll(Duration.ofMillis(1500));
        c.put("fetch_offset_50_of_2_reset_latest_position", latest.position(tp));
        KafkaConsumer<String, String> earliest = consumer(c, null);
        earliest.assign(List.of(tp));
        earliest.seek(tp, 50);
        List<String> got = new ArrayList<>();
        dl = System.currentTimeMillis() + 10000;
        while (got.size() < 2 && System.currentTimeMillis() < dl) {
            for (var r : earliest.poll(Duration.ofMillis(200))) got.add(fmt(r));
        }
        c.put("fetch_offset_50_of_2_reset_earliest", got);
        // Group APIs with bad arguments.
        KafkaConsumer<String, String> badSession = consumer(c, c.group("badsession"),
            ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, 1000, ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG, 300);
        badSession.subscribe(List.of(two));
        String bs = "no error";
        dl = System.currentTimeMillis() + 10000;
        while (System.currentTimeMillis() < dl) {
            try {
                badSession.poll(Duration.ofMillis(200));
                if (!badSession.assignment().isEmpty()) {
                    bs = "joined";
                    break;
                }
            } catch (Exception e) {
                bs = errName(e);
                break;
            }
        }
        c.put("join_session_timeout_1000", bs);
    }

    /** Requests the Java client would not send. */
    static void rawRequests(Ctx c) throws Exception {
        Admin a = admin(c);
        String topic = c.topic("t");
        createTopic(a, topic, 1, Map.of());
        MemoryRecords one = MemoryRecords.withRecords(Compression.NONE,
            new SimpleRecord(base, "k".getBytes(), "v".getBytes()));
        try (Raw raw = new Raw(bootstrap)) {
            c.put("produce_v9_ok", raw.produce(topic, 0, one.buffer().duplicate(), null));
            c.put("produce_unknown_topic", raw.produce(c.topic("nosuch"), 0, one.buffer().duplicate(), null));
            c.put("produce_unknown_partition_7", raw.produce(topic, 7, one.buffer().duplicate(), null));
            ByteBuffer bad = ByteBuffer.allocate(one.sizeInBytes());
            bad.put(one.buffer().duplicate());
            bad.flip();
            bad.put(bad.limit() - 1, (byte) (bad.get(bad.limit() - 1) ^ 0x55));
            c.put("produce_bad_crc", raw.produce(topic, 0, bad, null));
            MemoryRecords txnal = MemoryRecords.withTransactionalRecords(Compression.NONE, 12345L, (short) 0, 0,
                new SimpleRecord(base, "k".getBytes(), "v".getBytes()));
            c.put("produce_transactional_without_id", raw.produce(topic, 0, txnal.buffer().duplicate(), null));
            MetadataResponseData md = ((MetadataResponse) raw.call(ApiKeys.METADATA, (short) 12,
                new MetadataRequestData().setTopics(List.of(new MetadataRequestData.MetadataRequestTopic()
                    .setName(c.topic("nosuch")))).setAllowAutoTopicCreation(true))).data();
            c.put("metadata_unknown_topic_autocreate_true", md.topics().iterator().next().errorCode());
            MetadataResponseData md2 = ((MetadataResponse) raw.call(ApiKeys.METADATA, (short) 12,
                new MetadataRequestData().setTopics(List.of(new MetadataRequestData.MetadataRequestTopic()
                    .setName("bad/name"))).setAllowAutoTopicCreation(false))).data();
            c.put("metadata_invalid_topic_name", md2.topics().iterator().next().errorCode());
            c.put("metadata_controller_id", md.controllerId());
            var dg = ((org.apache.kafka.common.requests.DescribeGroupsResponse) raw.call(ApiKeys.DESCRIBE_GROUPS,
                (short) 5, new org.apache.kafka.common.message.DescribeGroupsRequestData()
                    .setGroups(List.of(c.group("nosuch"))))).data().groups().get(0);
            c.put("describe_groups_v5_unknown_group", "error=" + dg.errorCode() + " state=" + q(dg.groupState())
                + " protocol_type=" + q(dg.protocolType()));
            c.put("metadata_brokers", md.brokers().size());
        }
        // ApiVersions with a version newer than the broker's: answered at v0 with error 35.
        try (Raw raw = new Raw(bootstrap)) {
            byte[] r = raw.exchange((short) 18, (short) 99, (short) 2, new ApiVersionsRequestData()
                .setClientSoftwareName("differential").setClientSoftwareVersion("1"), (short) 3);
            if (r == null) {
                c.put("api_versions_v99", "connection closed");
            } else {
                ByteBuffer b = ByteBuffer.wrap(r);
                b.getInt();
                short err = b.getShort();
                int n = b.getInt();
                String apiv = "absent";
                for (int i = 0; i < n; i++) {
                    short key = b.getShort(), min = b.getShort(), max = b.getShort();
                    if (key == 18) apiv = min + ".." + max;
                }
                c.put("api_versions_v99", "error=" + err + " lists ApiVersions: " + !apiv.equals("absent"));
                c.note("api_versions_v99_key_count", n);
                c.note("api_versions_v99_range", apiv);
            }
        } catch (SocketTimeoutException e) {
            c.put("api_versions_v99", "no answer");
        }
        c.put("metadata_v99", closedOrAnswered(raw -> raw.exchange((short) 3, (short) 99, (short) 2,
            new MetadataRequestData().setTopics(null), (short) 12)));
        c.put("produce_v2", closedOrAnswered(raw -> raw.exchange((short) 0, (short) 2, (short) 1,
            new ProduceRequestData().setAcks((short) 1).setTimeoutMs(5000)
                .setTopicData(new ProduceRequestData.TopicProduceDataCollection()), (short) 3)));
        c.put("unknown_api_key_9999", closedOrAnswered(raw -> raw.exchange((short) 9999, (short) 0, (short) 1,
            new MetadataRequestData().setTopics(null), (short) 1)));
        c.put("share_fetch_api_78", closedOrAnswered(raw -> raw.exchange((short) 78, (short) 1, (short) 2,
            new MetadataRequestData().setTopics(null), (short) 12)));
        // What each broker advertises (not compared: the brokers differ on purpose).
        try (Raw raw = new Raw(bootstrap)) {
            var r = (org.apache.kafka.common.requests.ApiVersionsResponse) raw.call(ApiKeys.API_VERSIONS, (short) 3,
                new ApiVersionsRequestData().setClientSoftwareName("differential").setClientSoftwareVersion("1"));
            Map<String, String> adv = new TreeMap<>();
            for (var k : r.data().apiKeys()) {
                String name;
                try {
                    name = ApiKeys.forId(k.apiKey()).name;
                } catch (Exception e) {
                    name = "key" + k.apiKey();
                }
                adv.put(name, k.minVersion() + ".." + k.maxVersion());
            }
            c.note("advertised_api_versions", adv);
        }
    }

    interface RawCall {
        byte[] call(Raw r) throws Exception;
    }

    static String closedOrAnswered(RawCall f) {
        try (Raw raw = new Raw(bootstrap)) {
            byte[] r = f.call(raw);
            return r == null ? "connection closed" : "answered (" + r.length + " bytes)";
        } catch (SocketTimeoutException e) {
            return "no answer in 10 s";
        } catch (IOException e) {
            return "connection closed";
        } catch (Exception e) {
            return errName(e);
        }
    }

    // ------------------------------------------------------------- raw client

    /** One connection; requests serialized with kafka-clients' own message classes. */
    static class Raw implements AutoCloseable {
        final Socket s = new Socket();
        final DataInputStream in;
        final OutputStream out;
        int corr = 1;

        Raw(String bootstrap) throws IOException {
            int i = bootstrap.lastIndexOf(':');
            s.connect(new InetSocketAddress(bootstrap.substring(0, i), Integer.parseInt(bootstrap.substring(i + 1))),
                5000);
            s.setSoTimeout(10000);
            in = new DataInputStream(s.getInputStream());
            out = s.getOutputStream();
        }

        /** The response (after its size), or null when the broker closed the connection. */
        byte[] exchange(short apiKey, short apiVersion, short headerVersion, ApiMessage body, short bodyVersion)
            throws IOException {
            RequestHeaderData h = new RequestHeaderData().setRequestApiKey(apiKey).setRequestApiVersion(apiVersion)
                .setCorrelationId(corr++).setClientId("differential");
            ObjectSerializationCache cache = new ObjectSerializationCache();
            int hs = h.size(cache, headerVersion), bs = body.size(cache, bodyVersion);
            ByteBuffer buf = ByteBuffer.allocate(4 + hs + bs);
            buf.putInt(hs + bs);
            ByteBufferAccessor acc = new ByteBufferAccessor(buf);
            h.write(acc, cache, headerVersion);
            body.write(acc, cache, bodyVersion);
            try {
                out.write(buf.array());
                out.flush();
            } catch (IOException e) {
                return null;
            }
            int size;
            try {
                size = in.readInt();
            } catch (EOFException e) {
                return null;
            } catch (java.net.SocketException e) {
                return null;
            }
            byte[] b = new byte[size];
            in.readFully(b);
            return b;
        }

        AbstractResponse call(ApiKeys key, short ver, ApiMessage body) throws IOException {
            short hv = key.requestHeaderVersion(ver);
            int id = corr;
            byte[] r = exchange(key.id, ver, hv, body, ver);
            if (r == null) throw new IOException("connection closed by the broker");
            return AbstractResponse.parseResponse(ByteBuffer.wrap(r), new RequestHeader(key, ver, "differential", id));
        }

        /** Produce v9, acks -1: "error=N base_offset=M". */
        String produce(String topic, int partition, ByteBuffer records, String txid) throws IOException {
            ProduceRequestData.TopicProduceDataCollection coll = new ProduceRequestData.TopicProduceDataCollection();
            coll.add(new ProduceRequestData.TopicProduceData().setName(topic).setPartitionData(List.of(
                new ProduceRequestData.PartitionProduceData().setIndex(partition)
                    .setRecords(MemoryRecords.readableRecords(records)))));
            ProduceRequestData d = new ProduceRequestData().setAcks((short) -1).setTimeoutMs(10000)
                .setTransactionalId(txid).setTopicData(coll);
            ProduceResponseData r;
            try {
                r = ((ProduceResponse) call(ApiKeys.PRODUCE, (short) 9, d)).data();
            } catch (IOException e) {
                return "connection closed";
            }
            ProduceResponseData.PartitionProduceResponse pr = r.responses().iterator().next().partitionResponses()
                .get(0);
            return "error=" + pr.errorCode() + " base_offset=" + pr.baseOffset();
        }

        public void close() throws IOException {
            s.close();
        }
    }

    // ------------------------------------------------------------- compare

    static void flatten(String path, JsonNode n, Map<String, String> out) {
        if (n.isObject()) {
            for (Map.Entry<String, JsonNode> e : n.properties()) {
                flatten(path.isEmpty() ? e.getKey() : path + "." + e.getKey(), e.getValue(), out);
            }
        } else {
            out.put(path, n.toString());
        }
    }

    record Allowed(String pattern, Pattern re, String reason) {}

    static List<Allowed> readAllowed(Path p) throws IOException {
        Pattern line = Pattern.compile("^\\s*[-*]\\s+`([^`]+)`\\s*:\\s*(.*)$");
        List<Allowed> l = new ArrayList<>();
        for (String s : Files.readAllLines(p)) {
            Matcher m = line.matcher(s);
            if (!m.matches()) continue;
            String pat = m.group(1).trim();
            StringBuilder re = new StringBuilder();
            for (String part : pat.split("\\*", -1)) {
                if (re.length() > 0) re.append(".*");
                re.append(Pattern.quote(part));
            }
            // "\Q\E" from empty parts is harmless.
            l.add(new Allowed(pat, Pattern.compile(re.toString()), m.group(2).trim()));
        }
        return l;
    }

    static int compare(Path aPath, Path bPath, Path allowedPath) throws IOException {
        JsonNode a = JSON.readTree(aPath.toFile()), b = JSON.readTree(bPath.toFile());
        Map<String, String> fa = new TreeMap<>(), fb = new TreeMap<>();
        flatten("", a.path("scenarios"), fa);
        flatten("", b.path("scenarios"), fb);
        List<Allowed> allowed = readAllowed(allowedPath);
        Set<String> used = new HashSet<>();
        Set<String> keys = new TreeSet<>(fa.keySet());
        keys.addAll(fb.keySet());
        // Order by scenario as the run had them.
        List<String> order = new ArrayList<>();
        a.path("scenarios").fieldNames().forEachRemaining(order::add);
        b.path("scenarios").fieldNames().forEachRemaining(n -> {
            if (!order.contains(n)) order.add(n);
        });
        List<String> sorted = new ArrayList<>(keys);
        sorted.sort((x, y) -> {
            int ix = order.indexOf(x.split("\\.")[0]), iy = order.indexOf(y.split("\\.")[0]);
            return ix != iy ? Integer.compare(ix, iy) : 0;
        });
        int bad = 0, ok = 0, same = 0;
        StringBuilder unexpected = new StringBuilder(), listed = new StringBuilder();
        String la = a.path("meta").path("bootstrap").asText("A"), lb = b.path("meta").path("bootstrap").asText("B");
        System.out.println("A = " + aPath + " (" + la + ")\nB = " + bPath + " (" + lb + ")\n");
        for (String k : sorted) {
            String va = fa.getOrDefault(k, "<absent>"), vb = fb.getOrDefault(k, "<absent>");
            if (va.equals(vb)) {
                same++;
                continue;
            }
            Allowed hit = null;
            for (Allowed al : allowed) {
                if (al.re().matcher(k).matches()) {
                    hit = al;
                    used.add(al.pattern());
                    break;
                }
            }
            // What fails is printed first: a long report is cut in the middle
            // by whoever shows it, and the allowed lines come last.
            StringBuilder to = hit == null ? unexpected : listed;
            if (hit == null) bad++;
            else ok++;
            to.append(hit == null ? "DIFFERENT " : "allowed   ").append(k)
                .append(hit == null ? "" : "  [" + hit.pattern() + ": " + hit.reason() + "]").append('\n')
                .append("    A: ").append(va).append('\n')
                .append("    B: ").append(vb).append('\n');
        }
        int stale = 0;
        for (Allowed al : allowed) {
            if (!used.contains(al.pattern())) {
                stale++;
                unexpected.append("stale allow-list entry (no such difference now): ").append(al.pattern()).append('\n');
            }
        }
        System.out.print(unexpected);
        System.out.printf("%n%d fields equal, %d allowed differences, %d unexpected differences, %d stale entries%n%n",
            same, ok, bad, stale);
        System.out.print(listed);
        // A stale entry fails too: a fixed difference is then guarded.
        return bad == 0 && stale == 0 ? 0 : 1;
    }
}
