//! `kind = "postgres_sink"`: records as rows of a PostgreSQL table, exactly
//! once (see [`crate::config::PostgresSink`]).
//!
//! Each batch is one transaction: it locks and reads the connector's
//! position in the partition (a row of `offsets_table`), skips records
//! below it, writes the rest with `COPY` (insert mode) or `COPY` into a
//! temporary table and one `INSERT … ON CONFLICT DO UPDATE` (upsert mode),
//! moves the position past the batch, and commits. A batch delivered again
//! — after a node crash between the commit and the consumer group's own
//! commit, or after a commit whose answer was lost — finds its position
//! already moved and writes nothing. At start the stored positions are read
//! back and win over the group's when ahead.
//!
//! A row the table refuses (a data exception, a constraint, a trigger's
//! `RAISE`) sends the batch round again one row at a time, each in a
//! savepoint: the refused rows go to the dead-letter topic (durably, before
//! the transaction commits: a dead letter may repeat after a crash, a row
//! never does) and the rest are written. Any other failure (the server
//! unreachable, restarting, a dropped table) is retried without limit with
//! backoff: the records wait in the log and the lag grows.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config, NoTls, Statement, Transaction};
use tributary_storage::Record;

use crate::config::{resolve, PgMode, PostgresSink};
use crate::sink::{DeadLetters, Deliver, Outcome, Position};

/// The temporary table upserts go through (one per connection).
const STAGE: &str = "pg_temp.tributary_stage";

/// Parses a connection URL (`postgres://…` or `key=value …`); the error
/// never repeats the URL (it may hold a password).
pub fn parse_url(url: &str) -> Result<Config, String> {
    url.parse::<Config>()
        .map_err(|e| format!("not a PostgreSQL connection string: {e}"))
}

/// `name` as a quoted identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table name (`name` or `schema.name`), quoted.
pub fn quote_table(table: &str) -> Result<String, String> {
    let parts: Vec<&str> = table.split('.').collect();
    if table.is_empty() || parts.len() > 2 || parts.iter().any(|p| p.is_empty() || p.contains('\0'))
    {
        return Err(format!(
            "`{table}` is not a table name (`name` or `schema.name`)"
        ));
    }
    Ok(parts.iter().map(|p| quote(p)).collect::<Vec<_>>().join("."))
}

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// The record's key.
    Key,
    /// The record's whole value.
    Value,
    /// Its timestamp (a timestamp column gets the time, others the
    /// milliseconds since the epoch).
    Ts,
    /// Its topic.
    Topic,
    /// Its partition.
    Partition,
    /// Its offset.
    Offset,
    /// A field of the value's JSON object (nested: `a.b`).
    Path(Vec<String>),
}

impl Field {
    /// Parses a `columns` value.
    pub fn parse(s: &str) -> Result<Field, String> {
        Ok(match s {
            "_key" => Field::Key,
            "_value" => Field::Value,
            "_ts" => Field::Ts,
            "_topic" => Field::Topic,
            "_partition" => Field::Partition,
            "_offset" => Field::Offset,
            _ => {
                let path: Vec<String> = s.split('.').map(str::to_owned).collect();
                if path.iter().any(String::is_empty) {
                    return Err(format!(
                        "`{s}` is not a field (a JSON field `name` or `a.b`, or `_key`, `_value`, `_ts`, `_topic`, `_partition`, `_offset`)"
                    ));
                }
                Field::Path(path)
            }
        })
    }
}

struct Column {
    field: Field,
    ty: Type,
}

/// What a connection knows of the table: its columns' types and the
/// statements of a batch.
struct Plan {
    columns: Vec<Column>,
    /// `COPY … FROM STDIN` of a batch's rows.
    copy: String,
    /// Upsert mode: the statement moving the staged rows into the table.
    upsert: Option<String>,
    /// Reads the position of a partition, locking it (prepared once per
    /// connection, as the next two).
    read_position: Option<Statement>,
    /// Writes the position of a partition.
    write_position: Option<Statement>,
    /// Reads every position of the connector.
    read_positions: Option<Statement>,
}

