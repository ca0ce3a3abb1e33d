//! A pipeline's SQL, parsed with `sqlparser` and compiled into a [`Plan`]:
//! `INSERT INTO out SELECT … FROM in [JOIN …] [WHERE …] [GROUP BY …
//! [window]] [HAVING …] [WITH (option = value, …)]`. Every error names its
//! place in the text (line and column) and is found before anything runs.

use sqlparser::ast::{
    self, AccessExpr, BinaryOperator, DataType, DateTimeField, FunctionArg, FunctionArgExpr,
    FunctionArguments, GroupByExpr, JoinConstraint, JoinOperator, SelectItem, SetExpr, Spanned,
    Statement, TableFactor, UnaryOperator,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use crate::agg::{AggFn, Aggregate};
use crate::expr::{BinOp, CastTo, Expr, Func, Meta, TimePart};
use crate::value::Value;

/// A refused statement: the message and where (1-based; 0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}{}", if *.line > 0 { format!(" (line {line}, column {column})") } else { String::new() })]
pub struct SqlError {
    pub message: String,
    pub line: u64,
    pub column: u64,
}

fn err<T>(message: impl Into<String>, at: &impl Spanned) -> Result<T, SqlError> {
    let s = at.span().start;
    Err(SqlError {
        message: message.into(),
        line: s.line,
        column: s.column,
    })
}

fn err_at<T>(message: impl Into<String>, span: sqlparser::tokenizer::Span) -> Result<T, SqlError> {
    Err(SqlError {
        message: message.into(),
        line: span.start.line,
        column: span.start.column,
    })
}

fn err_plain<T>(message: impl Into<String>) -> Result<T, SqlError> {
    Err(SqlError {
        message: message.into(),
        line: 0,
        column: 0,
    })
}

/// A grouping window.
#[derive(Debug, Clone)]
pub enum Window {
    /// `TUMBLE(time, size)`: fixed, back to back.
    Tumble { time: Expr, size: i64 },
    /// `HOP(time, slide, size)`: fixed size, a new one every `slide`.
    Hop { time: Expr, slide: i64, size: i64 },
    /// `SESSION(time, gap)`: per group, closed after `gap` without events.
    Session { time: Expr, gap: i64 },
    /// `COUNT_WINDOW(n)`: per group, every `n` events.
    Count { n: u64 },
}

impl Window {
    /// The event-time expression (none for count windows).
    pub fn time(&self) -> Option<&Expr> {
        match self {
            Window::Tumble { time, .. }
            | Window::Hop { time, .. }
            | Window::Session { time, .. } => Some(time),
            Window::Count { .. } => None,
        }
    }
}

/// An aggregate query's grouping.
#[derive(Debug, Clone)]
pub struct Grouping {
    /// The GROUP BY expressions other than the window.
    pub keys: Vec<Expr>,
    pub window: Option<Window>,
    pub aggs: Vec<Aggregate>,
    pub having: Option<Expr>,
}

/// What the SELECT list produces.
#[derive(Debug, Clone)]
pub enum Column {
    /// `*`: every field of the input's JSON object.
    Wildcard,
    /// One named value.
    Named(String, Expr),
}

/// A join's other side.
#[derive(Debug, Clone)]
pub struct Join {
    /// The joined topic (input 1).
    pub topic: String,
    pub kind: JoinKind,
    /// The stream's join key (evaluated on input 0).
    pub left_key: Expr,
    /// The other side's join key (evaluated on input 1).
    pub right_key: Expr,
    /// Other conditions of `ON`, evaluated on the joined row.
    pub residual: Option<Expr>,
    /// LEFT JOIN: a stream row without a match is kept, the other side NULL.
    pub left_outer: bool,
}

/// How a join's other side is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// The latest value per key of the topic (the right key is `t._key`).
    Table,
    /// Another stream: rows whose `other._ts - stream._ts` is within
    /// `[lower, upper]` ms.
    Interval { lower: i64, upper: i64 },
}

/// Where a pipeline without a checkpoint starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Earliest,
    Latest,
}

/// `WITH (…)` options.
#[derive(Debug, Clone)]
pub struct Options {
    /// How far behind the newest event time an event may arrive (ms).
    pub lateness: i64,
    /// Late events are written here (else only counted).
    pub late_topic: Option<String>,
    /// Rows whose expressions fail are written here (else only counted).
    pub dead_letter_topic: Option<String>,
    /// Open groups (windows × keys, join buffers, table keys) at most.
    pub max_groups: usize,
    /// State bytes at most (measured at each checkpoint).
    pub max_state_bytes: usize,
    /// Least time between checkpoints (ms): output is written at
    /// checkpoints, so this is also how late it may appear.
    pub commit_interval: u64,
    /// Records read per checkpoint at most.
    pub max_batch: usize,
    pub start: Start,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            lateness: 0,
            late_topic: None,
            dead_letter_topic: None,
            max_groups: 100_000,
            max_state_bytes: 64 << 20,
            commit_interval: 100,
            max_batch: 100_000,
            start: Start::Earliest,
        }
    }
}

/// A compiled pipeline.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The statement's text.
    pub sql: String,
    /// The topic it writes.
    pub output: String,
    /// The stream it reads (input 0).
    pub input: String,
    pub join: Option<Join>,
    pub filter: Option<Expr>,
    pub columns: Vec<Column>,
    /// Set for aggregate queries.
    pub grouping: Option<Grouping>,
    pub options: Options,
    /// Whether each input's value must be parsed as JSON.
    pub reads_value: [bool; 2],
}

impl Plan {
    /// Every topic the pipeline reads: the stream, then a join's.
    pub fn inputs(&self) -> Vec<String> {
        let mut v = vec![self.input.clone()];
        if let Some(j) = &self.join {
            v.push(j.topic.clone());
        }
        v
    }

    /// Every topic the pipeline writes: the output, then the late and
    /// dead-letter topics when set.
    pub fn outputs(&self) -> Vec<String> {
        let mut v = vec![self.output.clone()];
        v.extend(self.options.late_topic.iter().cloned());
        v.extend(self.options.dead_letter_topic.iter().cloned());
        v.dedup();
        v
    }
}

