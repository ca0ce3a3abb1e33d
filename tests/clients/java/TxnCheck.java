// Kafka transactions seen by the Apache Kafka Java client (kafka-clients 4.x):
// the scenario of `kafka_txn_check.py basic`, plus what the Admin client says
// about the transactions (DescribeTransactions, ListTransactions).
//
// usage: java -cp <kafka-clients and its runtime jars>:<classes> TxnCheck basic BOOTSTRAP PREFIX
// Prints one JSON summary line; exits 1 on a mismatch.
//
// Topic PREFIX (created with 3 partitions unless it exists); every value is
// "<kind>-t<txn>-<seq>", seq counting up over the run, partition seq % 3.
//  1. transactional.id PREFIX-txn commits 10 transactions of 30 records and
//     aborts 5 (each aborted one flushed first, so its records are in the log).
//  2. It opens one more (kind zombie, flushed); a second producer with the
//     same transactional.id calls initTransactions (fencing the first and
//     aborting its transaction) and commits one (fencer). The first produces
//     again (zlate) and commits: that must fail with ProducerFencedException
//     or InvalidProducerEpochException (`fenced_error`); no zlate record may
//     be stored.
//  3. A child JVM (transactional.id PREFIX-hung, transaction.timeout.ms 6000)
//     opens a transaction over all partitions, flushes and is killed
//     (SIGKILL): only the broker can end it. DescribeTransactions must show it
//     Ongoing over 3 partitions. The fencer commits one more (after); a
//     read_committed consumer must not see it before 60 % of the timeout, and
//     must see it once the broker has aborted the hung transaction, which
//     DescribeTransactions then shows CompleteAbort.
//  4. Fresh consumers read everything: read_committed exactly the commit,
//     fencer and after records, once each, in order per partition;
//     read_uncommitted every record delivered (aborted ones too), none other.
//     ListTransactions must list both transactional ids.
// (Internal) TxnCheck hang BOOTSTRAP TOPIC TXNID TIMEOUT_MS FIRST COUNT: the child.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.TreeMap;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.TransactionDescription;
import org.apache.kafka.clients.admin.TransactionListing;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.InvalidProducerEpochException;
import org.apache.kafka.common.errors.ProducerFencedException;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class TxnCheck {
    static final int PARTITIONS = 3, COMMITS = 10, ABORTS = 5, PER_TXN = 30;
    static final int HUNG_TIMEOUT_MS = 6000;
    static final Set<String> COMMITTED_KINDS = Set.of("commit", "fencer", "after");
    static final Set<String> ABORTED_KINDS = Set.of("abort", "zombie", "hung", "zlate");

    final String bootstrap, topic, txnId, hungId;
    final Admin admin;
    int seq = 0;
    /** value -> kind, every value handed to a producer. */
    final Map<String, String> produced = new ConcurrentHashMap<>();
    final Set<String> delivered = ConcurrentHashMap.newKeySet();
    final List<String> deliveryErrors = Collections.synchronizedList(new ArrayList<>());
    final Set<String> zlateErrors = ConcurrentHashMap.newKeySet();
    final Map<String, Object> out = new LinkedHashMap<>();

    TxnCheck(String bootstrap, String prefix) {
        this.bootstrap = bootstrap;
        this.topic = prefix;
        this.txnId = prefix + "-txn";
        this.hungId = prefix + "-hung";
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        admin = Admin.create(p);
    }

    static void log(String s) {
        System.err.println(s);
    }

    static KafkaProducer<String, String> producer(String bootstrap, String txnId, Integer timeoutMs) {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, txnId);
        p.put(ProducerConfig.LINGER_MS_CONFIG, 5);
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        if (timeoutMs != null) {
            p.put(ProducerConfig.TRANSACTION_TIMEOUT_CONFIG, timeoutMs);
        }
        return new KafkaProducer<>(p);
    }

    KafkaConsumer<String, String> consumer(String isolation) {
        Properties p = new Properties();
        p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, isolation);
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, false);
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, 100);
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        KafkaConsumer<String, String> c = new KafkaConsumer<>(p);
        c.assign(partitions());
        c.seekToBeginning(partitions());
        return c;
    }

    List<TopicPartition> partitions() {
        List<TopicPartition> tps = new ArrayList<>();
        for (int p = 0; p < PARTITIONS; p++) {
            tps.add(new TopicPartition(topic, p));
        }
        return tps;
    }

    static long seqOf(String v) {
        return Long.parseLong(v.substring(v.lastIndexOf('-') + 1));
    }

    void produce(KafkaProducer<String, String> p, String kind, int txn, int n) {
        for (int i = 0; i < n; i++) {
            int s = seq++;
            String v = String.format(Locale.ROOT, "%s-t%d-%06d", kind, txn, s);
            produced.put(v, kind);
            try {
                p.send(new ProducerRecord<>(topic, s % PARTITIONS, kind, v), (meta, e) -> {
                    if (e == null) {
                        delivered.add(v);
                    } else if (kind.equals("zlate")) {
                        zlateErrors.add(e.getClass().getSimpleName());
                    } else {
                        deliveryErrors.add(v + ": " + e);
                    }
                });
            } catch (RuntimeException e) {
                // A producer already in an error state refuses at once.
                if (!kind.equals("zlate")) {
                    throw e;
                }
                zlateErrors.add(e.getClass().getSimpleName());
            }
        }
    }

    void ensureTopic() throws Exception {
        try {
            admin.createTopics(List.of(new NewTopic(topic, PARTITIONS, (short) 1))).all().get(30, TimeUnit.SECONDS);
        } catch (ExecutionException e) {
            if (!(e.getCause() instanceof TopicExistsException)) {
                throw e;
            }
        }
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
        while (true) {
            try {
                admin.describeTopics(List.of(topic)).allTopicNames().get(10, TimeUnit.SECONDS);
                return;
            } catch (ExecutionException e) {
                if (System.nanoTime() > deadline) {
                    throw e;
                }
                Thread.sleep(200);
            }
        }
    }

    /** Every class name in the chain of causes. */
    static List<String> chain(Throwable t) {
        List<String> names = new ArrayList<>();
        for (; t != null && names.size() < 10; t = t.getCause()) {
            names.add(t.getClass().getSimpleName());
        }
        return names;
    }

    static boolean isFenced(String name) {
        return name.equals(ProducerFencedException.class.getSimpleName())
                || name.equals(InvalidProducerEpochException.class.getSimpleName());
    }

    TransactionDescription describe(String id) {
        try {
            return admin.describeTransactions(List.of(id)).description(id).get(30, TimeUnit.SECONDS);
        } catch (Exception e) {
            log("describeTransactions " + id + ": " + e);
            out.put("describe_error", String.valueOf(e));
            return null;
        }
    }

    boolean run() throws Exception {
        ensureTopic();

        // 1. Commits and aborts.
        KafkaProducer<String, String> p1 = producer(bootstrap, txnId, null);
        p1.initTransactions();
        int txn = 0;
        for (int t = 0; t < COMMITS + ABORTS; t++, txn++) {
            boolean abort = t % 3 == 1;
            p1.beginTransaction();
            produce(p1, abort ? "abort" : "commit", txn, PER_TXN);
            if (abort) {
                p1.flush();
                p1.abortTransaction();
            } else {
                p1.commitTransaction();
            }
        }
        out.put("committed_txns", COMMITS);
        out.put("aborted_txns", ABORTS);

        // 2. A zombie: p1 has a transaction open when p2 takes its id.
        p1.beginTransaction();
        produce(p1, "zombie", txn++, PER_TXN);
        p1.flush();
        KafkaProducer<String, String> p2 = producer(bootstrap, txnId, null);
        long t = System.nanoTime();
        p2.initTransactions();
        out.put("fencer_init_s", (System.nanoTime() - t) / 1e9);
        p2.beginTransaction();
        produce(p2, "fencer", txn++, PER_TXN);
        p2.commitTransaction();
        List<String> errors = new ArrayList<>();
        boolean zombieCommitted = false;
        try {
            produce(p1, "zlate", txn++, PER_TXN);
            p1.flush();
            p1.commitTransaction();
            zombieCommitted = true;
        } catch (RuntimeException e) {
            errors.addAll(chain(e));
            if (!(e instanceof ProducerFencedException)) {
                // Abortable (e.g. InvalidProducerEpochException on produce): the
                // abort reaches the coordinator with the old epoch.
                try {
                    p1.abortTransaction();
                    errors.add("abort accepted");
                } catch (RuntimeException e2) {
                    errors.addAll(chain(e2));
                }
            }
        }
        p1.close(Duration.ZERO);
        errors.addAll(zlateErrors);
        out.put("fenced_errors", errors);
        String fenced = errors.stream().filter(n -> n.equals("ProducerFencedException")).findFirst()
                .orElse(errors.stream().filter(TxnCheck::isFenced).findFirst().orElse(null));
        out.put("fenced_error", fenced);
        out.put("zombie_committed", zombieCommitted);

        // 3. A transaction only the broker can end.
        int hungFirst = seq;
        seq += PER_TXN;
        String java = ProcessHandle.current().info().command().orElse("java");
        Process child = new ProcessBuilder(java, "-cp", System.getProperty("java.class.path"), "TxnCheck", "hang",
                bootstrap, topic, hungId, String.valueOf(HUNG_TIMEOUT_MS), String.valueOf(hungFirst),
                String.valueOf(PER_TXN)).redirectError(ProcessBuilder.Redirect.INHERIT).start();
        BufferedReader childOut = new BufferedReader(new InputStreamReader(child.getInputStream(), StandardCharsets.UTF_8));
        String line = CompletableFuture.supplyAsync(() -> {
            try {
                return childOut.readLine();
            } catch (Exception e) {
                return null;
            }
        }).get(90, TimeUnit.SECONDS);
        long t0 = System.nanoTime();
        child.destroyForcibly();
        child.waitFor();
        if (line == null || !line.startsWith("delivered ")) {
            throw new IllegalStateException("the hung transaction's records were not delivered: " + line);
        }
        for (String v : line.substring("delivered ".length()).split(",")) {
            produced.put(v, "hung");
            delivered.add(v);
        }
        TransactionDescription open = describe(hungId);
        out.put("describe_hung_open_state", open == null ? null : open.state().toString());
        out.put("describe_hung_open_partitions", open == null ? null : open.topicPartitions().size());
        out.put("describe_hung_open_timeout_ms", open == null ? null : open.transactionTimeoutMs());
        p2.beginTransaction();
        int firstAfter = seq;
        produce(p2, "after", txn, PER_TXN);
        Set<String> after = new HashSet<>();
        for (int s = firstAfter; s < seq; s++) {
            after.add(String.format(Locale.ROOT, "after-t%d-%06d", txn, s));
        }
        txn++;
        p2.commitTransaction();
        long earlyUntil = t0 + (long) (HUNG_TIMEOUT_MS * 0.6) * 1_000_000L;
        long deadline = t0 + TimeUnit.SECONDS.toNanos(120);
        Set<String> seenAfter = new HashSet<>();
        int early = 0, hungSeen = 0;
        Double released = null;
        try (KafkaConsumer<String, String> c = consumer("read_committed")) {
            while (System.nanoTime() < deadline) {
                for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(200))) {
                    if (after.contains(r.value())) {
                        seenAfter.add(r.value());
                        early += System.nanoTime() < earlyUntil ? 1 : 0;
                    }
                    hungSeen += r.value() != null && r.value().startsWith("hung-") ? 1 : 0;
                }
                if (seenAfter.equals(after)) {
                    released = (System.nanoTime() - t0) / 1e9;
                    break;
                }
            }
        }
        out.put("hung_timeout_ms", HUNG_TIMEOUT_MS);
        out.put("hung_after_seen_early", early);
        out.put("hung_blocked", early == 0 && System.nanoTime() > earlyUntil);
        out.put("hung_released_s", released);
        out.put("hung_seen_read_committed", hungSeen);
        // The abort is written before the markers that release the LSO, so
        // by now the state is final.
        TransactionDescription ended = describe(hungId);
        out.put("describe_hung_final_state", ended == null ? null : ended.state().toString());
        TransactionDescription main = describe(txnId);
        out.put("describe_txn_state", main == null ? null : main.state().toString());
        out.put("describe_txn_epoch", main == null ? null : main.producerEpoch());
        p2.close(Duration.ofSeconds(10));
        Collection<TransactionListing> listings = admin.listTransactions().all().get(30, TimeUnit.SECONDS);
        Map<String, String> listed = new TreeMap<>();
        for (TransactionListing l : listings) {
            if (l.transactionalId().startsWith(topic + "-")) {
                listed.put(l.transactionalId(), l.state().toString());
            }
        }
        out.put("listed", listed);

        // 4. Everything, read back both ways.
        Set<String> committed = delivered.stream().filter(v -> COMMITTED_KINDS.contains(produced.get(v)))
                .collect(Collectors.toSet());
        out.put("delivery_errors", deliveryErrors.subList(0, Math.min(10, deliveryErrors.size())));
        Map<TopicPartition, Long> ends;
        try (KafkaConsumer<String, String> c = consumer("read_uncommitted")) {
            ends = c.endOffsets(partitions(), Duration.ofSeconds(30));
        }
        boolean ok = deliveryErrors.isEmpty() && fenced != null && !zombieCommitted
                && Boolean.TRUE.equals(out.get("hung_blocked")) && released != null && hungSeen == 0;
        int zlateStored = 0;
        for (String name : List.of("rc", "ru")) {
            Set<String> want = name.equals("rc") ? committed : new HashSet<>(delivered);
            Map<Integer, List<String>> got = new TreeMap<>();
            boolean toEnd = false;
            try (KafkaConsumer<String, String> c = consumer(name.equals("rc") ? "read_committed" : "read_uncommitted")) {
                long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
                while (System.nanoTime() < until) {
                    for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(200))) {
                        got.computeIfAbsent(r.partition(), k -> new ArrayList<>()).add(r.value());
                    }
                    toEnd = true;
                    for (TopicPartition tp : partitions()) {
                        toEnd &= c.position(tp) >= ends.get(tp);
                    }
                    if (toEnd) {
                        break;
                    }
                }
            }
            Map<String, Integer> counts = new HashMap<>();
            boolean orderOk = true;
            for (Map.Entry<Integer, List<String>> e : got.entrySet()) {
                long last = -1;
                for (String v : e.getValue()) {
                    counts.merge(String.valueOf(v), 1, Integer::sum);
                    if (v != null && produced.containsKey(v)) {
                        long s = seqOf(v);
                        orderOk &= s % PARTITIONS == e.getKey() && s > last;
                        last = s;
                    }
                }
            }
            int seen = counts.values().stream().mapToInt(Integer::intValue).sum();
            int missing = (int) want.stream().filter(v -> !counts.containsKey(v)).count();
            int duplicates = (int) counts.values().stream().filter(n -> n > 1).count();
            int unexpected = (int) counts.keySet().stream().filter(v -> !produced.containsKey(v)).count();
            int abortedSeen = (int) counts.keySet().stream().filter(v -> ABORTED_KINDS.contains(produced.get(v))).count();
            counts.keySet().stream().filter(v -> !produced.containsKey(v)).limit(3)
                    .forEach(v -> log(name + ": unexpected value " + v));
            out.put(name + "_expected", want.size());
            out.put(name + "_seen", seen);
            out.put(name + "_missing", missing);
            out.put(name + "_duplicates", duplicates);
            out.put(name + "_unexpected", unexpected);
            out.put(name + "_aborted_seen", abortedSeen);
            out.put(name + "_order_ok", orderOk);
            out.put(name + "_to_end", toEnd);
            ok &= missing == 0 && duplicates == 0 && unexpected == 0 && orderOk && toEnd && seen == want.size();
            if (name.equals("rc")) {
                ok &= abortedSeen == 0;
            } else {
                zlateStored = (int) counts.keySet().stream().filter(v -> v.startsWith("zlate-")).count();
            }
        }
        out.put("zombie_late_stored", zlateStored);
        ok &= zlateStored == 0;
        Map<String, List<String>> byPartition = new TreeMap<>();
        committed.stream().sorted((a, b) -> Long.compare(seqOf(a), seqOf(b)))
                .forEach(v -> byPartition.computeIfAbsent(String.valueOf(seqOf(v) % PARTITIONS), k -> new ArrayList<>()).add(v));
        out.put("committed_by_partition", byPartition);
        out.put("ok", ok);
        admin.close(Duration.ofSeconds(5));
        return ok;
    }

    /** The child: opens a transaction, flushes, reports, waits to be killed. */
    static void hang(String bootstrap, String topic, String txnId, int timeoutMs, int first, int count) throws Exception {
        List<String> delivered = Collections.synchronizedList(new ArrayList<>());
        KafkaProducer<String, String> p = producer(bootstrap, txnId, timeoutMs);
        p.initTransactions();
        p.beginTransaction();
        for (int s = first; s < first + count; s++) {
            String v = String.format(Locale.ROOT, "hung-t0-%06d", s);
            p.send(new ProducerRecord<>(topic, s % PARTITIONS, "hung", v), (meta, e) -> {
                if (e == null) {
                    delivered.add(v);
                }
            });
        }
        p.flush();
        System.out.println("delivered " + String.join(",", delivered));
        System.out.flush();
        Thread.sleep(3_600_000);
    }

    // A JSON writer for the summary: strings, numbers, booleans, null, lists, maps.
    static String json(Object o) {
        if (o == null) {
            return "null";
        } else if (o instanceof String) {
            StringBuilder b = new StringBuilder("\"");
            for (char ch : ((String) o).toCharArray()) {
                if (ch == '"' || ch == '\\') {
                    b.append('\\').append(ch);
                } else if (ch < 0x20) {
                    b.append(String.format(Locale.ROOT, "\\u%04x", (int) ch));
                } else {
                    b.append(ch);
                }
            }
            return b.append('"').toString();
        } else if (o instanceof Map) {
            return ((Map<?, ?>) o).entrySet().stream().map(e -> json(String.valueOf(e.getKey())) + ": " + json(e.getValue()))
                    .collect(Collectors.joining(", ", "{", "}"));
        } else if (o instanceof Collection) {
            return ((Collection<?>) o).stream().map(TxnCheck::json).collect(Collectors.joining(", ", "[", "]"));
        } else if (o instanceof Double) {
            return String.format(Locale.ROOT, "%.2f", (Double) o);
        }
        return String.valueOf(o);
    }

    public static void main(String[] args) throws Exception {
        if (args.length == 7 && args[0].equals("hang")) {
            hang(args[1], args[2], args[3], Integer.parseInt(args[4]), Integer.parseInt(args[5]), Integer.parseInt(args[6]));
            return;
        }
        if (args.length != 3 || !args[0].equals("basic")) {
            System.err.println("usage: TxnCheck basic BOOTSTRAP PREFIX");
            System.exit(2);
        }
        TxnCheck check = new TxnCheck(args[1], args[2]);
        boolean ok;
        try {
            ok = check.run();
        } catch (Exception e) {
            e.printStackTrace();
            check.out.put("error", String.valueOf(e));
            ok = false;
        }
        System.out.println(json(check.out));
        System.out.flush();
        // Client threads left behind (a fenced producer, a timed-out call) do
        // not keep the JVM.
        System.exit(ok ? 0 : 1);
    }
}