/// Why connecting failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server could not be reached (or answered with an error that
    /// may pass): try again later.
    Unreachable(String),
    /// The server answered that the settings are wrong (the message names
    /// the setting).
    Invalid(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Unreachable(e) | ConnectError::Invalid(e) => f.write_str(e),
        }
    }
}

/// An error's text: the server's code, message and detail, or the
/// client's own.
fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut t = format!("{} {}", d.code().code(), d.message());
            if let Some(detail) = d.detail() {
                let _ = write!(t, " ({detail})");
            }
            t
        }
        None => {
            let mut t = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let _ = write!(t, ": {c}");
                cause = c.source();
            }
            t
        }
    }
}

/// Whether the server refused a row for what it holds: a data exception
/// (class 22), a constraint (23), a limit (54), a trigger's exception.
fn row_fault(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        let code = d.code().code();
        code.starts_with("22")
            || code.starts_with("23")
            || code.starts_with("54")
            || code == "P0001"
    })
}

/// One PostgreSQL sink.
pub struct PgSink {
    target: Target,
    dead: DeadLetters,
    conn: Option<(Client, Plan)>,
}

impl std::fmt::Debug for PgSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSink")
            .field("name", &self.target.name)
            .field("table", &self.target.table)
            .finish_non_exhaustive()
    }
}

/// A sink's database and table.
struct Target {
    name: String,
    config: PostgresSink,
    table: String,
    offsets: String,
    fields: Vec<(String, Field)>,
    timeout: Duration,
}

/// A failure of one attempt: the connection is dropped and the batch tried
/// again.
struct Failed(String);

impl From<tokio_postgres::Error> for Failed {
    fn from(e: tokio_postgres::Error) -> Self {
        Failed(error_text(&e))
    }
}