/// Topic names: `[A-Za-z0-9._-]{1,249}`.
fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses and compiles a pipeline's statement.
pub fn compile(sql: &str) -> Result<Plan, SqlError> {
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| SqlError {
            message: e.message.clone(),
            line: e.location.line,
            column: e.location.column,
        })?;
    let (statement, options) = split_options(tokens);
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(statement);
    let stmt = parser.parse_statement().map_err(|e| parse_error(e, sql))?;
    while parser.consume_token(&Token::SemiColon) {}
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return err_at(
            format!("unexpected `{}` after the statement", next.token),
            next.span,
        );
    }
    let options = parse_options(&options)?;
    let Statement::Insert(insert) = &stmt else {
        return err("a pipeline is one INSERT INTO … SELECT statement", &stmt);
    };
    let output = match &insert.table {
        ast::TableObject::TableName(name) => name.to_string(),
        other => return err("INSERT INTO names a topic", other),
    };
    if !insert.columns.is_empty() {
        return err(
            "INSERT INTO takes no column list: the SELECT's names are the fields",
            &insert.columns[0],
        );
    }
    let Some(query) = &insert.source else {
        return err("INSERT INTO needs a SELECT", &stmt);
    };
    if query.with.is_some() || query.order_by.is_some() || query.limit_clause.is_some() {
        return err(
            "WITH, ORDER BY and LIMIT do not apply to a continuous query",
            &**query,
        );
    }
    let SetExpr::Select(select) = &*query.body else {
        return err("the source must be one SELECT", &*query.body);
    };
    compile_select(sql, output, select, options)
}

fn parse_error(e: sqlparser::parser::ParserError, sql: &str) -> SqlError {
    let text = e.to_string();
    let text = text.strip_prefix("sql parser error: ").unwrap_or(&text);
    // sqlparser ends its messages with " at Line: L, Column: C".
    if let Some(i) = text.rfind(" at Line: ") {
        let (msg, at) = text.split_at(i);
        let nums: Vec<u64> = at
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect();
        if let [line, column] = nums[..] {
            return SqlError {
                message: msg.to_owned(),
                line,
                column,
            };
        }
    }
    // No place given: the statement ended too early, so its end.
    let line = sql.lines().count().max(1) as u64;
    let column = sql.lines().last().map_or(0, |l| l.chars().count()) as u64 + 1;
    SqlError {
        message: text.to_owned(),
        line,
        column,
    }
}

/// Splits a trailing `WITH ( … )` (and `;`) off the statement's tokens.
fn split_options(tokens: Vec<TokenWithSpan>) -> (Vec<TokenWithSpan>, Vec<TokenWithSpan>) {
    let significant: Vec<usize> = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| !matches!(t.token, Token::Whitespace(_) | Token::SemiColon))
        .map(|(i, _)| i)
        .collect();
    let Some(&last) = significant.last() else {
        return (tokens, Vec::new());
    };
    if tokens[last].token != Token::RParen {
        return (tokens, Vec::new());
    }
    // Back to the matching `(`.
    let mut depth = 0i32;
    for (n, &i) in significant.iter().enumerate().rev() {
        match tokens[i].token {
            Token::RParen => depth += 1,
            Token::LParen => {
                depth -= 1;
                if depth == 0 {
                    let Some(&before) = n.checked_sub(1).and_then(|p| significant.get(p)) else {
                        break;
                    };
                    if let Token::Word(w) = &tokens[before].token {
                        if w.keyword == Keyword::WITH {
                            let mut statement = tokens;
                            let options = statement.split_off(before);
                            return (statement, options);
                        }
                    }
                    break;
                }
            }
            _ => {}
        }
    }
    (tokens, Vec::new())
}

fn parse_options(tokens: &[TokenWithSpan]) -> Result<Options, SqlError> {
    let mut o = Options::default();
    let toks: Vec<&TokenWithSpan> = tokens
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_) | Token::SemiColon))
        .collect();
    if toks.is_empty() {
        return Ok(o);
    }
    // WITH ( name = value [, …] )
    let inner = &toks[2..toks.len().saturating_sub(1).max(2)];
    for item in inner.split(|t| t.token == Token::Comma) {
        let [name, eq, value] = item else {
            let at = item.first().map_or(toks[0], |t| *t);
            return err_at("options are `name = value`, separated by commas", at.span);
        };
        let (Token::Word(name_word), Token::Eq) = (&name.token, &eq.token) else {
            return err_at("options are `name = value`, separated by commas", name.span);
        };
        let text = match &value.token {
            Token::SingleQuotedString(s) => s.clone(),
            Token::Number(n, _) => n.clone(),
            Token::Word(w) => w.value.clone(),
            _ => return err_at("an option's value is a number or a 'string'", value.span),
        };
        let bad = |what: &str| err_at(format!("option `{}`: {what}", name_word.value), value.span);
        let number = |text: &str| text.parse::<u64>().ok().filter(|n| *n > 0);
        match name_word.value.to_ascii_lowercase().as_str() {
            "lateness" => match duration_ms(&text) {
                Some(ms) => o.lateness = ms,
                None => return bad("a duration such as '2s', '500ms' or '1m'"),
            },
            "late_topic" if valid_topic(&text) => o.late_topic = Some(text),
            "dead_letter_topic" if valid_topic(&text) => o.dead_letter_topic = Some(text),
            "late_topic" | "dead_letter_topic" => return bad("not a valid topic name"),
            "max_groups" => match number(&text) {
                Some(n) => o.max_groups = usize::try_from(n).unwrap_or(usize::MAX),
                None => return bad("a positive whole number"),
            },
            "max_state_bytes" => match number(&text) {
                Some(n) => o.max_state_bytes = usize::try_from(n).unwrap_or(usize::MAX),
                None => return bad("a positive whole number"),
            },
            "max_batch" => match number(&text) {
                Some(n) if n <= 1_000_000 => o.max_batch = n as usize,
                _ => return bad("a whole number from 1 to 1000000"),
            },
            "commit_interval" => match duration_ms(&text) {
                Some(ms) if ms > 0 => o.commit_interval = ms.unsigned_abs(),
                _ => return bad("a duration such as '100ms' or '1s'"),
            },
            "start" => match text.to_ascii_lowercase().as_str() {
                "earliest" => o.start = Start::Earliest,
                "latest" => o.start = Start::Latest,
                _ => return bad("'earliest' or 'latest'"),
            },
            other => {
                return err_at(
                    format!(
                        "unknown option `{other}` (lateness, late_topic, dead_letter_topic, \
                         max_groups, max_state_bytes, max_batch, commit_interval, start)"
                    ),
                    name.span,
                )
            }
        }
    }
    Ok(o)
}

