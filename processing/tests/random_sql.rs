//! 1,000 random SQL strings — token soup, and valid statements with bytes
//! cut, repeated and replaced — through the compiler; those that compile
//! run over records with random values. Nothing may panic; every refusal
//! says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use tributary_processing::compile;
use tributary_processing::engine::{Counts, Engine, State};
use tributary_storage::Record;

const VALID: &[&str] = &[
    "INSERT INTO o SELECT _key AS d, COUNT(*) AS n, AVG(t) AS a, window_start FROM s WHERE t IS NOT NULL GROUP BY _key, TUMBLE(_ts, INTERVAL '10' SECOND) HAVING COUNT(*) > 1 WITH (lateness = '2s')",
    "INSERT INTO o SELECT a.b.c, x['k'], _headers['h'], CASE WHEN x > 1 THEN 'a' ELSE 'b' END AS c FROM s WHERE x BETWEEN 1 AND 9 OR y IN (1, 2, NULL)",
    "INSERT INTO o SELECT s.x, t.y FROM s LEFT JOIN t ON s._key = t._key WHERE t.y LIKE 'a%'",
    "INSERT INTO o SELECT a.x, b.y FROM a JOIN b ON a.id = b.id AND b._ts BETWEEN a._ts - INTERVAL '5' SECOND AND a._ts + INTERVAL '5' SECOND",
    "INSERT INTO o SELECT _key, STDDEV(v), APPROX_PERCENTILE(v, 0.99), FIRST_VALUE(v), LAST_VALUE(v) FROM s GROUP BY _key, SESSION(_ts, INTERVAL '3' SECOND)",
    "INSERT INTO o SELECT COUNT(*) AS n, SUM(v) FROM s GROUP BY HOP(_ts, INTERVAL '1' SECOND, INTERVAL '4' SECOND)",
    "INSERT INTO o SELECT _key, MIN(v), MAX(v) FROM s GROUP BY _key, COUNT_WINDOW(3)",
    "INSERT INTO o SELECT UPPER(n), LENGTH(n), SUBSTRING(n FROM 2 FOR 3), ROUND(v / 3, 2), CAST(v AS INT), COALESCE(z, 0), FORMAT_TIME(_ts), EXTRACT(HOUR FROM _ts), DATE_TRUNC('minute', _ts) FROM s",
    "INSERT INTO o SELECT * FROM s WHERE NOT (v % 2 = 0) AND -v < 5 || 'x' = 'y'",
];

const TOKENS: &[&str] = &[
    "INSERT",
    "INTO",
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "HAVING",
    "JOIN",
    "LEFT",
    "ON",
    "AND",
    "OR",
    "NOT",
    "WITH",
    "AS",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "CAST",
    "INT",
    "NULL",
    "TRUE",
    "IS",
    "IN",
    "BETWEEN",
    "TUMBLE",
    "HOP",
    "SESSION",
    "COUNT_WINDOW",
    "COUNT",
    "SUM",
    "AVG",
    "MIN",
    "MAX",
    "STDDEV",
    "APPROX_PERCENTILE",
    "INTERVAL",
    "'10'",
    "SECOND",
    "_key",
    "_ts",
    "_value",
    "_headers",
    "window_start",
    "x",
    "s",
    "o",
    "t",
    "a.b",
    "(",
    ")",
    ",",
    "*",
    "+",
    "-",
    "/",
    "%",
    "=",
    "<",
    ">=",
    "'s'",
    "1",
    "0",
    "-7",
    "2.5",
    "[",
    "]",
    ";",
    "'2s'",
    "lateness",
    "max_groups",
    "=",
    "1e400",
    "9223372036854775807",
    "\"q\"",
];

fn records(rng: &mut fastrand::Rng) -> Vec<Record> {
    (0..40)
        .map(|i| {
            let value = match rng.u8(0..6) {
                0 => b"not json".to_vec(),
                1 => Vec::new(),
                2 => format!("{{\"t\": {}, \"v\": \"s{}\"}}", rng.i32(..), rng.u8(..)).into_bytes(),
                3 => b"[1,2,{\"a\":null}]".to_vec(),
                _ => format!(
                    "{{\"t\": {}, \"v\": {}, \"x\": {}, \"n\": \"abc\", \"a\": {{\"b\": {{\"c\": 1}}}}, \"id\": {}}}",
                    rng.f64() * 100.0,
                    rng.i64(-5..5),
                    rng.i64(..),
                    rng.u8(0..4)
                )
                .into_bytes(),
            };
            Record {
                partition: 0,
                offset: i,
                key: rng.bool().then(|| vec![b'k', rng.u8(b'0'..b'4')]),
                value: (rng.u8(0..10) > 0).then_some(value),
                timestamp: rng.i64(-10_000..100_000) * if rng.u8(0..50) == 0 { i64::MAX / 100_000 } else { 1 },
                headers: vec![("h".into(), vec![rng.u8(..)])],
            }
        })
        .collect()
}

#[test]
fn random_sql_never_panics() {
    let mut rng = fastrand::Rng::with_seed(1);
    let (mut ok, mut refused) = (0, 0);
    for i in 0..1000 {
        let sql = if i % 2 == 0 {
            let mut s: Vec<char> = VALID[rng.usize(..VALID.len())].chars().collect();
            for _ in 0..rng.usize(0..4) {
                let at = rng.usize(..s.len().max(1)).min(s.len());
                match rng.u8(0..3) {
                    0 if at < s.len() => {
                        s.remove(at);
                    }
                    1 => s.insert(
                        at,
                        ['(', ')', '\'', ',', ' ', 'x', '1', '*', '\u{e9}'][rng.usize(..9)],
                    ),
                    _ => {
                        let end = (at + rng.usize(0..20)).min(s.len());
                        let piece: Vec<char> = s[at..end].to_vec();
                        let to = rng.usize(..=s.len());
                        for (j, c) in piece.into_iter().enumerate() {
                            s.insert(to + j, c);
                        }
                    }
                }
            }
            s.into_iter().collect::<String>()
        } else {
            let mut s = String::from(if rng.bool() {
                "INSERT INTO o SELECT "
            } else {
                ""
            });
            for _ in 0..rng.usize(1..30) {
                s.push_str(TOKENS[rng.usize(..TOKENS.len())]);
                s.push(' ');
            }
            s
        };
        match compile(&sql) {
            Ok(plan) => {
                ok += 1;
                let plan = Arc::new(plan);
                let mut engine = Engine::new(plan.clone(), State::default());
                let mut out = Vec::new();
                let mut counts = Counts::default();
                for r in records(&mut rng) {
                    let src = usize::from(plan.join.is_some() && rng.bool());
                    engine.process(src, "s", &r, &mut out, &mut counts);
                }
                assert_eq!(counts.rows_in, 40);
            }
            Err(e) => {
                refused += 1;
                assert!(!e.message.is_empty(), "{sql}");
            }
        }
    }
    assert!(
        ok > 100 && refused > 100,
        "compiled {ok}, refused {refused}"
    );
}
