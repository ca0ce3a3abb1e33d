// A distributed Kafka Connect worker (org.apache.kafka.connect.cli.ConnectDistributed,
// connect-runtime 4.x) against a broker: its config, offset and status topics
// (created by the worker itself, compacted), its group membership, a source
// connector and a sink connector end to end, and a worker restart.
//
// usage (classpath: the jars of target/kafka-reference/lib, the classes, and
// for `file` the connect-file jar):
//   ConnectCheck BOOTSTRAP PREFIX WORKDIR N [auto|file|embedded] [eos]
//
// Connectors: `file` = org.apache.kafka.connect.file.FileStream{Source,Sink}Connector
// (artifact org.apache.kafka:connect-file, not among the jars of
// target/kafka-reference/lib: Maven Central has no 4.4.0 of it, and 4.3.x
// does not load with kafka-clients 4.4.0, NoClassDefFoundError
// org/apache/kafka/common/utils/AppInfoParser, moved to ...utils.internals);
// `embedded` = ConnectCheck$LineSource and
// ConnectCheck$LineSink below, the same behaviour (a file's lines to a topic,
// the byte position as the source offset; a topic's values appended to a
// file); `auto` (the default) = `file` when its classes are on the classpath,
// else `embedded`. `eos`: the worker with exactly.once.source.support=enabled
// (KIP-618: the config topic written by the leader's transactional producer,
// source tasks producing records and offsets in transactions, zombie task
// producers fenced through Admin fenceProducers) and the source connector with
// exactly.once.support=required.
//
// The check, all under WORKDIR (worker.properties, worker-1.log, worker-2.log,
// source.txt, sink.txt):
//  1. A worker (child JVM with this JVM's classpath, REST on a free loopback
//     port, group PREFIX-connect, topics PREFIX-configs (1 partition),
//     PREFIX-offsets (3), PREFIX-status (2), replication factor 1, string
//     converters) answers GET / and lists both connector classes.
//  2. source.txt holds N lines; POST /connectors creates PREFIX-source
//     (file -> topic PREFIX-data, which the worker creates through
//     topic.creation.default.*: 1 partition) and PREFIX-sink
//     (PREFIX-data -> sink.txt). sink.txt must reach the N lines, equal and
//     in order; both connectors and their tasks RUNNING; PREFIX-data holds N
//     committed records; GET /connectors/PREFIX-source/offsets = the byte
//     length of source.txt, GET /connectors/PREFIX-sink/offsets = the offset
//     after the last record of PREFIX-data (N; with eos more, transaction
//     markers take offsets too).
//  3. The three internal topics exist with their partition counts and
//     cleanup.policy=compact.
//  4. The worker stops (SIGTERM); source.txt grows by N/2 lines; a new worker
//     (same group and topics) must bring both connectors back from the config
//     topic and the source on from its stored offset: sink.txt = source.txt
//     exactly (no line twice, none lost).
//  5. DELETE of both connectors; the worker stops.
// Prints "OK ..." (exit 0) or the failures (exit 1); progress and timings on
// stderr; on a failure the tail of the worker's log too. The worker logs at
// INFO; -Dcc.worker.debug=LOGGER[,LOGGER...] puts those loggers at DEBUG
// (e.g. org.apache.kafka.clients.admin.KafkaAdminClient shows every Admin
// call and why it failed).

import java.io.IOException;
import java.io.RandomAccessFile;
import java.io.Writer;
import java.net.ServerSocket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardOpenOption;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.Config;
import org.apache.kafka.clients.admin.ConfigEntry;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.config.ConfigDef;
import org.apache.kafka.common.config.ConfigResource;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.connect.connector.Task;
import org.apache.kafka.connect.data.Schema;
import org.apache.kafka.connect.sink.SinkConnector;
import org.apache.kafka.connect.sink.SinkRecord;
import org.apache.kafka.connect.sink.SinkTask;
import org.apache.kafka.connect.source.SourceConnector;
import org.apache.kafka.connect.source.SourceRecord;
import org.apache.kafka.connect.source.SourceTask;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;

public class ConnectCheck {
    static final long T0 = System.nanoTime();
    static final ObjectMapper JSON = new ObjectMapper();
    static final String FILE_SOURCE = "org.apache.kafka.connect.file.FileStreamSourceConnector";
    static final String FILE_SINK = "org.apache.kafka.connect.file.FileStreamSinkConnector";
    static final Map<String, Integer> INTERNAL = Map.of("configs", 1, "offsets", 3, "status", 2);