/// `'2s'`, `'500ms'`, `'1m'`, `'1h'`, `'10 seconds'`, or a number of ms.
pub fn duration_ms(text: &str) -> Option<i64> {
    let t = text.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().ok()?;
    let unit_ms = match unit.trim() {
        "" | "ms" | "millisecond" | "milliseconds" => 1.0,
        "s" | "sec" | "second" | "seconds" => 1000.0,
        "m" | "min" | "minute" | "minutes" => 60_000.0,
        "h" | "hour" | "hours" => 3_600_000.0,
        "d" | "day" | "days" => 86_400_000.0,
        _ => return None,
    };
    let ms = n * unit_ms;
    (ms.is_finite() && (0.0..9.0e15).contains(&ms)).then_some(ms.round() as i64)
}

/// A source of the FROM clause: its topic and the names it answers to.
struct Source {
    topic: String,
    names: Vec<String>,
}

fn table_source(f: &TableFactor) -> Result<Source, SqlError> {
    let TableFactor::Table { name, alias, .. } = f else {
        return err("FROM names a topic", f);
    };
    let topic = name.to_string();
    if !valid_topic(&topic) {
        return err(format!("`{topic}` is not a valid topic name"), f);
    }
    let mut names = vec![topic.clone()];
    if let Some(a) = alias {
        names.push(a.name.value.clone());
    }
    Ok(Source { topic, names })
}

/// What identifiers resolve against.
struct Scope<'a> {
    sources: Vec<Source>,
    /// GROUP BY keys by their text, for the output of aggregate queries.
    group_texts: Vec<String>,
    windowed: bool,
    grouping: Option<&'a mut Vec<Aggregate>>,
    /// Set by [`Mode::Probe`] when it meets an aggregate.
    saw_aggregate: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Over an input row: WHERE, GROUP BY keys, a stateless SELECT.
    Row,
    /// Over a group: an aggregate query's SELECT and HAVING.
    Output,
    /// Like `Row`, only to find whether the SELECT list has aggregates.
    Probe,
}

fn compile_select(
    sql: &str,
    output: String,
    select: &ast::Select,
    options: Options,
) -> Result<Plan, SqlError> {
    if select.distinct.is_some() {
        return err("DISTINCT is not supported", select);
    }
    if select.projection.is_empty() {
        return err("SELECT lists no columns", select);
    }
    let [from] = select.from.as_slice() else {
        return err("FROM names one topic (and at most one JOIN)", select);
    };
    let stream = table_source(&from.relation)?;
    if !valid_topic(&output) {
        return err(format!("`{output}` is not a valid topic name"), select);
    }
    let input = stream.topic.clone();
    let mut scope = Scope {
        sources: vec![stream],
        group_texts: Vec::new(),
        windowed: false,
        grouping: None,
        saw_aggregate: false,
    };
    let join = match from.joins.as_slice() {
        [] => None,
        [j] => Some(compile_join(j, &mut scope)?),
        [_, j, ..] => return err("at most one JOIN", j),
    };
    if scope.sources.iter().any(|s| s.topic == output)
        || options.late_topic.as_deref() == Some(&output)
        || options.dead_letter_topic.as_deref() == Some(&output)
    {
        return err_plain(format!(
            "the output topic `{output}` is also read or used for late rows or dead letters"
        ));
    }
    let filter = select
        .selection
        .as_ref()
        .map(|e| compile_expr(e, &mut scope, Mode::Row))
        .transpose()?;

    // GROUP BY: keys and at most one window.
    let group_exprs: &[ast::Expr] = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) => {
            if let Some(m) = modifiers.first() {
                return err_plain(format!("GROUP BY … {m} is not supported"));
            }
            exprs
        }
        GroupByExpr::All(_) => return err("GROUP BY ALL is not supported", select),
    };
    let mut keys = Vec::new();
    let mut window = None;
    for g in group_exprs {
        if let Some(w) = compile_window(g, &mut scope)? {
            if window.is_some() {
                return err("one window per query", g);
            }
            window = Some(w);
        } else {
            keys.push(compile_expr(g, &mut scope, Mode::Row)?);
            scope.group_texts.push(g.to_string());
        }
    }
    // Placeholders for the window in the group texts are not needed: the
    // window's bounds are `window_start` / `window_end`.
    scope.windowed = window.is_some();
    let mut aggs = Vec::new();
    // A first pass over the SELECT list finds aggregates.
    for p in &select.projection {
        if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = p {
            compile_expr(e, &mut scope, Mode::Probe)?;
        }
    }
    let aggregate = !group_exprs.is_empty() || select.having.is_some() || scope.saw_aggregate;
    let mode = if aggregate { Mode::Output } else { Mode::Row };
    if aggregate && join.as_ref().is_some_and(|j| j.kind != JoinKind::Table) {
        return err_plain("a stream–stream join cannot be aggregated in the same query: write the joined rows to a topic and aggregate that");
    }
    scope.grouping = if aggregate { Some(&mut aggs) } else { None };
    let mut columns = Vec::new();
    for p in &select.projection {
        match p {
            SelectItem::Wildcard(_) if !aggregate => columns.push(Column::Wildcard),
            SelectItem::Wildcard(_) => return err("SELECT * in an aggregate query", select),
            SelectItem::UnnamedExpr(e) => columns.push(Column::Named(
                column_name(e),
                compile_expr(e, &mut scope, mode)?,
            )),
            SelectItem::ExprWithAlias { expr, alias } => columns.push(Column::Named(
                alias.value.clone(),
                compile_expr(expr, &mut scope, mode)?,
            )),
            SelectItem::QualifiedWildcard(..) => return err("SELECT t.* is not supported", select),
            SelectItem::ExprWithAliases { .. } => return err("one alias per column", select),
        }
    }
    let having = select
        .having
        .as_ref()
        .map(|h| compile_expr(h, &mut scope, Mode::Output))
        .transpose()?;
    let names: Vec<&str> = columns
        .iter()
        .filter_map(|c| match c {
            Column::Named(n, _) => Some(n.as_str()),
            Column::Wildcard => None,
        })
        .collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return err_plain(format!(
                "two output columns are named `{n}`: give one an alias"
            ));
        }
    }
    let grouping = aggregate.then_some(Grouping {
        keys,
        window,
        aggs,
        having,
    });
    let mut reads_value = [false, false];
    let mut mark = |e: &Expr| {
        e.visit(&mut |x| match x {
            Expr::Field { src, .. }
            | Expr::Meta {
                src,
                col: Meta::Value,
            } => reads_value[(*src).min(1)] = true,
            _ => {}
        })
    };
    filter.iter().for_each(&mut mark);
    for c in &columns {
        match c {
            Column::Named(_, e) => mark(e),
            Column::Wildcard => mark(&Expr::Meta {
                src: 0,
                col: Meta::Value,
            }),
        }
    }
    if let Some(g) = &grouping {
        g.keys.iter().for_each(&mut mark);
        g.aggs
            .iter()
            .filter_map(|a| a.arg.as_ref())
            .for_each(&mut mark);
        if let Some(t) = g.window.as_ref().and_then(Window::time) {
            mark(t);
        }
    }
    if let Some(j) = &join {
        mark(&j.left_key);
        mark(&j.right_key);
        j.residual.iter().for_each(&mut mark);
        if j.kind == JoinKind::Table {
            // The table keeps values to join them later.
            reads_value[1] = true;
        }
    }
    Ok(Plan {
        sql: sql.to_owned(),
        output,
        input,
        join,
        filter,
        columns,
        grouping,
        options,
        reads_value,
    })
}

