// Kafka Streams WordCount with processing.guarantee=exactly_once_v2, as the
// Apache Kafka Java client library (kafka-streams 4.x) runs it against a
// broker: its consumer group, its transactional producer (EOS v2: one
// producer per thread, offsets committed in the transaction with the group's
// metadata), and the internal topics it creates itself (the repartition topic
// of groupBy and the compacted changelog of the count store).
//
// usage (classpath: the jars of target/kafka-reference/lib and the classes):
//   StreamsWordCount produce BOOTSTRAP INPUT OUTPUT N
//       creates INPUT and OUTPUT (PARTITIONS each, unless they exist) and
//       appends N lines with an idempotent producer (acks=all); line i is
//       "w{i%7} w{i%13} w{i%29}".
//   StreamsWordCount run BOOTSTRAP INPUT OUTPUT APP_ID STATE_DIR N|SECONDSs
//       runs the topology (one stream thread, commit.interval.ms 100,
//       replication.factor 1, no record cache, repartition purge after
//       every commit, consumer session.timeout.ms 10000) until the group
//       has committed N input records
//       and every record of its repartition topic (or, "30s", for that long),
//       then closes it (which commits the last transaction).
//   StreamsWordCount verify BOOTSTRAP INPUT OUTPUT N [APP_ID]
//       reads INPUT (must hold the N lines) and OUTPUT read_committed to its
//       end, takes the latest count per word and compares it with the counts
//       of the N lines; per word the counts seen must rise strictly (a repeat
//       or a drop is a duplicate the transactions let through). With APP_ID:
//       the repartition and changelog topics must exist with the configs
//       Streams created them with (changelog compacted; DescribeConfigs
//       giving each as a topic config), and the repartition topic must have
//       been purged (a log start offset above 0: Streams deletes the records
//       it has consumed, with DeleteRecords). Waits up to 30 s for the output
//       to settle.
//   StreamsWordCount all BOOTSTRAP PREFIX N STATE_DIR
//       produce, run and verify in one JVM with topics PREFIX-in,
//       PREFIX-out and application id PREFIX-app.
//   StreamsWordCount crash BOOTSTRAP PREFIX N STATE_DIR
//       as `all`, but `run` first goes in a child JVM that is killed
//       (SIGKILL) once the group has committed N/4 input records, in the
//       middle of a transaction; a second `run` (this JVM, same state dir,
//       so the same transactional.id) must fence it, abort its open
//       transaction, restore the counts from the changelog and finish:
//       the output read_committed must show no count twice.
// Prints "OK ..." (exit 0) or the differences (exit 1); timings on stderr.
// Logging: WARN and up to stderr, unless -Dlog4j2.configurationFile is given
// (or -Dwc.log=LEVEL).

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.TreeMap;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.atomic.AtomicReference;
import java.util.stream.Collectors;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.Config;
import org.apache.kafka.clients.admin.ConfigEntry;
import org.apache.kafka.clients.admin.ListOffsetsResult;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.config.ConfigResource;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.LongDeserializer;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Produced;

public class StreamsWordCount {
    static final int PARTITIONS = 2;
    static final long T0 = System.nanoTime();

    static void log(String s) {
        System.err.printf(Locale.ROOT, "[wordcount %6.1fs] %s%n", (System.nanoTime() - T0) / 1e9, s);
    }

    static String line(long i) {
        return "w" + (i % 7) + " w" + (i % 13) + " w" + (i % 29);
    }

    static Map<String, Long> reference(long n) {
        Map<String, Long> m = new TreeMap<>();
        for (long i = 0; i < n; i++) {
            for (String w : line(i).split(" ")) {
                m.merge(w, 1L, Long::sum);
            }
        }
        return m;
    }

    static Admin admin(String bootstrap) {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        return Admin.create(p);
    }

    // --- produce -------------------------------------------------------------