    final String bootstrap, prefix, data, sourceName, sinkName, sourceClass, sinkClass;
    final Path dir, source, sink;
    final int n;
    final boolean eos;
    final List<String> failures = new ArrayList<>();
    final HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();
    Process worker;
    int workerNo = 0;
    String rest;

    static void log(String s) {
        System.err.printf(Locale.ROOT, "[connect %6.1fs] %s%n", (System.nanoTime() - T0) / 1e9, s);
    }

    ConnectCheck(String bootstrap, String prefix, Path dir, int n, String sourceClass, String sinkClass, boolean eos) {
        this.eos = eos;
        this.bootstrap = bootstrap;
        this.prefix = prefix;
        this.dir = dir;
        this.n = n;
        this.data = prefix + "-data";
        this.sourceName = prefix + "-source";
        this.sinkName = prefix + "-sink";
        this.sourceClass = sourceClass;
        this.sinkClass = sinkClass;
        this.source = dir.resolve("source.txt");
        this.sink = dir.resolve("sink.txt");
    }

    static String line(int i) {
        return String.format(Locale.ROOT, "line %06d: the quick brown fox %d jumps over %x", i, i * 7919L, i);
    }

    // --- the worker ----------------------------------------------------------

    void writeWorkerConfig(int port) throws IOException {
        Properties p = new Properties();
        p.put("bootstrap.servers", bootstrap);
        p.put("group.id", prefix + "-connect");
        p.put("key.converter", "org.apache.kafka.connect.storage.StringConverter");
        p.put("value.converter", "org.apache.kafka.connect.storage.StringConverter");
        p.put("config.storage.topic", prefix + "-configs");
        p.put("offset.storage.topic", prefix + "-offsets");
        p.put("status.storage.topic", prefix + "-status");
        p.put("config.storage.replication.factor", "1");
        p.put("offset.storage.replication.factor", "1");
        p.put("status.storage.replication.factor", "1");
        p.put("offset.storage.partitions", String.valueOf(INTERNAL.get("offsets")));
        p.put("status.storage.partitions", String.valueOf(INTERNAL.get("status")));
        p.put("offset.flush.interval.ms", "500");
        p.put("listeners", "http://127.0.0.1:" + port);
        p.put("rest.advertised.host.name", "127.0.0.1");
        p.put("rest.advertised.port", String.valueOf(port));
        if (eos) {
            p.put("exactly.once.source.support", "enabled");
        }
        try (Writer w = Files.newBufferedWriter(dir.resolve("worker.properties"))) {
            p.store(w, "ConnectCheck worker (no plugin.path: plugins come from the classpath)");
        }
        Files.writeString(dir.resolve("log4j2.properties"), String.join("\n",
            "status = error",
            "appender.file.type = File",
            "appender.file.name = FILE",
            "appender.file.fileName = ${sys:connect.log.file}",
            "appender.file.layout.type = PatternLayout",
            "appender.file.layout.pattern = [%d] %p %m (%c)%n",
            "rootLogger.level = info",
            "rootLogger.appenderRef.file.ref = FILE",
            "logger.reflections.name = org.reflections",
            "logger.reflections.level = error", "")
            + debugLoggers());
    }

    /** -Dcc.worker.debug=LOGGER,LOGGER...: those loggers of the worker at DEBUG. */
    static String debugLoggers() {
        StringBuilder b = new StringBuilder();
        int i = 0;
        for (String l : System.getProperty("cc.worker.debug", "").split(",")) {
            if (!l.isBlank()) {
                b.append("logger.d").append(i).append(".name = ").append(l.trim()).append('\n');
                b.append("logger.d").append(i).append(".level = debug\n");
                i++;
            }
        }
        return b.toString();
    }

    static int freePort() throws IOException {
        try (ServerSocket s = new ServerSocket(0, 1, java.net.InetAddress.getLoopbackAddress())) {
            return s.getLocalPort();
        }
    }

    Path workerLog() {
        return dir.resolve("worker-" + workerNo + ".log");
    }