/// An output column's default name: a field's name, else the expression's text.
fn column_name(e: &ast::Expr) -> String {
    match e {
        ast::Expr::Identifier(i) => i.value.clone(),
        ast::Expr::CompoundIdentifier(parts) => parts
            .last()
            .map_or_else(|| e.to_string(), |i| i.value.clone()),
        other => other.to_string(),
    }
}

fn function_name(f: &ast::Function) -> String {
    f.name.to_string().to_ascii_uppercase()
}

fn function_args(f: &ast::Function) -> Result<Vec<&FunctionArgExpr>, SqlError> {
    match &f.args {
        FunctionArguments::None => Ok(Vec::new()),
        FunctionArguments::List(list) => {
            if list.duplicate_treatment.is_some() {
                return err(
                    format!("{}(DISTINCT …) is not supported", function_name(f)),
                    f,
                );
            }
            list.args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(x) => Ok(x),
                    other => err("named function arguments are not supported", other),
                })
                .collect()
        }
        FunctionArguments::Subquery(_) => err("subqueries are not supported", f),
    }
}

fn arg_expr<'a>(a: &'a FunctionArgExpr, f: &ast::Function) -> Result<&'a ast::Expr, SqlError> {
    match a {
        FunctionArgExpr::Expr(e) => Ok(e),
        _ => err(format!("{} takes expressions", function_name(f)), f),
    }
}

/// A window function of GROUP BY, or `None` for a plain key.
fn compile_window(g: &ast::Expr, scope: &mut Scope) -> Result<Option<Window>, SqlError> {
    let ast::Expr::Function(f) = g else {
        return Ok(None);
    };
    let name = function_name(f);
    if !matches!(name.as_str(), "TUMBLE" | "HOP" | "SESSION" | "COUNT_WINDOW") {
        return Ok(None);
    }
    let args = function_args(f)?;
    let args: Vec<&ast::Expr> = args
        .into_iter()
        .map(|a| arg_expr(a, f))
        .collect::<Result<_, _>>()?;
    let duration = |e: &ast::Expr| -> Result<i64, SqlError> {
        match interval_ms(e) {
            Some(ms) if ms > 0 => Ok(ms),
            _ => err(
                "a window's size is a positive INTERVAL such as INTERVAL '10' SECOND",
                e,
            ),
        }
    };
    let w = match (name.as_str(), args.as_slice()) {
        ("TUMBLE", [t, size]) => Window::Tumble {
            time: compile_expr(t, scope, Mode::Row)?,
            size: duration(size)?,
        },
        ("HOP", [t, slide, size]) => {
            let (slide, size) = (duration(slide)?, duration(size)?);
            if size % slide != 0 {
                return err("HOP's size is a whole multiple of its slide", f);
            }
            if size / slide > 1000 {
                return err("HOP puts an event in at most 1000 windows", f);
            }
            Window::Hop {
                time: compile_expr(t, scope, Mode::Row)?,
                slide,
                size,
            }
        }
        ("SESSION", [t, gap]) => Window::Session {
            time: compile_expr(t, scope, Mode::Row)?,
            gap: duration(gap)?,
        },
        ("COUNT_WINDOW", [n]) => match literal(n) {
            Some(Value::Int(n)) if n > 0 => Window::Count {
                n: n.unsigned_abs(),
            },
            _ => return err("COUNT_WINDOW(n) takes a positive whole number", f),
        },
        _ => {
            return err(
                format!(
                    "{name} takes {}",
                    match name.as_str() {
                        "TUMBLE" => "(time, size)",
                        "HOP" => "(time, slide, size)",
                        "SESSION" => "(time, gap)",
                        _ => "(n)",
                    }
                ),
                f,
            )
        }
    };
    Ok(Some(w))
}

/// An INTERVAL (or a number of ms, or a duration string) in ms.
fn interval_ms(e: &ast::Expr) -> Option<i64> {
    match e {
        ast::Expr::Interval(i) => {
            let text = match literal(&i.value)? {
                Value::Str(s) => s.to_string(),
                Value::Int(n) => n.to_string(),
                Value::Float(f) => f.to_string(),
                _ => return None,
            };
            let unit = match &i.leading_field {
                None => return duration_ms(&text),
                Some(f) => match f {
                    DateTimeField::Millisecond | DateTimeField::Milliseconds => "ms",
                    DateTimeField::Second | DateTimeField::Seconds => "s",
                    DateTimeField::Minute | DateTimeField::Minutes => "m",
                    DateTimeField::Hour | DateTimeField::Hours => "h",
                    DateTimeField::Day | DateTimeField::Days => "d",
                    _ => return None,
                },
            };
            duration_ms(&format!("{text}{unit}"))
        }
        other => match literal(other)? {
            Value::Int(n) => Some(n),
            Value::Str(s) => duration_ms(&s),
            _ => None,
        },
    }
}

fn literal(e: &ast::Expr) -> Option<Value> {
    match e {
        ast::Expr::Value(v) => sql_value(&v.value).ok(),
        ast::Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match literal(expr)? {
            Value::Int(i) => Some(Value::Int(-i)),
            Value::Float(f) => Some(Value::Float(-f)),
            _ => None,
        },
        ast::Expr::Nested(e) => literal(e),
        _ => None,
    }
}