impl Target {
    fn new(name: &str, config: &PostgresSink) -> Result<Target, String> {
        let table = quote_table(&config.table).map_err(|e| format!("`table`: {e}"))?;
        let offsets =
            quote_table(&config.offsets_table).map_err(|e| format!("`offsets_table`: {e}"))?;
        let fields = config
            .columns
            .iter()
            .map(|(c, f)| Ok((c.clone(), Field::parse(f)?)))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| format!("`columns`: {e}"))?;
        Ok(Target {
            name: name.to_owned(),
            config: config.clone(),
            table,
            offsets,
            fields,
            timeout: Duration::from_millis(config.timeout_ms),
        })
    }

    async fn connect(&self) -> Result<(Client, Plan), ConnectError> {
        let url =
            resolve(&self.config.url).map_err(|e| ConnectError::Invalid(format!("`url`: {e}")))?;
        let mut pg = parse_url(&url).map_err(|e| ConnectError::Invalid(format!("`url`: {e}")))?;
        if let Some(p) = &self.config.password {
            let password =
                resolve(p).map_err(|e| ConnectError::Invalid(format!("`password`: {e}")))?;
            pg.password(password);
        }
        pg.connect_timeout(self.timeout);
        if pg.get_application_name().is_none() {
            pg.application_name("tributary");
        }
        let unreachable = |e: tokio_postgres::Error| {
            // A refused login is the settings' fault, not the network's.
            match e.as_db_error().map(|d| d.code().code()) {
                Some(c) if c.starts_with("28") || c == "3D000" => {
                    ConnectError::Invalid(format!("`url`: {}", error_text(&e)))
                }
                _ => ConnectError::Unreachable(error_text(&e)),
            }
        };
        let name = self.name.clone();
        let client = if matches!(pg.get_ssl_mode(), SslMode::Require) {
            let tls = tributary_sync::tls_client_config(self.config.ca_file.as_deref(), None)
                .map_err(|e| ConnectError::Invalid(format!("`ca_file`: {e}")))?;
            let (client, conn) = pg
                .connect(MakeRustls(Arc::new(tls)))
                .await
                .map_err(unreachable)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(connector = %name, error = %e, "PostgreSQL connection closed");
                }
            });
            client
        } else {
            let (client, conn) = pg.connect(NoTls).await.map_err(unreachable)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(connector = %name, error = %e, "PostgreSQL connection closed");
                }
            });
            client
        };
        let plan = self.plan(&client).await?;
        Ok((client, plan))
    }

    /// Learns the table's columns and primary key, creates the positions
    /// table if missing and, for upserts, the staging table.
    async fn plan(&self, client: &Client) -> Result<Plan, ConnectError> {
        let failed = |e: tokio_postgres::Error| ConnectError::Unreachable(error_text(&e));
        let offsets = &self.offsets;
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {offsets} (connector text NOT NULL, topic text NOT NULL, \
             partition integer NOT NULL, next_offset bigint NOT NULL, \
             updated_at timestamptz NOT NULL DEFAULT now(), \
             PRIMARY KEY (connector, topic, partition))"
        );
        if let Err(e) = client.batch_execute(&create).await {
            // Two sinks creating it at once: one wins, the other sees a
            // duplicate; anything else is real.
            if e.as_db_error().is_none_or(|d| d.code().code() != "23505") {
                return Err(match e.as_db_error() {
                    Some(_) => {
                        ConnectError::Invalid(format!("`offsets_table`: {}", error_text(&e)))
                    }
                    None => failed(e),
                });
            }
        }
        let cols: Vec<String> = self.fields.iter().map(|(c, _)| quote(c)).collect();
        let cols = cols.join(", ");
        let table = &self.table;
        let described = client
            .prepare(&format!("SELECT {cols} FROM {table}"))
            .await
            .map_err(|e| match e.as_db_error().map(|d| d.code().code()) {
                Some("42P01" | "3F000") => {
                    ConnectError::Invalid(format!("`table`: {}", error_text(&e)))
                }
                Some("42703") => ConnectError::Invalid(format!("`columns`: {}", error_text(&e))),
                Some(_) => ConnectError::Invalid(format!("`table`: {}", error_text(&e))),
                None => failed(e),
            })?;
        let columns = self
            .fields
            .iter()
            .zip(described.columns())
            .map(|((_, field), c)| Column {
                field: field.clone(),
                ty: c.type_().clone(),
            })
            .collect();
        let (copy, upsert) = match self.config.mode {
            PgMode::Insert => (format!("COPY {table} ({cols}) FROM STDIN"), None),
            PgMode::Upsert => {
                let pk: Vec<String> = client
                    .query(
                        "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
                         ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                         WHERE i.indrelid = $1::text::regclass AND i.indisprimary \
                         ORDER BY array_position(i.indkey, a.attnum)",
                        &[&table],
                    )
                    .await
                    .map_err(failed)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if pk.is_empty() {
                    return Err(ConnectError::Invalid(format!(
                        "`mode`: upsert needs a primary key, and {table} has none"
                    )));
                }
                if let Some(missing) = pk.iter().find(|k| !self.config.columns.contains_key(*k)) {
                    return Err(ConnectError::Invalid(format!(
                        "`columns`: upsert needs the primary key column `{missing}` mapped"
                    )));
                }
                let keys = pk.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
                let updates: Vec<String> = self
                    .fields
                    .iter()
                    .filter(|(c, _)| !pk.contains(c))
                    .map(|(c, _)| format!("{0} = EXCLUDED.{0}", quote(c)))
                    .collect();
                let action = if updates.is_empty() {
                    "NOTHING".to_owned()
                } else {
                    format!("UPDATE SET {}", updates.join(", "))
                };
                client
                    .batch_execute(&format!(
                        "CREATE TEMP TABLE tributary_stage ON COMMIT DELETE ROWS AS \
                         SELECT {cols} FROM {table} WITH NO DATA; \
                         ALTER TABLE {STAGE} ADD COLUMN tributary_seq bigint"
                    ))
                    .await
                    .map_err(failed)?;
                (
                    format!("COPY {STAGE} ({cols}, tributary_seq) FROM STDIN"),
                    Some(format!(
                        "INSERT INTO {table} ({cols}) SELECT DISTINCT ON ({keys}) {cols} \
                         FROM {STAGE} ORDER BY {keys}, tributary_seq DESC \
                         ON CONFLICT ({keys}) DO {action}; DELETE FROM {STAGE}"
                    )),
                )
            }
        };
        let prepare = |sql: String| async move {
            client
                .prepare(&sql)
                .await
                .map(Some)
                .map_err(|e| match e.as_db_error() {
                    Some(_) => {
                        ConnectError::Invalid(format!("`offsets_table`: {}", error_text(&e)))
                    }
                    None => failed(e),
                })
        };
        Ok(Plan {
            columns,
            copy,
            upsert,
            read_position: prepare(format!(
                "SELECT next_offset FROM {offsets} \
                 WHERE connector = $1 AND topic = $2 AND partition = $3 FOR UPDATE"
            ))
            .await?,
            write_position: prepare(format!(
                "INSERT INTO {offsets} (connector, topic, partition, next_offset) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (connector, topic, partition) \
                 DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()"
            ))
            .await?,
            read_positions: prepare(format!(
                "SELECT topic, partition, next_offset FROM {offsets} WHERE connector = $1"
            ))
            .await?,
        })
    }
}