    void startWorker() throws Exception {
        workerNo++;
        int port = freePort();
        writeWorkerConfig(port);
        rest = "http://127.0.0.1:" + port;
        String java = Paths.get(System.getProperty("java.home"), "bin", "java").toString();
        ProcessBuilder pb = new ProcessBuilder(java, "-Xms128m", "-Xmx512m", "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            "-Dlog4j2.configurationFile=" + dir.resolve("log4j2.properties"),
            "-Dconnect.log.file=" + workerLog(),
            "-cp", System.getProperty("java.class.path"),
            "org.apache.kafka.connect.cli.ConnectDistributed", dir.resolve("worker.properties").toString());
        pb.redirectErrorStream(true);
        pb.redirectOutput(ProcessBuilder.Redirect.appendTo(dir.resolve("worker-" + workerNo + ".stdout").toFile()));
        long t = System.nanoTime();
        worker = pb.start();
        log("worker " + workerNo + " started (pid " + worker.pid() + ", REST " + rest + ", log " + workerLog() + ")");
        JsonNode root = await("worker " + workerNo + " REST answers GET /", 120, () -> {
            if (!worker.isAlive()) {
                throw new IllegalStateException("the worker exited with " + worker.exitValue());
            }
            JsonNode r = get("/");
            return r != null && r.has("kafka_cluster_id") ? r : null;
        });
        log(String.format(Locale.ROOT, "worker %d up in %.2f s: %s", workerNo, (System.nanoTime() - t) / 1e9, root));
    }

    void stopWorker() throws Exception {
        if (worker == null) {
            return;
        }
        long t = System.nanoTime();
        worker.destroy();
        // A worker stops in about 2 s. Its own stop may take more than a
        // minute: its REST server waits up to 60 s for requests in flight
        // (Jetty's graceful stop), and only then does the herder stop (its
        // tick thread, tasks and connectors, up to some 15 s more). A stop
        // past 20 s is reported with the worker's threads; one past 120 s is
        // a failure, but for one hang that is Connect's own (below).
        if (!worker.waitFor(20, TimeUnit.SECONDS)) {
            log("worker " + workerNo + " still running 20 s after SIGTERM");
            // SIGQUIT: the JVM prints every thread's stack to its stdout, the
            // worker-N.stdout file.
            new ProcessBuilder("kill", "-QUIT", String.valueOf(worker.pid())).inheritIO().start().waitFor();
            Thread.sleep(1000);
            Path out = dir.resolve("worker-" + workerNo + ".stdout");
            threads(out);
            lastLines(workerLog(), 40);
            if (stuckInRestServerJoin(out)) {
                // Connect's REST server sets Jetty's stopAtShutdown, so on
                // SIGTERM two shutdown hooks stop it at once: Jetty's own
                // (it logs "Unable to destroy ... IllegalStateException:
                // STARTED") and Connect's, whose Server.join() then waits for
                // a thread pool that never stops. Seen on CI, within the
                // worker alone; what the check is about (the records, the
                // offsets, a second worker going on from them) does not
                // depend on it: the worker is killed, as a crash would.
                log("worker " + workerNo + ": its shutdown hook waits in Jetty's Server.join (the race of"
                    + " Jetty's and Connect's shutdown hooks in Connect's REST server); killed");
                worker.destroyForcibly();
            }
        }
        if (!worker.waitFor(100, TimeUnit.SECONDS)) {
            failures.add("worker " + workerNo + " did not stop within 120 s of SIGTERM");
            worker.destroyForcibly();
            worker.waitFor(10, TimeUnit.SECONDS);
        }
        log(String.format(Locale.ROOT, "worker %d stopped in %.2f s (exit %d)", workerNo,
            (System.nanoTime() - t) / 1e9, worker.exitValue()));
        worker = null;
    }

    // --- REST ----------------------------------------------------------------

    HttpResponse<String> call(String method, String path, String body) throws Exception {
        HttpRequest.Builder b = HttpRequest.newBuilder(URI.create(rest + path)).timeout(Duration.ofSeconds(60))
            .header("Content-Type", "application/json").header("Accept", "application/json");
        b.method(method, body == null ? HttpRequest.BodyPublishers.noBody() : HttpRequest.BodyPublishers.ofString(body));
        return http.send(b.build(), HttpResponse.BodyHandlers.ofString());
    }