fn sql_value(v: &ast::Value) -> Result<Value, String> {
    Ok(match v {
        ast::Value::Number(n, _) => match n.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Float(n.parse::<f64>().map_err(|e| format!("{n}: {e}"))?),
        },
        ast::Value::SingleQuotedString(s) => Value::str(s),
        ast::Value::Boolean(b) => Value::Bool(*b),
        ast::Value::Null => Value::Null,
        other => return Err(format!("the literal {other} is not supported")),
    })
}

fn compile_join(j: &ast::Join, scope: &mut Scope) -> Result<Join, SqlError> {
    let (constraint, left_outer) = match &j.join_operator {
        JoinOperator::Join(c) | JoinOperator::Inner(c) => (c, false),
        JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (c, true),
        _ => return err("JOIN and LEFT JOIN are supported", &j.relation),
    };
    let other = table_source(&j.relation)?;
    if scope.sources[0]
        .names
        .iter()
        .any(|n| other.names.contains(n))
    {
        return err(
            "join two different topics (or name them apart with aliases)",
            &j.relation,
        );
    }
    let topic = other.topic.clone();
    scope.sources.push(other);
    let JoinConstraint::On(on) = constraint else {
        return err("a join needs ON", &j.relation);
    };
    let mut conjuncts = Vec::new();
    split_and(on, &mut conjuncts);
    let mut keys: Option<(Expr, Expr)> = None;
    let mut bounds: Option<(i64, i64)> = None;
    let mut residual: Vec<Expr> = Vec::new();
    for c in conjuncts {
        if keys.is_none() {
            if let ast::Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } = c
            {
                let l = compile_expr(left, scope, Mode::Row)?;
                let r = compile_expr(right, scope, Mode::Row)?;
                match (sides(&l), sides(&r)) {
                    ((true, false), (false, true)) => {
                        keys = Some((l, r));
                        continue;
                    }
                    ((false, true), (true, false)) => {
                        keys = Some((r, l));
                        continue;
                    }
                    _ => {}
                }
            }
        }
        if let Some(b) = time_bounds(c, scope)? {
            if bounds.is_some() {
                return err("one time bound per join", c);
            }
            bounds = Some(b);
            continue;
        }
        residual.push(compile_expr(c, scope, Mode::Row)?);
    }
    let Some((left_key, right_key)) = keys else {
        return err(
            "a join's ON needs an equality between the two sides (s._key = t._key)",
            on,
        );
    };
    let kind = match bounds {
        Some((lower, upper)) => JoinKind::Interval { lower, upper },
        None => {
            if !matches!(
                right_key,
                Expr::Meta {
                    src: 1,
                    col: Meta::Key
                }
            ) {
                return err(
                    "a stream–table join matches the table's key: ON … = t._key (or bound the \
                     time for a stream–stream join: AND t._ts BETWEEN s._ts - INTERVAL … AND s._ts + INTERVAL …)",
                    on,
                );
            }
            JoinKind::Table
        }
    };
    if left_outer && matches!(kind, JoinKind::Interval { .. }) {
        return err("a stream–stream join is an inner join", &j.relation);
    }
    let residual = residual
        .into_iter()
        .reduce(|a, b| Expr::Bin(BinOp::And, Box::new(a), Box::new(b)));
    Ok(Join {
        topic,
        kind,
        left_key,
        right_key,
        residual,
        left_outer,
    })
}

fn split_and<'a>(e: &'a ast::Expr, out: &mut Vec<&'a ast::Expr>) {
    match e {
        ast::Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            split_and(left, out);
            split_and(right, out);
        }
        ast::Expr::Nested(inner) => split_and(inner, out),
        other => out.push(other),
    }
}

/// Which inputs an expression reads: (stream, other side).
fn sides(e: &Expr) -> (bool, bool) {
    let (mut a, mut b) = (false, false);
    e.visit(&mut |x| match x {
        Expr::Field { src, .. } | Expr::Meta { src, .. } | Expr::Header { src, .. } => {
            if *src == 0 {
                a = true
            } else {
                b = true
            }
        }
        _ => {}
    });
    (a, b)
}

/// `t._ts BETWEEN s._ts - INTERVAL x AND s._ts + INTERVAL y` → (−x, y).
fn time_bounds(e: &ast::Expr, scope: &mut Scope) -> Result<Option<(i64, i64)>, SqlError> {
    let ast::Expr::Between {
        expr,
        negated: false,
        low,
        high,
    } = e
    else {
        return Ok(None);
    };
    let is_ts =
        |x: &Expr, src: usize| matches!(x, Expr::Meta { src: s, col: Meta::Ts } if *s == src);
    let subject = compile_expr(expr, scope, Mode::Row)?;
    if !is_ts(&subject, 1) {
        return Ok(None);
    }
    let offset = |x: &ast::Expr, scope: &mut Scope| -> Result<Option<i64>, SqlError> {
        match x {
            ast::Expr::BinaryOp { left, op, right } => {
                let base = compile_expr(left, scope, Mode::Row)?;
                let Some(ms) = interval_ms(right) else {
                    return Ok(None);
                };
                Ok(match op {
                    BinaryOperator::Plus if is_ts(&base, 0) => Some(ms),
                    BinaryOperator::Minus if is_ts(&base, 0) => Some(-ms),
                    _ => None,
                })
            }
            other => Ok(is_ts(&compile_expr(other, scope, Mode::Row)?, 0).then_some(0)),
        }
    };
    match (offset(low, scope)?, offset(high, scope)?) {
        (Some(lo), Some(hi)) if lo <= hi => Ok(Some((lo, hi))),
        (Some(_), Some(_)) => err("the time bound's lower end is above its upper end", e),
        _ => err(
            "a join's time bound reads t._ts BETWEEN s._ts - INTERVAL … AND s._ts + INTERVAL …",
            e,
        ),
    }
}

fn meta_column(name: &str) -> Option<Meta> {
    Some(match name {
        "_key" => Meta::Key,
        "_ts" => Meta::Ts,
        "_topic" => Meta::Topic,
        "_partition" => Meta::Partition,
        "_offset" => Meta::Offset,
        "_value" => Meta::Value,
        _ => return None,
    })
}