impl PgSink {
    /// The sink of connector `name` (it connects when it first delivers).
    pub fn new(name: &str, config: &PostgresSink, dead: DeadLetters) -> Result<PgSink, String> {
        Ok(PgSink {
            target: Target::new(name, config)?,
            dead,
            conn: None,
        })
    }

    /// Connects and checks the table, as the connector would start: for
    /// `POST /v1/connectors` and the config file's connectors at start.
    pub async fn check(name: &str, config: &PostgresSink) -> Result<(), ConnectError> {
        let target = Target::new(name, config).map_err(ConnectError::Invalid)?;
        let timeout = target.timeout;
        match tokio::time::timeout(timeout, target.connect()).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(ConnectError::Unreachable(format!(
                "no answer from the server within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// The open connection, connecting if there is none.
    async fn connected(&mut self) -> Result<&mut (Client, Plan), Failed> {
        if self.conn.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let opened = self
                .target
                .connect()
                .await
                .map_err(|e| Failed(e.to_string()))?;
            self.conn = Some(opened);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| Failed("not connected".into()))
    }

    /// One try at a batch (see the module's description).
    async fn attempt(
        &mut self,
        topic: &str,
        records: &[Record],
        next: u64,
    ) -> Result<Outcome, Failed> {
        let Some(first) = records.first() else {
            return Ok(Outcome::Delivered);
        };
        let partition = i32::try_from(first.partition)
            .map_err(|_| Failed("partition number out of range".into()))?;
        let next = i64::try_from(next).map_err(|_| Failed("offset out of range".into()))?;
        let name = self.target.name.clone();
        let dead = self.dead.clone();
        let (client, plan) = self.connected().await?;
        let mut tx = client.transaction().await?;
        let stored: Option<i64> = tx
            .query_opt(
                statement(&plan.read_position)?,
                &[&name, &topic, &partition],
            )
            .await?
            .map(|r| r.get(0));
        let from = stored.unwrap_or(0);
        if from >= next {
            // Written before (its commit's answer was lost, or the node
            // stopped before the group's commit).
            tx.commit().await?;
            return Ok(Outcome::Delivered);
        }
        // Every row into one buffer; each row's range kept for the
        // row-at-a-time path.
        let mut whole = Vec::with_capacity(
            records
                .iter()
                .map(|r| r.bytes().len() + r.key.as_ref().map_or(0, Vec::len) + 64)
                .sum(),
        );
        let mut rows = Vec::new();
        let mut refused: Vec<(&Record, String)> = Vec::new();
        for (seq, r) in records.iter().enumerate() {
            if i64::try_from(r.offset).is_ok_and(|o| o < from) {
                continue;
            }
            let start = whole.len();
            match render(plan, topic, r, &mut whole) {
                Ok(()) => {
                    if plan.upsert.is_some() {
                        let _ = write!(Text(&mut whole), "\t{seq}");
                    }
                    whole.push(b'\n');
                    rows.push((r, start..whole.len()));
                }
                Err(e) => {
                    whole.truncate(start);
                    refused.push((r, e));
                }
            }
        }
        let whole = Bytes::from(whole);
        match write(&tx, plan, whole.clone()).await {
            Ok(()) => {}
            Err(e) if row_fault(&e) => {
                // One row spoils the batch: again, a row at a time.
                tracing::debug!(connector = %name, topic, error = %error_text(&e), "a row was refused; writing the batch row by row");
                tx.rollback().await?;
                tx = client.transaction().await?;
                let again: Option<i64> = tx
                    .query_opt(
                        statement(&plan.read_position)?,
                        &[&name, &topic, &partition],
                    )
                    .await?
                    .map(|r| r.get(0));
                if again != stored {
                    return Err(Failed("the position moved during the batch".into()));
                }
                for (r, range) in rows {
                    let sp = tx.savepoint("tributary_row").await?;
                    match write(&sp, plan, whole.slice(range)).await {
                        Ok(()) => sp.commit().await?,
                        Err(e) if row_fault(&e) => {
                            sp.rollback().await?;
                            refused.push((r, error_text(&e)));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
        // Dead letters are durable before the rows commit: after a crash
        // here one may repeat; a row cannot.
        for (r, error) in &refused {
            dead.send(topic, std::slice::from_ref(*r), error)
                .await
                .map_err(|e| {
                    Failed(format!(
                        "cannot write the dead-letter topic {}: {e}",
                        dead.topic()
                    ))
                })?;
            tracing::warn!(connector = %name, topic, partition, offset = r.offset, error, "row refused by the table; dead-lettered");
        }
        tx.execute(
            statement(&plan.write_position)?,
            &[&name, &topic, &partition, &next],
        )
        .await?;
        tx.commit().await?;
        Ok(if refused.is_empty() {
            Outcome::Delivered
        } else {
            Outcome::DeliveredExcept {
                dead_lettered: refused.len() as u64,
            }
        })
    }
}

fn statement(s: &Option<Statement>) -> Result<&Statement, Failed> {
    s.as_ref()
        .ok_or_else(|| Failed("statement not prepared".into()))
}

/// Writes rows (COPY text format) into the table, or through the staging
/// table for upserts.
async fn write(
    tx: &Transaction<'_>,
    plan: &Plan,
    rows: Bytes,
) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let sink = tx.copy_in::<_, Bytes>(&plan.copy).await?;
    let mut sink = std::pin::pin!(sink);
    sink.send(rows).await?;
    sink.as_mut().finish().await?;
    if let Some(upsert) = &plan.upsert {
        tx.batch_execute(upsert).await?;
    }
    Ok(())
}

/// A PostgreSQL column type (for [`copy_row`]).
pub use tokio_postgres::types::Type as ColumnType;

/// `r` as one row of COPY's text format for columns of `columns` (what a
/// batch writes; also the fuzz target's way in).
pub fn copy_row(
    columns: &[(Field, ColumnType)],
    topic: &str,
    r: &Record,
) -> Result<Vec<u8>, String> {
    let plan = Plan {
        columns: columns
            .iter()
            .map(|(field, ty)| Column {
                field: field.clone(),
                ty: ty.clone(),
            })
            .collect(),
        copy: String::new(),
        upsert: None,
        read_position: None,
        write_position: None,
        read_positions: None,
    };
    let mut out = Vec::new();
    render(&plan, topic, r, &mut out)?;
    Ok(out)
}

/// `fmt::Write` into a byte buffer.
struct Text<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Text<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Appends `s` escaped for COPY's text format.
fn escaped(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut from = 0;
    for (i, b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..i]);
        out.extend_from_slice(escape);
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
}

/// Bytes as a column of type `ty`: hex for `bytea`, else UTF-8 text.
fn bytes_as(out: &mut Vec<u8>, ty: &Type, bytes: &[u8], what: &str) -> Result<(), String> {
    if *ty == Type::BYTEA {
        out.extend_from_slice(b"\\\\x");
        for b in bytes {
            let _ = write!(Text(out), "{b:02x}");
        }
        Ok(())
    } else {
        let s = std::str::from_utf8(bytes)
            .map_err(|_| format!("the {what} is not UTF-8 (map it to a bytea column)"))?;
        escaped(out, s);
        Ok(())
    }
}

/// A record as one row (without its line end), the columns in the plan's
/// order; an error says why the record cannot be a row.
fn render(plan: &Plan, topic: &str, r: &Record, out: &mut Vec<u8>) -> Result<(), String> {
    let needs_json = plan
        .columns
        .iter()
        .any(|c| matches!(c.field, Field::Path(_)));
    let json: Option<serde_json::Value> = match (&r.value, needs_json) {
        (Some(v), true) => {
            Some(serde_json::from_slice(v).map_err(|e| format!("the value is not JSON: {e}"))?)
        }
        _ => None,
    };
    for (i, c) in plan.columns.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match &c.field {
            Field::Key => match &r.key {
                Some(k) => bytes_as(out, &c.ty, k, "key")?,
                None => out.extend_from_slice(b"\\N"),
            },
            Field::Value => match &r.value {
                Some(v) => bytes_as(out, &c.ty, v, "value")?,
                None => out.extend_from_slice(b"\\N"),
            },
            Field::Ts => {
                if [Type::TIMESTAMPTZ, Type::TIMESTAMP, Type::DATE].contains(&c.ty) {
                    timestamp_text(r.timestamp, &mut Text(out));
                } else {
                    let _ = write!(Text(out), "{}", r.timestamp);
                }
            }
            Field::Topic => escaped(out, topic),
            Field::Partition => {
                let _ = write!(Text(out), "{}", r.partition);
            }
            Field::Offset => {
                let _ = write!(Text(out), "{}", r.offset);
            }
            Field::Path(path) => {
                let mut v = json.as_ref();
                for step in path {
                    v = v.and_then(|v| v.get(step));
                }
                match v {
                    None | Some(serde_json::Value::Null) => out.extend_from_slice(b"\\N"),
                    Some(serde_json::Value::String(s)) => escaped(out, s),
                    Some(other) => escaped(out, &other.to_string()),
                }
            }
        }
    }
    Ok(())
}

/// Milliseconds since the epoch as PostgreSQL's timestamp text, in UTC.
fn timestamp_text(ms: i64, out: &mut impl std::fmt::Write) {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}+00",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    );
}

impl Deliver for PgSink {
    async fn deliver(&mut self, topic: &str, records: &[Record], next: u64) -> Outcome {
        let timeout = self.target.timeout;
        let error = match tokio::time::timeout(timeout, self.attempt(topic, records, next)).await {
            Ok(Ok(outcome)) => return outcome,
            Ok(Err(Failed(e))) => e,
            Err(_) => format!("the batch took longer than {} ms", timeout.as_millis()),
        };
        // Whatever state the connection is in, the next try starts afresh
        // (and reads the position again).
        self.conn = None;
        Outcome::Unavailable(error)
    }

    fn keeps_positions(&self) -> bool {
        true
    }

    async fn positions(&mut self) -> Result<Vec<Position>, String> {
        let name = self.target.name.clone();
        let timeout = self.target.timeout;
        let read = async {
            let (client, plan) = self.connected().await?;
            let rows = client
                .query(statement(&plan.read_positions)?, &[&name])
                .await?;
            Ok::<_, Failed>(
                rows.iter()
                    .filter_map(|r| {
                        let topic: String = r.get(0);
                        let partition: i32 = r.get(1);
                        let next: i64 = r.get(2);
                        Some((
                            (topic, u32::try_from(partition).ok()?),
                            u64::try_from(next).ok()?,
                        ))
                    })
                    .collect(),
            )
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(Failed(e))) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err("no answer from PostgreSQL".into())
            }
        }
    }
}

/// TLS to the server with rustls (ring), verified against `ca_file` or the
/// system's roots.
#[derive(Clone)]
struct MakeRustls(Arc<rustls::ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, std::io::Error> {
        let name = rustls::pki_types::ServerName::try_from(domain.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.0.clone()),
            name,
        })
    }
}

struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

type Connecting<S> = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, std::io::Error>> + Send>>;

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = Connecting<S>;

    fn connect(self, stream: S) -> Connecting<S> {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS stream to the server.
struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timestamp(ms: i64) -> String {
        let mut s = String::new();
        timestamp_text(ms, &mut s);
        s
    }

    #[test]
    fn timestamps_render_as_utc_text() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00.000+00");
        assert_eq!(timestamp(1_795_000_000_123), "2026-11-18 11:06:40.123+00");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00.000+00");
        assert_eq!(timestamp(-1), "1969-12-31 23:59:59.999+00");
    }

    #[test]
    fn names_are_quoted_and_fields_parsed() {
        assert_eq!(quote_table("readings").expect("ok"), "\"readings\"");
        assert_eq!(quote_table("s.t\"x").expect("ok"), "\"s\".\"t\"\"x\"");
        assert!(quote_table("a.b.c").is_err());
        assert!(quote_table("a.").is_err());
        assert_eq!(Field::parse("_key").expect("ok"), Field::Key);
        assert_eq!(
            Field::parse("a.b").expect("ok"),
            Field::Path(vec!["a".into(), "b".into()])
        );
        assert!(Field::parse("a..b").is_err());
    }

    #[test]
    fn records_render_as_copy_rows_with_escapes_and_nulls() {
        let plan = Plan {
            columns: vec![
                Column {
                    field: Field::Key,
                    ty: Type::TEXT,
                },
                Column {
                    field: Field::Path(vec!["s".into()]),
                    ty: Type::TEXT,
                },
                Column {
                    field: Field::Path(vec!["n".into(), "x".into()]),
                    ty: Type::INT8,
                },
                Column {
                    field: Field::Path(vec!["missing".into()]),
                    ty: Type::TEXT,
                },
                Column {
                    field: Field::Value,
                    ty: Type::BYTEA,
                },
                Column {
                    field: Field::Ts,
                    ty: Type::INT8,
                },
                Column {
                    field: Field::Offset,
                    ty: Type::INT8,
                },
            ],
            copy: String::new(),
            upsert: None,
            read_position: None,
            write_position: None,
            read_positions: None,
        };
        let r = Record {
            partition: 0,
            offset: 7,
            key: Some(b"k1".to_vec()),
            value: Some(br#"{"s":"a\tb\\c\nd","n":{"x":5}}"#.to_vec()),
            timestamp: 42,
            headers: Vec::new(),
        };
        let mut row = Vec::new();
        render(&plan, "t", &r, &mut row).expect("renders");
        let want = format!(
            "k1\ta\\tb\\\\c\\nd\t5\t\\N\t\\\\x{}\t42\t7",
            r.value
                .as_ref()
                .expect("value")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        assert_eq!(String::from_utf8(row).expect("utf-8"), want);
        let bad = Record {
            value: Some(b"not json".to_vec()),
            ..r.clone()
        };
        let e = render(&plan, "t", &bad, &mut Vec::new()).expect_err("not JSON");
        assert!(e.contains("not JSON"), "{e}");
        let binary_key = Record {
            key: Some(vec![0xff, 0xfe]),
            ..r
        };
        let e = render(&plan, "t", &binary_key, &mut Vec::new()).expect_err("not UTF-8");
        assert!(e.contains("key"), "{e}");
    }
}