    /** The JSON of a 200, else null (also when the worker does not answer yet). */
    JsonNode get(String path) {
        try {
            HttpResponse<String> r = call("GET", path, null);
            return r.statusCode() == 200 ? JSON.readTree(r.body()) : null;
        } catch (Exception e) {
            return null;
        }
    }

    interface Probe<T> {
        T get() throws Exception;
    }

    /** Polls until the probe gives non-null; throws after `seconds`. */
    static <T> T await(String what, int seconds, Probe<T> probe) throws Exception {
        long deadline = System.nanoTime() + seconds * 1_000_000_000L;
        while (true) {
            T v = probe.get();
            if (v != null) {
                return v;
            }
            if (System.nanoTime() > deadline) {
                throw new IllegalStateException("timed out after " + seconds + " s: " + what);
            }
            Thread.sleep(250);
        }
    }

    void createConnector(String name, Map<String, String> config) throws Exception {
        Map<String, Object> body = Map.of("name", name, "config", config);
        HttpResponse<String> r = call("POST", "/connectors", JSON.writeValueAsString(body));
        if (r.statusCode() != 201) {
            throw new IllegalStateException("POST /connectors " + name + ": HTTP " + r.statusCode() + " " + r.body());
        }
        log("created connector " + name);
    }

    /** Null when both connectors and all their tasks run, else what the worker says. */
    String notRunning() {
        List<String> bad = new ArrayList<>();
        for (String c : List.of(sourceName, sinkName)) {
            JsonNode s = get("/connectors/" + c + "/status");
            if (s == null) {
                bad.add(c + ": no status");
                continue;
            }
            String cs = s.path("connector").path("state").asText();
            if (!"RUNNING".equals(cs)) {
                bad.add(c + " " + cs + " " + s.path("connector").path("trace").asText("").lines().findFirst().orElse(""));
            }
            if (s.path("tasks").size() == 0) {
                bad.add(c + ": no tasks");
            }
            for (JsonNode t : s.path("tasks")) {
                if (!"RUNNING".equals(t.path("state").asText())) {
                    bad.add(c + " task " + t.path("id").asText() + " " + t.path("state").asText() + " "
                        + t.path("trace").asText("").lines().limit(3).collect(Collectors.joining(" | ")));
                }
            }
        }
        return bad.isEmpty() ? null : String.join("; ", bad);
    }

    // --- the check -----------------------------------------------------------

    List<String> sinkLines() throws IOException {
        if (!Files.exists(sink)) {
            return List.of();
        }
        String s = Files.readString(sink, StandardCharsets.UTF_8);
        int end = s.lastIndexOf('\n');
        return end < 0 ? List.of() : List.of(s.substring(0, end).split("\n", -1));
    }

    void appendSource(int from, int to) throws IOException {
        StringBuilder b = new StringBuilder();
        for (int i = from; i < to; i++) {
            b.append(line(i)).append('\n');
        }
        Files.writeString(source, b.toString(), StandardCharsets.UTF_8, StandardOpenOption.CREATE,
            StandardOpenOption.APPEND);
    }

    /** Waits for sink.txt to hold `count` lines, then compares it with source.txt. */
    void awaitSink(int count, String phase) throws Exception {
        long t = System.nanoTime();
        try {
            await("sink.txt holds " + count + " lines", 120, () -> {
                int have = sinkLines().size();
                if (have >= count) {
                    return true;
                }
                String bad = notRunning();
                if (bad != null && bad.contains("FAILED")) {
                    throw new IllegalStateException("a connector failed: " + bad);
                }
                return null;
            });
        } catch (IllegalStateException e) {
            failures.add(phase + ": " + e.getMessage() + " (it holds " + sinkLines().size() + ")");
            return;
        }
        // Give a duplicate the time to show.
        Thread.sleep(1500);
        List<String> want = Files.readAllLines(source, StandardCharsets.UTF_8);
        List<String> got = sinkLines();
        log(String.format(Locale.ROOT, "%s: sink.txt has %d lines after %.2f s", phase, got.size(),
            (System.nanoTime() - t) / 1e9));
        if (!want.equals(got)) {
            int i = 0;
            while (i < Math.min(want.size(), got.size()) && want.get(i).equals(got.get(i))) {
                i++;
            }
            failures.add(phase + ": sink.txt (" + got.size() + " lines) differs from source.txt (" + want.size()
                + " lines) from line " + i + ": got " + (i < got.size() ? "'" + got.get(i) + "'" : "EOF")
                + ", want " + (i < want.size() ? "'" + want.get(i) + "'" : "EOF"));
        }
    }