/// A column reference: `x`, `a.b`, `t.x`, `t._key`.
fn column(parts: &[&ast::Ident], scope: &Scope, at: &ast::Expr) -> Result<Expr, SqlError> {
    let (src, rest) = match parts {
        [first, rest @ ..] if !rest.is_empty() => {
            match scope
                .sources
                .iter()
                .position(|s| s.names.contains(&first.value))
            {
                Some(src) => (src, rest),
                None => (0, parts),
            }
        }
        _ => (0, parts),
    };
    if scope.sources.len() > 1 && std::ptr::eq(rest.as_ptr(), parts.as_ptr()) {
        return err(
            format!(
                "`{}`: name its side in a join ({}.… or {}.…)",
                at,
                scope.sources[0].names.last().map_or("", |s| s.as_str()),
                scope.sources[1].names.last().map_or("", |s| s.as_str())
            ),
            at,
        );
    }
    if let [one] = rest {
        if one.quote_style.is_none() {
            if let Some(col) = meta_column(&one.value) {
                return Ok(Expr::Meta { src, col });
            }
        }
    }
    Ok(Expr::Field {
        src,
        path: rest.iter().map(|i| i.value.as_str().into()).collect(),
    })
}

fn compile_expr(e: &ast::Expr, scope: &mut Scope, mode: Mode) -> Result<Expr, SqlError> {
    use ast::Expr as E;
    if mode == Mode::Output {
        let text = e.to_string();
        if let Some(i) = scope.group_texts.iter().position(|g| *g == text) {
            return Ok(Expr::Group(i));
        }
    }
    let sub = |x: &ast::Expr, scope: &mut Scope| compile_expr(x, scope, mode).map(Box::new);
    Ok(match e {
        E::Identifier(i)
            if i.quote_style.is_none()
                && matches!(
                    i.value.to_ascii_lowercase().as_str(),
                    "window_start" | "window_end"
                ) =>
        {
            if mode == Mode::Probe {
                return Ok(Expr::Lit(Value::Null));
            }
            if mode != Mode::Output || !scope.windowed {
                return err(
                    format!("`{}` exists in windowed aggregate queries", i.value),
                    e,
                );
            }
            if i.value.eq_ignore_ascii_case("window_start") {
                Expr::WindowStart
            } else {
                Expr::WindowEnd
            }
        }
        E::Identifier(i) => {
            if mode == Mode::Output {
                return err(
                    format!(
                        "`{}` is neither in GROUP BY nor inside an aggregate",
                        i.value
                    ),
                    e,
                );
            }
            column(&[i], scope, e)?
        }
        E::CompoundIdentifier(parts) => {
            if mode == Mode::Output {
                return err(
                    format!("`{e}` is neither in GROUP BY nor inside an aggregate"),
                    e,
                );
            }
            column(&parts.iter().collect::<Vec<_>>(), scope, e)?
        }
        E::CompoundFieldAccess { root, access_chain } => {
            if mode == Mode::Output {
                return err(
                    format!("`{e}` is neither in GROUP BY nor inside an aggregate"),
                    e,
                );
            }
            // `_headers['name']` / `t._headers['name']`.
            let headers_of = match &**root {
                E::Identifier(i) if i.value == "_headers" => Some(0),
                E::CompoundIdentifier(p) if p.len() == 2 && p[1].value == "_headers" => scope
                    .sources
                    .iter()
                    .position(|s| s.names.contains(&p[0].value)),
                _ => None,
            };
            let mut chain = access_chain.iter();
            let mut out = match headers_of {
                Some(src) => match chain.next() {
                    Some(AccessExpr::Subscript(ast::Subscript::Index { index })) => {
                        match literal(index) {
                            Some(Value::Str(name)) => Expr::Header {
                                src,
                                name: name.to_string(),
                            },
                            _ => return err("_headers['name'] takes a string", e),
                        }
                    }
                    _ => return err("_headers['name'] takes a string", e),
                },
                None => *sub(root, scope)?,
            };
            for a in chain {
                out = match a {
                    AccessExpr::Subscript(ast::Subscript::Index { index }) => {
                        Expr::Index(Box::new(out), sub(index, scope)?)
                    }
                    AccessExpr::Dot(ast::Expr::Identifier(i)) => {
                        Expr::Index(Box::new(out), Box::new(Expr::Lit(Value::str(&i.value))))
                    }
                    _ => return err("slices and this field access are not supported", e),
                };
            }
            out
        }
        E::Value(v) => match sql_value(&v.value) {
            Ok(v) => Expr::Lit(v),
            Err(m) => return err(m, e),
        },
        E::Interval(_) => match interval_ms(e) {
            Some(ms) => Expr::Lit(Value::Int(ms)),
            None => {
                return err(
                    "an INTERVAL of milliseconds, seconds, minutes, hours or days",
                    e,
                )
            }
        },
        E::Nested(inner) => return compile_expr(inner, scope, mode),
        E::IsNull(x) => Expr::IsNull(sub(x, scope)?, false),
        E::IsNotNull(x) => Expr::IsNull(sub(x, scope)?, true),
        E::IsTrue(x) => Expr::Bin(
            BinOp::Eq,
            Box::new(Expr::Func(
                Func::Coalesce,
                vec![*sub(x, scope)?, Expr::Lit(Value::Bool(false))],
            )),
            Box::new(Expr::Lit(Value::Bool(true))),
        ),
        E::IsFalse(x) => Expr::Bin(
            BinOp::Eq,
            Box::new(Expr::Func(
                Func::Coalesce,
                vec![*sub(x, scope)?, Expr::Lit(Value::Bool(true))],
            )),
            Box::new(Expr::Lit(Value::Bool(false))),
        ),
        E::Between {
            expr,
            negated,
            low,
            high,
        } => Expr::Between(
            sub(expr, scope)?,
            sub(low, scope)?,
            sub(high, scope)?,
            *negated,
        ),
        E::In {
            expr,
            target: ast::InTarget::List(list),
            negated,
            global: false,
        } => Expr::InList(
            sub(expr, scope)?,
            list.iter()
                .map(|x| compile_expr(x, scope, mode))
                .collect::<Result<_, _>>()?,
            *negated,
        ),
        E::Like {
            negated,
            expr,
            pattern,
            escape_char: None,
            any: false,
        } => Expr::Like {
            e: sub(expr, scope)?,
            pattern: sub(pattern, scope)?,
            negated: *negated,
            ignore_case: false,
        },
        E::ILike {
            negated,
            expr,
            pattern,
            escape_char: None,
            any: false,
        } => Expr::Like {
            e: sub(expr, scope)?,
            pattern: sub(pattern, scope)?,
            negated: *negated,
            ignore_case: true,
        },
        E::UnaryOp { op, expr } => match op {
            UnaryOperator::Minus => Expr::Neg(sub(expr, scope)?),
            UnaryOperator::Plus => *sub(expr, scope)?,
            UnaryOperator::Not => Expr::Not(sub(expr, scope)?),
            other => return err(format!("the operator {other} is not supported"), e),
        },
        E::BinaryOp { left, op, right } => {
            let op = match op {
                BinaryOperator::Plus => BinOp::Add,
                BinaryOperator::Minus => BinOp::Sub,
                BinaryOperator::Multiply => BinOp::Mul,
                BinaryOperator::Divide => BinOp::Div,
                BinaryOperator::Modulo => BinOp::Mod,
                BinaryOperator::Eq => BinOp::Eq,
                BinaryOperator::NotEq => BinOp::NotEq,
                BinaryOperator::Lt => BinOp::Lt,
                BinaryOperator::LtEq => BinOp::LtEq,
                BinaryOperator::Gt => BinOp::Gt,
                BinaryOperator::GtEq => BinOp::GtEq,
                BinaryOperator::And => BinOp::And,
                BinaryOperator::Or => BinOp::Or,
                BinaryOperator::StringConcat => BinOp::Concat,
                other => return err(format!("the operator {other} is not supported"), e),
            };
            Expr::Bin(op, sub(left, scope)?, sub(right, scope)?)
        }
        E::Case {
            operand,
            conditions,
            else_result,
            ..
        } => Expr::Case {
            operand: operand.as_ref().map(|o| sub(o, scope)).transpose()?,
            whens: conditions
                .iter()
                .map(|w| {
                    Ok((
                        compile_expr(&w.condition, scope, mode)?,
                        compile_expr(&w.result, scope, mode)?,
                    ))
                })
                .collect::<Result<_, SqlError>>()?,
            otherwise: else_result.as_ref().map(|o| sub(o, scope)).transpose()?,
        },
        E::Cast {
            expr, data_type, ..
        } => {
            let to = match data_type {
                DataType::Int(_)
                | DataType::Integer(_)
                | DataType::BigInt(_)
                | DataType::SmallInt(_)
                | DataType::TinyInt(_)
                | DataType::Int64 => CastTo::Int,
                DataType::Double(_)
                | DataType::DoublePrecision
                | DataType::Float(_)
                | DataType::Real
                | DataType::Float64
                | DataType::Decimal(_)
                | DataType::Numeric(_) => CastTo::Float,
                DataType::Varchar(_)
                | DataType::Text
                | DataType::String(_)
                | DataType::Char(_)
                | DataType::CharacterVarying(_) => CastTo::Str,
                DataType::Boolean | DataType::Bool => CastTo::Bool,
                other => {
                    return err(
                        format!("CAST to {other} is not supported (INT, DOUBLE, VARCHAR, BOOLEAN)"),
                        e,
                    )
                }
            };
            Expr::Cast(sub(expr, scope)?, to)
        }
        E::Substring {
            expr,
            substring_from,
            substring_for,
            ..
        } => {
            let mut args = vec![*sub(expr, scope)?];
            args.push(match substring_from {
                Some(f) => *sub(f, scope)?,
                None => Expr::Lit(Value::Int(1)),
            });
            if let Some(n) = substring_for {
                args.push(*sub(n, scope)?);
            }
            Expr::Func(Func::Substring, args)
        }
        E::Trim {
            expr,
            trim_where,
            trim_what: None,
            trim_characters: None,
        } => {
            let f = match trim_where {
                Some(ast::TrimWhereField::Leading) => Func::Ltrim,
                Some(ast::TrimWhereField::Trailing) => Func::Rtrim,
                _ => Func::Trim,
            };
            Expr::Func(f, vec![*sub(expr, scope)?])
        }
        E::Ceil { expr, .. } => Expr::Func(Func::Ceil, vec![*sub(expr, scope)?]),
        E::Floor { expr, .. } => Expr::Func(Func::Floor, vec![*sub(expr, scope)?]),
        E::Extract { field, expr, .. } => {
            let Some(part) = TimePart::parse(&field.to_string()) else {
                return err(format!("EXTRACT({field} …) is not supported"), e);
            };
            Expr::Func(Func::Extract(part), vec![*sub(expr, scope)?])
        }
        E::Function(f) => compile_function(f, scope, mode, e)?,
        other => return err(format!("`{other}` is not supported"), e),
    })
}