    static void produce(String bootstrap, String input, String output, long n) throws Exception {
        long t = System.nanoTime();
        try (Admin admin = admin(bootstrap)) {
            for (String topic : List.of(input, output)) {
                try {
                    admin.createTopics(List.of(new NewTopic(topic, PARTITIONS, (short) 1))).all().get();
                } catch (ExecutionException e) {
                    if (!(e.getCause() instanceof TopicExistsException)) {
                        throw e;
                    }
                }
            }
        }
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.LINGER_MS_CONFIG, 5);
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(p)) {
            AtomicReference<Exception> failed = new AtomicReference<>();
            for (long i = 0; i < n; i++) {
                // Key: the line number, so that lines spread over the partitions.
                producer.send(new ProducerRecord<>(input, Long.toString(i), line(i)), (md, e) -> {
                    if (e != null) {
                        failed.compareAndSet(null, e);
                    }
                });
            }
            producer.flush();
            if (failed.get() != null) {
                throw new RuntimeException("produce failed", failed.get());
            }
        }
        log(String.format(Locale.ROOT, "produced %d lines to %s in %.2f s", n, input, (System.nanoTime() - t) / 1e9));
    }

    // --- run -----------------------------------------------------------------

    static Properties streamsConfig(String bootstrap, String appId, String stateDir) {
        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 100);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
        p.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, 1);
        p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir);
        // Purge the repartition topic (Admin deleteRecords up to the
        // committed offsets) after every commit rather than every 30 s, so
        // that a short run uses it too.
        p.put(StreamsConfig.REPARTITION_PURGE_INTERVAL_MS_CONFIG, 100);
        // No record cache: every update of a count is written to the
        // changelog and the output (more records in every transaction).
        p.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG, 0);
        p.put(StreamsConfig.DEFAULT_KEY_SERDE_CLASS_CONFIG, Serdes.StringSerde.class);
        p.put(StreamsConfig.DEFAULT_VALUE_SERDE_CLASS_CONFIG, Serdes.StringSerde.class);
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");
        // A killed member leaves the group after 10 s, not 45 s (crash).
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG), 10000);
        return p;
    }

    static KafkaStreams build(String bootstrap, String input, String output, String appId, String stateDir) {
        StreamsBuilder b = new StreamsBuilder();
        b.stream(input, Consumed.with(Serdes.String(), Serdes.String()))
            .flatMapValues(v -> Arrays.asList(v.toLowerCase(Locale.ROOT).split("\\W+")))
            .filter((k, w) -> !w.isEmpty())
            .groupBy((k, w) -> w, Grouped.with("words", Serdes.String(), Serdes.String()))
            .count(Materialized.as("counts"))
            .toStream()
            .to(output, Produced.with(Serdes.String(), Serdes.Long()));
        return new KafkaStreams(b.build(), streamsConfig(bootstrap, appId, stateDir));
    }

    /** Runs the topology; returns null or what went wrong. */
    static String run(String bootstrap, String input, String output, String appId, String stateDir, String until)
            throws Exception {
        long t = System.nanoTime();
        boolean timed = until.endsWith("s");
        long n = timed ? 0 : Long.parseLong(until);
        long deadlineNs = System.nanoTime() + (timed ? Long.parseLong(until.substring(0, until.length() - 1)) : 300) * 1_000_000_000L;
        AtomicReference<Throwable> fatal = new AtomicReference<>();
        KafkaStreams streams = build(bootstrap, input, output, appId, stateDir);
        streams.setUncaughtExceptionHandler(e -> {
            fatal.compareAndSet(null, e);
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> log("streams state " + before + " -> " + now));
        streams.start();
        String problem = null;
        String repartition = appId + "-words-repartition";
        try (Admin admin = admin(bootstrap)) {
            long lastReport = 0;
            while (true) {
                if (fatal.get() != null) {
                    problem = "stream thread died: " + chain(fatal.get());
                    break;
                }
                KafkaStreams.State s = streams.state();
                if (s == KafkaStreams.State.ERROR || s == KafkaStreams.State.NOT_RUNNING
                        || s == KafkaStreams.State.PENDING_ERROR) {
                    problem = "streams state " + s;
                    break;
                }
                if (System.nanoTime() > deadlineNs) {
                    if (!timed) {
                        problem = "timed out: the group did not commit the " + n + " input records within 300 s";
                    }
                    break;
                }
                if (!timed) {
                    try {
                        Map<TopicPartition, OffsetAndMetadata> committed =
                            admin.listConsumerGroupOffsets(appId).partitionsToOffsetAndMetadata().get();
                        long in = committed.entrySet().stream()
                            .filter(e -> e.getKey().topic().equals(input) && e.getValue() != null)
                            .mapToLong(e -> e.getValue().offset()).sum();
                        // The repartition topic fully consumed too (the
                        // input offsets count transaction markers: >= n).
                        boolean repDone = false;
                        if (in >= n) {
                            Map<TopicPartition, OffsetSpec> ask = new HashMap<>();
                            for (TopicPartition tp : partitionsOf(admin, repartition)) {
                                ask.put(tp, OffsetSpec.latest());
                            }
                            Map<TopicPartition, ListOffsetsResult.ListOffsetsResultInfo> ends =
                                admin.listOffsets(ask).all().get();
                            repDone = !ends.isEmpty() && ends.entrySet().stream().allMatch(e -> {
                                OffsetAndMetadata c = committed.get(e.getKey());
                                return e.getValue().offset() == 0 || (c != null && c.offset() >= e.getValue().offset());
                            });
                        }
                        if (System.nanoTime() - lastReport > 5_000_000_000L) {
                            lastReport = System.nanoTime();
                            log("committed input offsets " + in + "/" + n + ", repartition done " + repDone);
                        }
                        if (in >= n && repDone) {
                            break;
                        }
                    } catch (ExecutionException e) {
                        log("progress check: " + chain(e));
                    }
                }
                Thread.sleep(200);
            }
        }
        log(String.format(Locale.ROOT, "ran %.2f s (state %s), closing", (System.nanoTime() - t) / 1e9, streams.state()));
        long c = System.nanoTime();
        boolean closed = streams.close(Duration.ofSeconds(30));
        log(String.format(Locale.ROOT, "closed=%s in %.2f s", closed, (System.nanoTime() - c) / 1e9));
        if (fatal.get() != null && problem == null) {
            problem = "stream thread died: " + chain(fatal.get());
        }
        if (!closed && problem == null) {
            problem = "KafkaStreams.close did not finish within 30 s";
        }
        return problem;
    }

    /** `run` in a child JVM, killed once the group has committed n/4 input records. */
    static String runAndKill(String bootstrap, String input, String output, String appId, String stateDir, long n)
            throws Exception {
        String javaBin = Path.of(System.getProperty("java.home"), "bin", "java").toString();
        List<String> cmd = new ArrayList<>(List.of(javaBin, "-cp", System.getProperty("java.class.path")));
        if (System.getProperty("wc.log") != null) {
            cmd.add("-Dwc.log=" + System.getProperty("wc.log"));
        }
        cmd.addAll(List.of(StreamsWordCount.class.getName(), "run", bootstrap, input, output, appId, stateDir,
            Long.toString(n)));
        Process child = new ProcessBuilder(cmd).inheritIO().start();
        log("child run started (pid " + child.pid() + "), to be killed at " + (n / 4) + " committed input records");
        long deadline = System.nanoTime() + 120_000_000_000L;
        try (Admin admin = admin(bootstrap)) {
            while (true) {
                if (!child.isAlive()) {
                    return "the child run exited (" + child.exitValue() + ") before it was killed";
                }
                if (System.nanoTime() > deadline) {
                    child.destroyForcibly().waitFor();
                    return "the child run did not commit " + (n / 4) + " input records within 120 s";
                }
                try {
                    long in = admin.listConsumerGroupOffsets(appId).partitionsToOffsetAndMetadata().get().entrySet()
                        .stream().filter(e -> e.getKey().topic().equals(input) && e.getValue() != null)
                        .mapToLong(e -> e.getValue().offset()).sum();
                    if (in >= n / 4) {
                        child.destroyForcibly().waitFor();
                        log("child killed (SIGKILL) at " + in + " committed input records");
                        return null;
                    }
                } catch (ExecutionException e) {
                    log("progress check: " + chain(e));
                }
                Thread.sleep(50);
            }
        }
    }

    static List<TopicPartition> partitionsOf(Admin admin, String topic) throws Exception {
        TopicDescription d = admin.describeTopics(List.of(topic)).allTopicNames().get().get(topic);
        return d.partitions().stream().map(p -> new TopicPartition(topic, p.partition())).collect(Collectors.toList());
    }

    static String chain(Throwable e) {
        StringBuilder b = new StringBuilder();
        for (Throwable c = e; c != null; c = c.getCause()) {
            if (b.length() > 0) {
                b.append(" <- ");
            }
            b.append(c.getClass().getName()).append(": ").append(c.getMessage());
            if (c.getCause() == c) {
                break;
            }
        }
        return b.toString();
    }

    // --- verify --------------------------------------------------------------

    static KafkaConsumer<String, byte[]> reader(String bootstrap, String isolation) {
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, isolation);
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, 100);
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG,
            org.apache.kafka.common.serialization.ByteArrayDeserializer.class.getName());
        return new KafkaConsumer<>(p);
    }

    /** Every record of the topic up to its end (the LSO under read_committed) now. */
    static List<ConsumerRecord<String, byte[]>> readAll(String bootstrap, String topic, String isolation)
            throws Exception {
        List<ConsumerRecord<String, byte[]>> out = new ArrayList<>();
        try (KafkaConsumer<String, byte[]> c = reader(bootstrap, isolation)) {
            List<TopicPartition> tps = c.partitionsFor(topic, Duration.ofSeconds(15)).stream()
                .map(pi -> new TopicPartition(topic, pi.partition())).collect(Collectors.toList());
            c.assign(tps);
            c.seekToBeginning(tps);
            Map<TopicPartition, Long> end = c.endOffsets(tps);
            long deadline = System.nanoTime() + 60_000_000_000L;
            while (tps.stream().anyMatch(tp -> c.position(tp) < end.get(tp))) {
                if (System.nanoTime() > deadline) {
                    throw new RuntimeException("could not read " + topic + " to its end " + end + " within 60 s");
                }
                for (ConsumerRecord<String, byte[]> r : c.poll(Duration.ofMillis(200))) {
                    out.add(r);
                }
            }
        }
        return out;
    }

    static List<String> verifyOnce(String bootstrap, String input, String output, long n) throws Exception {
        List<String> diffs = new ArrayList<>();
        List<ConsumerRecord<String, byte[]>> in = readAll(bootstrap, input, "read_committed");
        if (in.size() != n) {
            diffs.add("input " + input + " holds " + in.size() + " lines, expected " + n);
        }
        Map<String, Long> expected = reference(n);
        Map<String, Long> latest = new TreeMap<>();
        Map<String, List<Long>> seen = new HashMap<>();
        List<ConsumerRecord<String, byte[]>> outRecs = readAll(bootstrap, output, "read_committed");
        outRecs.sort((a, b) -> a.partition() != b.partition() ? Integer.compare(a.partition(), b.partition())
            : Long.compare(a.offset(), b.offset()));
        LongDeserializer ld = new LongDeserializer();
        int nonMonotonic = 0;
        for (ConsumerRecord<String, byte[]> r : outRecs) {
            if (r.value() == null || r.value().length != 8) {
                diffs.add("output record " + r.partition() + "@" + r.offset() + " key " + r.key() + ": value not a long");
                continue;
            }
            long v = ld.deserialize(output, r.value());
            Long prev = latest.put(r.key(), v);
            if (prev != null && v <= prev) {
                if (nonMonotonic++ < 10) {
                    diffs.add("word " + r.key() + ": count " + v + " after " + prev + " at " + r.partition() + "@" + r.offset()
                        + " (a duplicate)");
                }
            }
            seen.computeIfAbsent(r.key(), k -> new ArrayList<>()).add(v);
        }
        if (nonMonotonic > 10) {
            diffs.add("... " + (nonMonotonic - 10) + " more non-rising counts");
        }
        for (Map.Entry<String, Long> e : expected.entrySet()) {
            Long got = latest.get(e.getKey());
            if (!e.getValue().equals(got)) {
                diffs.add("word " + e.getKey() + ": latest count " + got + ", expected " + e.getValue());
            }
        }
        for (String w : latest.keySet()) {
            if (!expected.containsKey(w)) {
                diffs.add("word " + w + ": unexpected (count " + latest.get(w) + ")");
            }
        }
        log("verify: " + in.size() + " input lines, " + outRecs.size() + " committed output records, "
            + latest.size() + "/" + expected.size() + " words");
        return diffs;
    }

    static List<String> checkInternalTopics(String bootstrap, String appId) throws Exception {
        List<String> diffs = new ArrayList<>();
        String repartition = appId + "-words-repartition";
        String changelog = appId + "-counts-changelog";
        try (Admin admin = admin(bootstrap)) {
            Set<String> names = admin.listTopics().names().get();
            List<String> internal = names.stream().filter(t -> t.startsWith(appId + "-")).sorted().collect(Collectors.toList());
            log("internal topics: " + internal);
            for (String t : List.of(repartition, changelog)) {
                if (!names.contains(t)) {
                    diffs.add("internal topic " + t + " missing (topics of the app: " + internal + ")");
                }
            }
            if (!diffs.isEmpty()) {
                return diffs;
            }
            Map<ConfigResource, Config> cfgs = admin.describeConfigs(List.of(
                new ConfigResource(ConfigResource.Type.TOPIC, repartition),
                new ConfigResource(ConfigResource.Type.TOPIC, changelog))).all().get();
            Config cl = cfgs.get(new ConfigResource(ConfigResource.Type.TOPIC, changelog));
            Config rp = cfgs.get(new ConfigResource(ConfigResource.Type.TOPIC, repartition));
            expectConfig(diffs, changelog, cl, "cleanup.policy", "compact");
            expectConfig(diffs, changelog, cl, "message.timestamp.type", "CreateTime");
            expectConfig(diffs, repartition, rp, "cleanup.policy", "delete");
            expectConfig(diffs, repartition, rp, "retention.ms", "-1");
            expectConfig(diffs, repartition, rp, "message.timestamp.type", "CreateTime");
            Map<TopicPartition, OffsetSpec> ask = new HashMap<>();
            for (TopicPartition tp : partitionsOf(admin, repartition)) {
                ask.put(tp, OffsetSpec.earliest());
            }
            Map<TopicPartition, ListOffsetsResult.ListOffsetsResultInfo> starts = admin.listOffsets(ask).all().get();
            log("repartition log start offsets: " + starts.entrySet().stream()
                .map(e -> e.getKey().partition() + "=" + e.getValue().offset()).sorted().collect(Collectors.joining(" ")));
            if (starts.values().stream().allMatch(i -> i.offset() == 0)) {
                diffs.add("topic " + repartition + ": never purged (log start offset 0 on every partition; Streams"
                    + " deletes consumed repartition records with Admin deleteRecords = DeleteRecords, API key 21)");
            }
            Map<String, TopicDescription> d = admin.describeTopics(List.of(repartition, changelog)).allTopicNames().get();
            for (TopicDescription td : d.values()) {
                if (td.partitions().size() != PARTITIONS) {
                    diffs.add("internal topic " + td.name() + " has " + td.partitions().size() + " partitions, expected "
                        + PARTITIONS);
                }
            }
        }
        return diffs;
    }

    static void expectConfig(List<String> diffs, String topic, Config c, String key, String want) {
        ConfigEntry e = c == null ? null : c.get(key);
        String got = e == null ? null : e.value();
        if (!want.equals(got)) {
            diffs.add("topic " + topic + ": " + key + "=" + got + ", expected " + want);
        } else if (e.source() != ConfigEntry.ConfigSource.DYNAMIC_TOPIC_CONFIG) {
            // Streams set it when it created the topic: a topic config, even
            // where it equals the broker's default.
            diffs.add("topic " + topic + ": " + key + "=" + got + " has source " + e.source()
                + ", expected DYNAMIC_TOPIC_CONFIG (set by CreateTopics)");
        }
    }

    static List<String> verify(String bootstrap, String input, String output, long n, String appId) throws Exception {
        long t = System.nanoTime();
        long deadline = System.nanoTime() + 30_000_000_000L;
        List<String> diffs;
        while (true) {
            diffs = verifyOnce(bootstrap, input, output, n);
            if (diffs.isEmpty() || System.nanoTime() > deadline) {
                break;
            }
            log("verify: " + diffs.size() + " differences, reading again in 2 s");
            Thread.sleep(2000);
        }
        if (appId != null) {
            diffs.addAll(checkInternalTopics(bootstrap, appId));
        }
        log(String.format(Locale.ROOT, "verified in %.2f s", (System.nanoTime() - t) / 1e9));
        return diffs;
    }

    static int report(List<String> diffs, String what) {
        if (diffs.isEmpty()) {
            System.out.println("OK " + what);
            return 0;
        }
        System.out.println("FAIL " + what + ": " + diffs.size() + " differences");
        for (String d : diffs) {
            System.out.println("  " + d);
        }
        return 1;
    }

    // --- main ----------------------------------------------------------------

    static void quietLogging() throws IOException {
        if (System.getProperty("log4j2.configurationFile") != null) {
            return;
        }
        String level = System.getProperty("wc.log", "warn");
        Path f = Files.createTempFile("wordcount-log4j2", ".properties");
        f.toFile().deleteOnExit();
        Files.writeString(f, String.join("\n",
            "status = error",
            "appender.stderr.type = Console",
            "appender.stderr.name = STDERR",
            "appender.stderr.target = SYSTEM_ERR",
            "appender.stderr.layout.type = PatternLayout",
            "appender.stderr.layout.pattern = [%d] %p %m (%c)%n",
            "rootLogger.level = " + level,
            "rootLogger.appenderRef.stderr.ref = STDERR", ""));
        System.setProperty("log4j2.configurationFile", f.toString());
    }

    static void usage() {
        System.err.println("usage: StreamsWordCount produce BOOTSTRAP INPUT OUTPUT N\n"
            + "       StreamsWordCount run BOOTSTRAP INPUT OUTPUT APP_ID STATE_DIR N|SECONDSs\n"
            + "       StreamsWordCount verify BOOTSTRAP INPUT OUTPUT N [APP_ID]\n"
            + "       StreamsWordCount all BOOTSTRAP PREFIX N STATE_DIR\n"
            + "       StreamsWordCount crash BOOTSTRAP PREFIX N STATE_DIR");
        System.exit(2);
    }

    public static void main(String[] a) throws Exception {
        quietLogging();
        if (a.length < 1) {
            usage();
        }
        int rc;
        switch (a[0]) {
            case "produce":
                if (a.length != 5) {
                    usage();
                }
                produce(a[1], a[2], a[3], Long.parseLong(a[4]));
                System.out.println("OK produced " + a[4]);
                rc = 0;
                break;
            case "run": {
                if (a.length != 7) {
                    usage();
                }
                String problem = run(a[1], a[2], a[3], a[4], a[5], a[6]);
                rc = report(problem == null ? List.of() : List.of(problem), "run " + a[4]);
                break;
            }
            case "verify":
                if (a.length != 5 && a.length != 6) {
                    usage();
                }
                rc = report(verify(a[1], a[2], a[3], Long.parseLong(a[4]), a.length == 6 ? a[5] : null),
                    "wordcount " + a[4] + " lines");
                break;
            case "all": {
                if (a.length != 5) {
                    usage();
                }
                String in = a[2] + "-in", out = a[2] + "-out", app = a[2] + "-app";
                long n = Long.parseLong(a[3]);
                produce(a[1], in, out, n);
                String problem = run(a[1], in, out, app, a[4], a[3]);
                List<String> diffs = new ArrayList<>();
                if (problem != null) {
                    diffs.add(problem);
                }
                diffs.addAll(verify(a[1], in, out, n, app));
                rc = report(diffs, "wordcount " + n + " lines");
                break;
            }
            case "crash": {
                if (a.length != 5) {
                    usage();
                }
                String in = a[2] + "-in", out = a[2] + "-out", app = a[2] + "-app";
                long n = Long.parseLong(a[3]);
                produce(a[1], in, out, n);
                List<String> diffs = new ArrayList<>();
                String killed = runAndKill(a[1], in, out, app, a[4], n);
                if (killed != null) {
                    diffs.add(killed);
                }
                String problem = run(a[1], in, out, app, a[4], a[3]);
                if (problem != null) {
                    diffs.add(problem);
                }
                diffs.addAll(verify(a[1], in, out, n, app));
                rc = report(diffs, "wordcount " + n + " lines, a member killed at " + (n / 4));
                break;
            }
            default:
                usage();
                rc = 2;
        }
        log(String.format(Locale.ROOT, "total %.2f s", (System.nanoTime() - T0) / 1e9));
        System.out.flush();
        System.exit(rc);
    }
}