    /**
     * The sink's committed offset must reach `end[0]`, the offset after the
     * data topic's last record (at most `end[1]`, the topic's end offset: a
     * transaction marker may follow the last record).
     */
    void checkOffsets(String phase, long[] end) throws Exception {
        long sourceBytes = Files.size(source);
        try {
            await("source offset " + sourceBytes + " and sink offset " + end[0]
                + (end[1] != end[0] ? ".." + end[1] : ""), 30, () -> {
                JsonNode so = get("/connectors/" + sourceName + "/offsets");
                JsonNode si = get("/connectors/" + sinkName + "/offsets");
                long sp = -1, kp = -1;
                if (so != null) {
                    for (JsonNode o : so.path("offsets")) {
                        sp = o.path("offset").path("position").asLong(-1);
                    }
                }
                if (si != null) {
                    for (JsonNode o : si.path("offsets")) {
                        kp = o.path("offset").path("kafka_offset").asLong(-1);
                    }
                }
                if (sp == sourceBytes && kp >= end[0] && kp <= end[1]) {
                    log(phase + ": offsets: source " + so + ", sink " + si);
                    return true;
                }
                return null;
            });
        } catch (IllegalStateException e) {
            failures.add(phase + ": " + e.getMessage() + "; source says " + get("/connectors/" + sourceName + "/offsets")
                + ", sink says " + get("/connectors/" + sinkName + "/offsets"));
        }
    }