fn compile_function(
    f: &ast::Function,
    scope: &mut Scope,
    mode: Mode,
    at: &ast::Expr,
) -> Result<Expr, SqlError> {
    let name = function_name(f);
    if f.over.is_some() || f.filter.is_some() || !f.within_group.is_empty() {
        return err(
            format!("{name}: OVER, FILTER and WITHIN GROUP are not supported"),
            f,
        );
    }
    let args = function_args(f)?;
    if let Some(mut func) = AggFn::named(&name) {
        if mode == Mode::Probe {
            scope.saw_aggregate = true;
            return Ok(Expr::Lit(Value::Null));
        }
        if mode != Mode::Output {
            return err(format!("{name} is an aggregate: not allowed here"), at);
        }
        let arg = match (func, args.as_slice()) {
            (AggFn::Count, [FunctionArgExpr::Wildcard]) => {
                func = AggFn::CountAll;
                None
            }
            (AggFn::Percentile(_), [x, p]) => {
                let p = arg_expr(p, f)?;
                match literal(p).and_then(|v| v.as_f64()) {
                    Some(q) if (0.0..=1.0).contains(&q) => func = AggFn::Percentile(q),
                    _ => return err("APPROX_PERCENTILE(x, p) takes p between 0 and 1", p),
                }
                Some(compile_expr(arg_expr(x, f)?, scope, Mode::Row)?)
            }
            (AggFn::Percentile(_), _) => return err("APPROX_PERCENTILE takes (x, p)", f),
            (_, [x]) => Some(compile_expr(arg_expr(x, f)?, scope, Mode::Row)?),
            _ => return err(format!("{name} takes one argument"), f),
        };
        if let Some(aggs) = scope.grouping.as_mut() {
            aggs.push(Aggregate { func, arg });
            return Ok(Expr::Agg(aggs.len() - 1));
        }
        return err(format!("{name} is an aggregate: not allowed here"), at);
    }
    if matches!(name.as_str(), "TUMBLE" | "HOP" | "SESSION" | "COUNT_WINDOW") {
        return err(format!("{name} belongs in GROUP BY"), f);
    }
    let (func, arity): (Func, std::ops::RangeInclusive<usize>) = match name.as_str() {
        "UPPER" | "UCASE" => (Func::Upper, 1..=1),
        "LOWER" | "LCASE" => (Func::Lower, 1..=1),
        "LENGTH" | "CHAR_LENGTH" => (Func::Length, 1..=1),
        "CONCAT" => (Func::Concat, 1..=64),
        "REPLACE" => (Func::Replace, 3..=3),
        "SUBSTR" | "SUBSTRING" => (Func::Substring, 2..=3),
        "TRIM" => (Func::Trim, 1..=1),
        "LTRIM" => (Func::Ltrim, 1..=1),
        "RTRIM" => (Func::Rtrim, 1..=1),
        "ABS" => (Func::Abs, 1..=1),
        "ROUND" => (Func::Round, 1..=2),
        "FLOOR" => (Func::Floor, 1..=1),
        "CEIL" | "CEILING" => (Func::Ceil, 1..=1),
        "SQRT" => (Func::Sqrt, 1..=1),
        "POWER" | "POW" => (Func::Power, 2..=2),
        "LN" => (Func::Ln, 1..=1),
        "LOG10" => (Func::Log10, 1..=1),
        "EXP" => (Func::Exp, 1..=1),
        "GREATEST" => (Func::Greatest, 1..=64),
        "LEAST" => (Func::Least, 1..=64),
        "COALESCE" | "IFNULL" => (Func::Coalesce, 1..=64),
        "NULLIF" => (Func::NullIf, 2..=2),
        "IF" => (Func::If, 3..=3),
        "FORMAT_TIME" => (Func::FormatTime, 1..=1),
        "DATE_TRUNC" => (Func::DateTrunc, 2..=2),
        "TO_JSON" => (Func::ToJson, 1..=1),
        "PARSE_JSON" => (Func::ParseJson, 1..=1),
        _ => {
            return err(
                format!("unknown function {name}; see docs/processing.md for the list"),
                f,
            )
        }
    };
    if !arity.contains(&args.len()) {
        return err(
            format!(
                "{name} takes {} argument(s)",
                if arity.start() == arity.end() {
                    arity.start().to_string()
                } else {
                    format!("{} to {}", arity.start(), arity.end())
                }
            ),
            f,
        );
    }
    let args = args
        .into_iter()
        .map(|a| compile_expr(arg_expr(a, f)?, scope, mode))
        .collect::<Result<_, _>>()?;
    Ok(Expr::Func(func, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_compiles() {
        let p = compile(
            "INSERT INTO sensor_stats
             SELECT _key AS device, COUNT(*) AS n, AVG(temp) AS avg_temp, MAX(temp) AS hi, window_start, window_end
             FROM sensors
             WHERE temp IS NOT NULL
             GROUP BY _key, TUMBLE(_ts, INTERVAL '10' SECOND)
             WITH (lateness = '2s', late_topic = 'late')",
        );
        let p = match p {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(p.output, "sensor_stats");
        assert_eq!(p.input, "sensors");
        assert_eq!(p.options.lateness, 2000);
        assert_eq!(p.options.late_topic.as_deref(), Some("late"));
        let g = p.grouping.as_ref().map(|g| (g.keys.len(), g.aggs.len()));
        assert_eq!(g, Some((1, 3)));
        assert!(matches!(
            p.grouping.and_then(|g| g.window),
            Some(Window::Tumble { size: 10_000, .. })
        ));
        assert_eq!(p.reads_value, [true, false]);
    }

    #[test]
    fn errors_name_their_place() {
        let cases = [
            ("SELECT 1", "INSERT"),
            ("INSERT INTO o SELECT x FROM s WHERE", "Expected"),
            ("INSERT INTO o SELECT nope(x) FROM s", "unknown function NOPE"),
            ("INSERT INTO o SELECT x, COUNT(*) FROM s GROUP BY y", "neither in GROUP BY"),
            ("INSERT INTO o SELECT x FROM s WHERE COUNT(*) > 1", "aggregate"),
            ("INSERT INTO s SELECT x FROM s", "also read"),
            ("INSERT INTO o SELECT x FROM s WITH (bogus = 1)", "unknown option"),
            ("INSERT INTO o SELECT x FROM s WITH (lateness = 'soon')", "duration"),
            ("INSERT INTO o SELECT COUNT(*) FROM s GROUP BY HOP(_ts, INTERVAL '3' SECOND, INTERVAL '10' SECOND)", "multiple"),
            ("INSERT INTO o SELECT s.x FROM s JOIN t ON s.a > t.b", "equality"),
            ("INSERT INTO o SELECT s.x FROM s JOIN t ON s.a = t.b", "table's key"),
            ("INSERT INTO o SELECT x, x FROM s", "two output columns"),
            ("INSERT INTO o SELECT window_start FROM s", "windowed"),
            ("INSERT INTO o SELECT FROM s", "no columns"),
        ];
        for (sql, want) in cases {
            match compile(sql) {
                Ok(_) => panic!("{sql}: compiled"),
                Err(e) => assert!(e.to_string().contains(want), "{sql}: {e}"),
            }
        }
        let e = compile("INSERT INTO o SELECT x\nFROM s WHERE nope(1)").err();
        assert_eq!(e.map(|e| (e.line, e.column)), Some((2, 14)));
    }

    #[test]
    fn joins_are_recognised() {
        let p = compile(
            "INSERT INTO o SELECT s.temp, t.site FROM sensors s LEFT JOIN devices t ON s._key = t._key",
        );
        let j = p.ok().and_then(|p| p.join);
        assert!(matches!(
            j,
            Some(Join {
                kind: JoinKind::Table,
                left_outer: true,
                ..
            })
        ));
        let p = compile(
            "INSERT INTO o SELECT a.x, b.y FROM a JOIN b ON a.id = b.id \
             AND b._ts BETWEEN a._ts - INTERVAL '5' SECOND AND a._ts + INTERVAL '2' SECOND",
        );
        let j = p.ok().and_then(|p| p.join);
        assert!(matches!(
            j,
            Some(Join {
                kind: JoinKind::Interval {
                    lower: -5000,
                    upper: 2000
                },
                ..
            })
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms("2s"), Some(2000));
        assert_eq!(duration_ms("500ms"), Some(500));
        assert_eq!(duration_ms("1.5 minutes"), Some(90_000));
        assert_eq!(duration_ms("250"), Some(250));
        assert_eq!(duration_ms("x"), None);
    }
}