    /** Reads the data topic (read_committed); returns {offset after its last record, end offset}. */
    long[] checkDataTopic(int count) throws Exception {
        Properties p = new Properties();
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        int records = 0;
        long endOffset = -1, afterLast = 0;
        try (KafkaConsumer<String, String> c = new KafkaConsumer<>(p)) {
            List<TopicPartition> tps = c.partitionsFor(data, Duration.ofSeconds(15)).stream()
                .map(pi -> new TopicPartition(data, pi.partition())).collect(Collectors.toList());
            c.assign(tps);
            c.seekToBeginning(tps);
            Map<TopicPartition, Long> end = c.endOffsets(tps);
            endOffset = end.values().stream().mapToLong(Long::longValue).sum();
            long deadline = System.nanoTime() + 30_000_000_000L;
            while (tps.stream().anyMatch(tp -> c.position(tp) < end.get(tp)) && System.nanoTime() < deadline) {
                for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(200))) {
                    records++;
                    afterLast = Math.max(afterLast, r.offset() + 1);
                }
            }
            if (tps.size() != 1) {
                failures.add("topic " + data + " has " + tps.size() + " partitions, expected 1 (topic.creation.default.partitions)");
            }
        }
        if (records != count) {
            failures.add("topic " + data + " holds " + records + " records, expected " + count);
        }
        log("topic " + data + ": " + records + " committed records, the last at " + (afterLast - 1) + ", end offset "
            + endOffset);
        return new long[] {afterLast, endOffset};
    }

    void checkInternalTopics() throws Exception {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        try (Admin admin = Admin.create(p)) {
            Set<String> names = admin.listTopics().names().get();
            List<ConfigResource> resources = new ArrayList<>();
            for (Map.Entry<String, Integer> e : INTERNAL.entrySet()) {
                String t = prefix + "-" + e.getKey();
                if (!names.contains(t)) {
                    failures.add("internal topic " + t + " missing");
                    continue;
                }
                resources.add(new ConfigResource(ConfigResource.Type.TOPIC, t));
                TopicDescription d = admin.describeTopics(List.of(t)).allTopicNames().get().get(t);
                if (d.partitions().size() != e.getValue()) {
                    failures.add("internal topic " + t + " has " + d.partitions().size() + " partitions, expected "
                        + e.getValue());
                }
            }
            Map<ConfigResource, Config> cfgs = admin.describeConfigs(resources).all().get();
            for (Map.Entry<ConfigResource, Config> e : cfgs.entrySet()) {
                ConfigEntry c = e.getValue().get("cleanup.policy");
                String v = c == null ? null : c.value();
                log("internal topic " + e.getKey().name() + ": cleanup.policy=" + v);
                if (!"compact".equals(v)) {
                    failures.add("internal topic " + e.getKey().name() + ": cleanup.policy=" + v + ", expected compact");
                }
            }
        }
    }

    void run() throws Exception {
        Files.createDirectories(dir);
        Files.deleteIfExists(source);
        Files.deleteIfExists(sink);
        appendSource(0, n);
        log("connectors: " + sourceClass + ", " + sinkClass);
        startWorker();
        JsonNode plugins = get("/connector-plugins?connectorsOnly=true");
        Set<String> classes = new java.util.TreeSet<>();
        if (plugins != null) {
            plugins.forEach(pl -> classes.add(pl.path("class").asText()));
        }
        log("connector plugins the worker lists: " + classes);
        if (sourceClass.equals(FILE_SOURCE) && !(classes.contains(FILE_SOURCE) && classes.contains(FILE_SINK))) {
            failures.add("the worker does not list the FileStream connectors: " + classes);
        }

        long t = System.nanoTime();
        Map<String, String> src = new HashMap<>();
        src.put("connector.class", sourceClass);
        src.put("tasks.max", "1");
        src.put("file", source.toString());
        src.put("topic", data);
        src.put("topic.creation.default.replication.factor", "1");
        src.put("topic.creation.default.partitions", "1");
        if (eos) {
            src.put("exactly.once.support", "required");
        }
        createConnector(sourceName, src);
        createConnector(sinkName, Map.of("connector.class", sinkClass, "tasks.max", "1", "file", sink.toString(),
            "topics", data));
        awaitSink(n, "phase 1");
        log(String.format(Locale.ROOT, "phase 1: %d lines source -> %s -> sink in %.2f s", n, data,
            (System.nanoTime() - t) / 1e9));
        String bad = notRunning();
        if (bad != null) {
            failures.add("phase 1: not running: " + bad);
        }
        checkOffsets("phase 1", checkDataTopic(n));
        checkInternalTopics();
        stopWorker();

        int more = Math.max(1, n / 2);
        appendSource(n, n + more);
        t = System.nanoTime();
        startWorker();
        awaitSink(n + more, "phase 2 (after a worker restart)");
        log(String.format(Locale.ROOT, "phase 2: restart + %d more lines through in %.2f s", more,
            (System.nanoTime() - t) / 1e9));
        bad = notRunning();
        if (bad != null) {
            failures.add("phase 2: not running: " + bad);
        }
        checkOffsets("phase 2", checkDataTopic(n + more));

        for (String c : List.of(sourceName, sinkName)) {
            HttpResponse<String> r = call("DELETE", "/connectors/" + c, null);
            if (r.statusCode() != 204) {
                failures.add("DELETE /connectors/" + c + ": HTTP " + r.statusCode() + " " + r.body());
            }
        }
        stopWorker();
    }

    static boolean onClasspath(String cls) {
        try {
            Class.forName(cls, false, ConnectCheck.class.getClassLoader());
            return true;
        } catch (ClassNotFoundException e) {
            return false;
        }
    }

    /**
     * Whether the last thread dump in a worker's stdout shows Connect's shutdown hook waiting in
     * Jetty's Server.join, called from RestServer.stop.
     */
    static boolean stuckInRestServerJoin(Path f) {
        try {
            List<String> all = Files.readAllLines(f, StandardCharsets.UTF_8);
            int from = -1;
            for (int i = 0; i < all.size(); i++) {
                if (all.get(i).startsWith("\"connect-shutdown-hook\"")) {
                    from = i;
                }
            }
            if (from < 0) {
                return false;
            }
            boolean join = false;
            for (int i = from + 1; i < all.size() && !all.get(i).isBlank(); i++) {
                String l = all.get(i);
                if (l.contains("org.eclipse.jetty.server.Server.join")) {
                    join = true;
                }
                if (l.contains("at org.apache.kafka.")) {
                    return join && l.contains("RestServer.stop");
                }
            }
            return false;
        } catch (IOException e) {
            return false;
        }
    }

    /** The thread names and Kafka frames of the last thread dump in a JVM's stdout. */
    static void threads(Path f) {
        try {
            List<String> all = Files.readAllLines(f, StandardCharsets.UTF_8);
            int from = 0;
            for (int i = 0; i < all.size(); i++) {
                if (all.get(i).startsWith("Full thread dump")) {
                    from = i;
                }
            }
            System.err.println("--- threads of the stuck worker (" + f + "):");
            all.subList(from, all.size()).stream()
                .filter(l -> l.startsWith("\"") || l.contains("at org.apache.kafka") || l.contains("- waiting on")
                    || l.contains("- parking to wait"))
                .forEach(System.err::println);
        } catch (IOException e) {
            System.err.println("(no " + f + ")");
        }
    }

    static void lastLines(Path f, int lines) {
        try {
            List<String> all = Files.readAllLines(f, StandardCharsets.UTF_8);
            System.err.println("--- last " + lines + " lines of " + f + ":");
            all.subList(Math.max(0, all.size() - lines), all.size())
                .forEach(l -> System.err.println(l.length() > 600 ? l.substring(0, 600) + "..." : l));
        } catch (IOException e) {
            System.err.println("(no " + f + ")");
        }
    }

    static void tail(Path f, int lines) {
        try {
            List<String> all = Files.readAllLines(f, StandardCharsets.UTF_8);
            System.err.println("--- last " + lines + " ERROR/WARN lines of " + f + ":");
            all.stream().filter(l -> l.contains("] ERROR ") || l.contains("] WARN "))
                .skip(Math.max(0, all.stream().filter(l -> l.contains("] ERROR ") || l.contains("] WARN ")).count() - lines))
                .forEach(l -> System.err.println(l.length() > 600 ? l.substring(0, 600) + "..." : l));
        } catch (IOException e) {
            System.err.println("(no " + f + ")");
        }
    }

    public static void main(String[] a) throws Exception {
        if (a.length < 4 || a.length > 6 || (a.length == 6 && !a[5].equals("eos"))) {
            System.err.println("usage: ConnectCheck BOOTSTRAP PREFIX WORKDIR N [auto|file|embedded] [eos]");
            System.exit(2);
        }
        String mode = a.length >= 5 ? a[4] : "auto";
        boolean eos = a.length == 6;
        boolean file = mode.equals("file") || (mode.equals("auto") && onClasspath(FILE_SOURCE) && onClasspath(FILE_SINK));
        if (mode.equals("file") && !onClasspath(FILE_SOURCE)) {
            System.err.println("no " + FILE_SOURCE + " on the classpath (the org.apache.kafka:connect-file jar)");
            System.exit(2);
        }
        ConnectCheck c = new ConnectCheck(a[0], a[1], Paths.get(a[2]).toAbsolutePath(), Integer.parseInt(a[3]),
            file ? FILE_SOURCE : LineSource.class.getName(), file ? FILE_SINK : LineSink.class.getName(), eos);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            Process w = c.worker;
            if (w != null && w.isAlive()) {
                w.destroyForcibly();
            }
        }));
        try {
            c.run();
        } catch (Exception e) {
            c.failures.add("aborted: " + e);
        } finally {
            if (c.worker != null) {
                tail(c.workerLog(), 30);
                c.stopWorker();
            }
        }
        log(String.format(Locale.ROOT, "total %.2f s", (System.nanoTime() - T0) / 1e9));
        if (c.failures.isEmpty()) {
            System.out.println("OK connect " + (file ? "file" : "embedded") + " connectors" + (eos ? " (exactly-once source)" : "") + ", " + c.n + " + " + Math.max(1, c.n / 2)
                + " lines through a worker restart");
            System.exit(0);
        }
        System.out.println("FAIL connect: " + c.failures.size() + " failures");
        for (String f : c.failures) {
            System.out.println("  " + f);
        }
        for (int i = 1; i <= c.workerNo; i++) {
            tail(c.dir.resolve("worker-" + i + ".log"), 15);
        }
        System.exit(1);
    }

    // --- the embedded connectors (like connect-file's) -------------------------

    static final String VERSION = "1";

    /** A file's lines to a topic; the source offset is the byte position after a line. */
    public static class LineSource extends SourceConnector {
        Map<String, String> props;

        @Override
        public void start(Map<String, String> props) {
            this.props = props;
        }

        @Override
        public Class<? extends Task> taskClass() {
            return LineSourceTask.class;
        }

        @Override
        public List<Map<String, String>> taskConfigs(int maxTasks) {
            return List.of(props);
        }

        @Override
        public void stop() {
        }

        @Override
        public org.apache.kafka.connect.source.ExactlyOnceSupport exactlyOnceSupport(Map<String, String> props) {
            // Records and their offsets go in one transaction per poll: a
            // restart resumes after the last committed line.
            return org.apache.kafka.connect.source.ExactlyOnceSupport.SUPPORTED;
        }

        @Override
        public ConfigDef config() {
            return new ConfigDef()
                .define("file", ConfigDef.Type.STRING, ConfigDef.Importance.HIGH, "the file to read")
                .define("topic", ConfigDef.Type.STRING, ConfigDef.Importance.HIGH, "the topic to write");
        }

        @Override
        public String version() {
            return VERSION;
        }
    }

    public static class LineSourceTask extends SourceTask {
        String file, topic;
        long position;

        @Override
        public void start(Map<String, String> props) {
            file = props.get("file");
            topic = props.get("topic");
            Map<String, Object> stored = context.offsetStorageReader().offset(Map.of("filename", file));
            position = stored == null ? 0 : ((Number) stored.get("position")).longValue();
        }

        @Override
        public List<SourceRecord> poll() throws InterruptedException {
            List<SourceRecord> out = new ArrayList<>();
            try (RandomAccessFile f = new RandomAccessFile(file, "r")) {
                long len = f.length();
                if (len > position) {
                    byte[] buf = new byte[(int) Math.min(len - position, 1 << 20)];
                    f.seek(position);
                    f.readFully(buf);
                    int start = 0;
                    for (int i = 0; i < buf.length && out.size() < 2000; i++) {
                        if (buf[i] == '\n') {
                            String line = new String(buf, start, i - start, StandardCharsets.UTF_8);
                            long next = position + i + 1;
                            out.add(new SourceRecord(Map.of("filename", file), Map.of("position", next), topic, null,
                                null, null, Schema.STRING_SCHEMA, line, System.currentTimeMillis()));
                            start = i + 1;
                        }
                    }
                    position += start;
                }
            } catch (IOException e) {
                throw new org.apache.kafka.connect.errors.ConnectException(e);
            }
            if (out.isEmpty()) {
                Thread.sleep(200);
                return null;
            }
            return out;
        }

        @Override
        public void stop() {
        }

        @Override
        public String version() {
            return VERSION;
        }
    }

    /** A topic's values appended to a file, one a line. */
    public static class LineSink extends SinkConnector {
        Map<String, String> props;

        @Override
        public void start(Map<String, String> props) {
            this.props = props;
        }

        @Override
        public Class<? extends Task> taskClass() {
            return LineSinkTask.class;
        }

        @Override
        public List<Map<String, String>> taskConfigs(int maxTasks) {
            return List.of(props);
        }

        @Override
        public void stop() {
        }

        @Override
        public ConfigDef config() {
            return new ConfigDef().define("file", ConfigDef.Type.STRING, ConfigDef.Importance.HIGH, "the file to append to");
        }

        @Override
        public String version() {
            return VERSION;
        }
    }

    public static class LineSinkTask extends SinkTask {
        Writer out;

        @Override
        public void start(Map<String, String> props) {
            try {
                out = Files.newBufferedWriter(Paths.get(props.get("file")), StandardCharsets.UTF_8,
                    StandardOpenOption.CREATE, StandardOpenOption.APPEND);
            } catch (IOException e) {
                throw new org.apache.kafka.connect.errors.ConnectException(e);
            }
        }

        @Override
        public void put(Collection<SinkRecord> records) {
            try {
                for (SinkRecord r : records) {
                    out.write(String.valueOf(r.value()));
                    out.write('\n');
                }
            } catch (IOException e) {
                throw new org.apache.kafka.connect.errors.ConnectException(e);
            }
        }

        @Override
        public void flush(Map<TopicPartition, org.apache.kafka.clients.consumer.OffsetAndMetadata> offsets) {
            try {
                out.flush();
            } catch (IOException e) {
                throw new org.apache.kafka.connect.errors.ConnectException(e);
            }
        }

        @Override
        public void stop() {
            try {
                out.close();
            } catch (IOException e) {
                // closing
            }
        }

        @Override
        public String version() {
            return VERSION;
        }
    }
}
