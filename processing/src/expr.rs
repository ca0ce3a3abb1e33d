//! Compiled expressions and their evaluation over one input row (or, for
//! an aggregate query's output, over a group's key, aggregates and window).
//!
//! SQL's three-valued logic: NULL in, NULL out (a missing JSON field reads
//! as NULL). An expression that cannot be computed (a type mismatch, a
//! division by zero, a value that is not JSON, a bad cast) is an
//! [`EvalError`]: the row is counted as an error and goes to the dead-letter
//! topic when one is set.

use std::sync::Arc;

use tributary_storage::Record;

use crate::value::Value;

/// Why a row's expression failed.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalError(pub String);

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A result of evaluation.
pub type Eval = Result<Value, EvalError>;

fn fail<T>(msg: impl Into<String>) -> Result<T, EvalError> {
    Err(EvalError(msg.into()))
}

/// A record's metadata column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    /// `_key`: the key as text (NULL without one).
    Key,
    /// `_ts`: the event timestamp, ms since the epoch.
    Ts,
    /// `_topic`.
    Topic,
    /// `_partition`.
    Partition,
    /// `_offset`.
    Offset,
    /// `_value`: the whole value (JSON when it parses, else its text).
    Value,
}

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
    And,
    Or,
    Concat,
}

/// What CAST converts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CastTo {
    Int,
    Float,
    Str,
    Bool,
}

/// A scalar function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Upper,
    Lower,
    Length,
    Concat,
    Replace,
    Substring,
    Trim,
    Ltrim,
    Rtrim,
    Abs,
    Round,
    Floor,
    Ceil,
    Sqrt,
    Power,
    Ln,
    Log10,
    Exp,
    Greatest,
    Least,
    Coalesce,
    NullIf,
    If,
    FormatTime,
    DateTrunc,
    Extract(TimePart),
    ToJson,
    ParseJson,
}

/// A part of a timestamp for EXTRACT and DATE_TRUNC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimePart {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    Millisecond,
    DayOfWeek,
}

impl TimePart {
    /// The part a name gives (`'minute'`, `HOUR`, …).
    pub fn parse(s: &str) -> Option<TimePart> {
        Some(match s.to_ascii_lowercase().as_str() {
            "year" | "years" => TimePart::Year,
            "month" | "months" => TimePart::Month,
            "day" | "days" => TimePart::Day,
            "hour" | "hours" => TimePart::Hour,
            "minute" | "minutes" => TimePart::Minute,
            "second" | "seconds" => TimePart::Second,
            "millisecond" | "milliseconds" => TimePart::Millisecond,
            "dow" | "dayofweek" => TimePart::DayOfWeek,
            _ => return None,
        })
    }
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub enum Expr {
    /// A constant.
    Lit(Value),
    /// A field of input `src`'s JSON value (a path: `a.b.c`).
    Field { src: usize, path: Vec<Arc<str>> },
    /// A metadata column of input `src`.
    Meta { src: usize, col: Meta },
    /// `_headers['name']` of input `src` (text; NULL when absent).
    Header { src: usize, name: String },
    /// `x['k']` or `x[0]` on a JSON value.
    Index(Box<Expr>, Box<Expr>),
    /// `-x`.
    Neg(Box<Expr>),
    /// `NOT x`.
    Not(Box<Expr>),
    /// `a op b`.
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// `x IS [NOT] NULL` (`true`: IS NOT NULL).
    IsNull(Box<Expr>, bool),
    /// `x [NOT] BETWEEN lo AND hi`.
    Between(Box<Expr>, Box<Expr>, Box<Expr>, bool),
    /// `x [NOT] IN (…)`.
    InList(Box<Expr>, Vec<Expr>, bool),
    /// `x [NOT] LIKE pattern` (`%`, `_`); `ILIKE` ignores case.
    Like {
        e: Box<Expr>,
        pattern: Box<Expr>,
        negated: bool,
        ignore_case: bool,
    },
    /// `CASE [operand] WHEN … THEN … [ELSE …] END`.
    Case {
        operand: Option<Box<Expr>>,
        whens: Vec<(Expr, Expr)>,
        otherwise: Option<Box<Expr>>,
    },
    /// `CAST(x AS type)`.
    Cast(Box<Expr>, CastTo),
    /// A scalar function.
    Func(Func, Vec<Expr>),
    /// An aggregate's result (aggregate queries' output only).
    Agg(usize),
    /// A GROUP BY expression's value (aggregate queries' output only).
    Group(usize),
    /// `window_start` (epoch ms).
    WindowStart,
    /// `window_end` (epoch ms).
    WindowEnd,
}

/// One input record as expressions see it.
#[derive(Debug)]
pub struct Input<'a> {
    /// The topic it was read from.
    pub topic: &'a str,
    /// The record.
    pub record: &'a Record,
    /// Its value parsed as JSON: `None` when it does not parse (a null or
    /// empty value reads as JSON null).
    pub json: Option<&'a serde_json::Value>,
}

impl Input<'_> {
    fn field(&self, path: &[Arc<str>]) -> Eval {
        let Some(mut j) = self.json else {
            return fail(format!(
                "the value at {}/{}@{} is not JSON",
                self.topic, self.record.partition, self.record.offset
            ));
        };
        for p in path {
            match j {
                serde_json::Value::Object(m) => match m.get(&**p) {
                    Some(next) => j = next,
                    None => return Ok(Value::Null),
                },
                serde_json::Value::Null => return Ok(Value::Null),
                other => {
                    return fail(format!(
                        "field `{p}` of a {}: not an object",
                        Value::from_json(other).type_name()
                    ))
                }
            }
        }
        Ok(Value::from_json(j))
    }

    fn meta(&self, col: Meta) -> Value {
        let r = self.record;
        match col {
            Meta::Key => r.key.as_deref().map_or(Value::Null, |k| {
                Value::Str(String::from_utf8_lossy(k).into_owned().into())
            }),
            Meta::Ts => Value::Int(r.timestamp),
            Meta::Topic => Value::str(self.topic),
            Meta::Partition => Value::Int(i64::from(r.partition)),
            Meta::Offset => Value::Int(i64::try_from(r.offset).unwrap_or(i64::MAX)),
            Meta::Value => match (self.json, r.value.as_deref()) {
                (Some(j), _) => Value::from_json(j),
                (None, Some(v)) => Value::Str(String::from_utf8_lossy(v).into_owned().into()),
                (None, None) => Value::Null,
            },
        }
    }
}

/// What an expression is evaluated over.
#[derive(Debug, Default)]
pub struct Scope<'a> {
    /// The input rows: the stream's, and a join's other side.
    pub inputs: [Option<&'a Input<'a>>; 2],
    /// An aggregate query's results, by slot.
    pub aggs: &'a [Value],
    /// An aggregate query's group values.
    pub groups: &'a [Value],
    /// The window, `[start, end)` in ms.
    pub window: Option<(i64, i64)>,
}

impl Expr {
    /// Evaluates the expression in `s`.
    pub fn eval(&self, s: &Scope) -> Eval {
        match self {
            Expr::Lit(v) => Ok(v.clone()),
            Expr::Field { src, path } => match s.inputs[*src] {
                Some(i) => i.field(path),
                // The side of a join that found nothing (a LEFT JOIN).
                None => Ok(Value::Null),
            },
            Expr::Meta { src, col } => Ok(s.inputs[*src].map_or(Value::Null, |i| i.meta(*col))),
            Expr::Header { src, name } => Ok(s.inputs[*src]
                .and_then(|i| i.record.headers.iter().rev().find(|(n, _)| n == name))
                .map_or(Value::Null, |(_, v)| {
                    Value::Str(String::from_utf8_lossy(v).into_owned().into())
                })),
            Expr::Index(e, i) => index(e.eval(s)?, i.eval(s)?),
            Expr::Neg(e) => match e.eval(s)? {
                Value::Null => Ok(Value::Null),
                Value::Int(i) => i
                    .checked_neg()
                    .map(Value::Int)
                    .ok_or_else(|| EvalError("integer overflow".into())),
                Value::Float(f) => Ok(Value::Float(-f)),
                other => fail(format!("cannot negate a {}", other.type_name())),
            },
            Expr::Not(e) => match truth(&e.eval(s)?)? {
                None => Ok(Value::Null),
                Some(b) => Ok(Value::Bool(!b)),
            },
            Expr::Bin(op, a, b) => binary(*op, a, b, s),
            Expr::IsNull(e, not) => Ok(Value::Bool(e.eval(s)?.is_null() != *not)),
            Expr::Between(e, lo, hi, negated) => {
                let v = e.eval(s)?;
                let ge = compare(BinOp::GtEq, &v, &lo.eval(s)?)?;
                let le = compare(BinOp::LtEq, &v, &hi.eval(s)?)?;
                let both = and(truth(&ge)?, truth(&le)?);
                Ok(both.map_or(Value::Null, |b| Value::Bool(b != *negated)))
            }
            Expr::InList(e, list, negated) => {
                let v = e.eval(s)?;
                if v.is_null() {
                    return Ok(Value::Null);
                }
                let mut saw_null = false;
                for item in list {
                    match compare(BinOp::Eq, &v, &item.eval(s)?)? {
                        Value::Bool(true) => return Ok(Value::Bool(!*negated)),
                        Value::Null => saw_null = true,
                        _ => {}
                    }
                }
                Ok(if saw_null {
                    Value::Null
                } else {
                    Value::Bool(*negated)
                })
            }
            Expr::Like {
                e,
                pattern,
                negated,
                ignore_case,
            } => match (e.eval(s)?, pattern.eval(s)?) {
                (Value::Null, _) | (_, Value::Null) => Ok(Value::Null),
                (Value::Str(a), Value::Str(p)) => {
                    let m = if *ignore_case {
                        like(&a.to_lowercase(), &p.to_lowercase())
                    } else {
                        like(&a, &p)
                    };
                    Ok(Value::Bool(m != *negated))
                }
                (a, _) => fail(format!("LIKE needs strings, not a {}", a.type_name())),
            },
            Expr::Case {
                operand,
                whens,
                otherwise,
            } => {
                let op = match operand {
                    Some(o) => Some(o.eval(s)?),
                    None => None,
                };
                for (when, then) in whens {
                    let w = when.eval(s)?;
                    let hit = match &op {
                        Some(o) => compare(BinOp::Eq, o, &w)? == Value::Bool(true),
                        None => truth(&w)? == Some(true),
                    };
                    if hit {
                        return then.eval(s);
                    }
                }
                otherwise.as_ref().map_or(Ok(Value::Null), |e| e.eval(s))
            }
            Expr::Cast(e, to) => cast(e.eval(s)?, *to),
            Expr::Func(f, args) => {
                let mut vals = Vec::with_capacity(args.len());
                for a in args {
                    vals.push(a.eval(s)?);
                }
                call(*f, vals)
            }
            Expr::Agg(i) => Ok(s.aggs.get(*i).cloned().unwrap_or_default()),
            Expr::Group(i) => Ok(s.groups.get(*i).cloned().unwrap_or_default()),
            Expr::WindowStart => Ok(s.window.map_or(Value::Null, |w| Value::Int(w.0))),
            Expr::WindowEnd => Ok(s.window.map_or(Value::Null, |w| Value::Int(w.1))),
        }
    }

    /// Whether the expression reads an input's JSON value.
    pub fn reads_value(&self) -> bool {
        let mut found = false;
        self.visit(&mut |e| {
            found |= matches!(
                e,
                Expr::Field { .. }
                    | Expr::Meta {
                        col: Meta::Value,
                        ..
                    }
            )
        });
        found
    }

    /// Calls `f` on this expression and every one inside it.
    pub fn visit(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Index(a, b) | Expr::Bin(_, a, b) => {
                a.visit(f);
                b.visit(f);
            }
            Expr::Neg(e) | Expr::Not(e) | Expr::IsNull(e, _) | Expr::Cast(e, _) => e.visit(f),
            Expr::Between(a, b, c, _) => {
                a.visit(f);
                b.visit(f);
                c.visit(f);
            }
            Expr::InList(e, list, _) => {
                e.visit(f);
                list.iter().for_each(|x| x.visit(f));
            }
            Expr::Like { e, pattern, .. } => {
                e.visit(f);
                pattern.visit(f);
            }
            Expr::Case {
                operand,
                whens,
                otherwise,
            } => {
                if let Some(o) = operand {
                    o.visit(f);
                }
                for (w, t) in whens {
                    w.visit(f);
                    t.visit(f);
                }
                if let Some(o) = otherwise {
                    o.visit(f);
                }
            }
            Expr::Func(_, args) => args.iter().for_each(|x| x.visit(f)),
            _ => {}
        }
    }
}

/// A value as a condition: `Some(b)`, or `None` for NULL.
pub fn truth(v: &Value) -> Result<Option<bool>, EvalError> {
    match v {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        other => fail(format!(
            "a condition is a {}, not a boolean",
            other.type_name()
        )),
    }
}

fn and(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (Some(false), _) | (_, Some(false)) => Some(false),
        (Some(true), Some(true)) => Some(true),
        _ => None,
    }
}

fn binary(op: BinOp, a: &Expr, b: &Expr, s: &Scope) -> Eval {
    match op {
        BinOp::And => {
            let l = truth(&a.eval(s)?)?;
            if l == Some(false) {
                return Ok(Value::Bool(false));
            }
            let r = truth(&b.eval(s)?)?;
            Ok(and(l, r).map_or(Value::Null, Value::Bool))
        }
        BinOp::Or => {
            let l = truth(&a.eval(s)?)?;
            if l == Some(true) {
                return Ok(Value::Bool(true));
            }
            let r = truth(&b.eval(s)?)?;
            Ok(match (l, r) {
                (_, Some(true)) => Value::Bool(true),
                (Some(false), Some(false)) => Value::Bool(false),
                _ => Value::Null,
            })
        }
        _ => {
            let (x, y) = (a.eval(s)?, b.eval(s)?);
            match op {
                BinOp::Eq | BinOp::NotEq | BinOp::Lt | BinOp::LtEq | BinOp::Gt | BinOp::GtEq => {
                    compare(op, &x, &y)
                }
                BinOp::Concat => match (&x, &y) {
                    (Value::Null, _) | (_, Value::Null) => Ok(Value::Null),
                    _ => Ok(Value::Str(format!("{}{}", x.text(), y.text()).into())),
                },
                _ => arith(op, x, y),
            }
        }
    }
}

/// `a op b` for the comparison operators (NULL when either is NULL).
pub fn compare(op: BinOp, a: &Value, b: &Value) -> Eval {
    use std::cmp::Ordering::*;
    let ord = match (a, b) {
        (Value::Null, _) | (_, Value::Null) => return Ok(Value::Null),
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)) => {
            let (x, y) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            match x.partial_cmp(&y) {
                Some(o) => o,
                None => return Ok(Value::Bool(op == BinOp::NotEq)),
            }
        }
        (Value::Str(x), Value::Str(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Json(x), Value::Json(y)) if matches!(op, BinOp::Eq | BinOp::NotEq) => {
            return Ok(Value::Bool((x == y) == (op == BinOp::Eq)))
        }
        _ => {
            return fail(format!(
                "cannot compare a {} with a {}",
                a.type_name(),
                b.type_name()
            ))
        }
    };
    Ok(Value::Bool(match op {
        BinOp::Eq => ord == Equal,
        BinOp::NotEq => ord != Equal,
        BinOp::Lt => ord == Less,
        BinOp::LtEq => ord != Greater,
        BinOp::Gt => ord == Greater,
        _ => ord != Less,
    }))
}

fn arith(op: BinOp, a: Value, b: Value) -> Eval {
    let overflow = || EvalError("integer overflow".into());
    match (a, b) {
        (Value::Null, _) | (_, Value::Null) => Ok(Value::Null),
        (Value::Int(x), Value::Int(y)) => match op {
            BinOp::Add => x.checked_add(y).map(Value::Int).ok_or_else(overflow),
            BinOp::Sub => x.checked_sub(y).map(Value::Int).ok_or_else(overflow),
            BinOp::Mul => x.checked_mul(y).map(Value::Int).ok_or_else(overflow),
            BinOp::Div if y == 0 => fail("division by zero"),
            BinOp::Div => x.checked_div(y).map(Value::Int).ok_or_else(overflow),
            BinOp::Mod if y == 0 => fail("division by zero"),
            _ => x.checked_rem(y).map(Value::Int).ok_or_else(overflow),
        },
        (a @ (Value::Int(_) | Value::Float(_)), b @ (Value::Int(_) | Value::Float(_))) => {
            let (x, y) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            Ok(Value::Float(match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div if y == 0.0 => return fail("division by zero"),
                BinOp::Div => x / y,
                BinOp::Mod if y == 0.0 => return fail("division by zero"),
                _ => x % y,
            }))
        }
        (a, b) => fail(format!(
            "arithmetic on a {} and a {}",
            a.type_name(),
            b.type_name()
        )),
    }
}

fn index(v: Value, i: Value) -> Eval {
    let Value::Json(j) = v else {
        return match v {
            Value::Null => Ok(Value::Null),
            other => fail(format!("cannot index a {}", other.type_name())),
        };
    };
    Ok(match (&*j, &i) {
        (serde_json::Value::Object(m), Value::Str(k)) => {
            m.get(&**k).map_or(Value::Null, Value::from_json)
        }
        (serde_json::Value::Array(a), Value::Int(n)) => usize::try_from(*n)
            .ok()
            .and_then(|n| a.get(n))
            .map_or(Value::Null, Value::from_json),
        (_, Value::Null) => Value::Null,
        (_, other) => {
            return fail(format!(
                "cannot index a {} with a {}",
                Value::Json(j.clone()).type_name(),
                other.type_name()
            ))
        }
    })
}

/// SQL LIKE: `%` any run, `_` one character.
fn like(s: &str, p: &str) -> bool {
    let s: Vec<char> = s.chars().collect();
    let p: Vec<char> = p.chars().collect();
    // Iterative matching with backtracking to the last `%`.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if j < p.len() && (p[j] == '_' || p[j] == s[i]) {
            i += 1;
            j += 1;
        } else if j < p.len() && p[j] == '%' {
            star = Some((j, i));
            j += 1;
        } else if let Some((sj, si)) = star {
            j = sj + 1;
            i = si + 1;
            star = Some((sj, si + 1));
        } else {
            return false;
        }
    }
    p[j..].iter().all(|c| *c == '%')
}

/// `CAST(v AS to)`.
pub fn cast(v: Value, to: CastTo) -> Eval {
    let bad = |v: &Value| {
        fail(format!(
            "cannot cast {} `{}` to {:?}",
            v.type_name(),
            v.text(),
            to
        ))
    };
    match (to, v) {
        (_, Value::Null) => Ok(Value::Null),
        (CastTo::Int, Value::Int(i)) => Ok(Value::Int(i)),
        (CastTo::Int, Value::Float(f)) if f.is_finite() && f.abs() < 9.2e18 => {
            Ok(Value::Int(f.trunc() as i64))
        }
        (CastTo::Int, Value::Bool(b)) => Ok(Value::Int(i64::from(b))),
        (CastTo::Int, Value::Str(s)) => match s.trim().parse::<i64>() {
            Ok(i) => Ok(Value::Int(i)),
            Err(_) => match s.trim().parse::<f64>() {
                Ok(f) if f.is_finite() && f.abs() < 9.2e18 => Ok(Value::Int(f.trunc() as i64)),
                _ => bad(&Value::Str(s)),
            },
        },
        (CastTo::Float, Value::Int(i)) => Ok(Value::Float(i as f64)),
        (CastTo::Float, Value::Float(f)) => Ok(Value::Float(f)),
        (CastTo::Float, Value::Str(s)) => match s.trim().parse::<f64>() {
            Ok(f) => Ok(Value::Float(f)),
            Err(_) => bad(&Value::Str(s)),
        },
        (CastTo::Str, v) => Ok(Value::Str(v.text().into())),
        (CastTo::Bool, Value::Bool(b)) => Ok(Value::Bool(b)),
        (CastTo::Bool, Value::Int(i)) => Ok(Value::Bool(i != 0)),
        (CastTo::Bool, Value::Str(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "1" | "yes" => Ok(Value::Bool(true)),
            "false" | "f" | "0" | "no" => Ok(Value::Bool(false)),
            _ => bad(&Value::Str(s)),
        },
        (_, v) => bad(&v),
    }
}

fn num(f: Func, v: &Value) -> Result<Option<f64>, EvalError> {
    match v {
        Value::Null => Ok(None),
        Value::Int(i) => Ok(Some(*i as f64)),
        Value::Float(x) => Ok(Some(*x)),
        other => fail(format!("{f:?} needs a number, not a {}", other.type_name())),
    }
}

fn string(f: Func, v: &Value) -> Result<Option<Arc<str>>, EvalError> {
    match v {
        Value::Null => Ok(None),
        Value::Str(s) => Ok(Some(s.clone())),
        other => fail(format!("{f:?} needs a string, not a {}", other.type_name())),
    }
}

fn int(f: Func, v: &Value) -> Result<Option<i64>, EvalError> {
    match v {
        Value::Null => Ok(None),
        Value::Int(i) => Ok(Some(*i)),
        Value::Float(x) if x.is_finite() && x.abs() < 9.2e18 => Ok(Some(*x as i64)),
        other => fail(format!(
            "{f:?} needs a whole number, not a {}",
            other.type_name()
        )),
    }
}

fn arg(args: &[Value], i: usize) -> &Value {
    args.get(i).unwrap_or(&Value::Null)
}

/// Calls a scalar function (arity was checked at compile time).
pub fn call(f: Func, args: Vec<Value>) -> Eval {
    let a0 = arg(&args, 0);
    let float =
        |x: Option<f64>, g: fn(f64) -> f64| Ok(x.map_or(Value::Null, |x| Value::Float(g(x))));
    match f {
        Func::Upper => {
            Ok(string(f, a0)?.map_or(Value::Null, |s| Value::Str(s.to_uppercase().into())))
        }
        Func::Lower => {
            Ok(string(f, a0)?.map_or(Value::Null, |s| Value::Str(s.to_lowercase().into())))
        }
        Func::Length => {
            Ok(string(f, a0)?.map_or(Value::Null, |s| Value::Int(s.chars().count() as i64)))
        }
        Func::Trim => Ok(string(f, a0)?.map_or(Value::Null, |s| Value::str(s.trim()))),
        Func::Ltrim => Ok(string(f, a0)?.map_or(Value::Null, |s| Value::str(s.trim_start()))),
        Func::Rtrim => Ok(string(f, a0)?.map_or(Value::Null, |s| Value::str(s.trim_end()))),
        Func::Concat => Ok(Value::Str(
            args.iter()
                .filter(|v| !v.is_null())
                .map(Value::text)
                .collect::<String>()
                .into(),
        )),
        Func::Replace => {
            let (Some(s), Some(from), Some(to)) = (
                string(f, a0)?,
                string(f, arg(&args, 1))?,
                string(f, arg(&args, 2))?,
            ) else {
                return Ok(Value::Null);
            };
            Ok(Value::Str(s.replace(&*from, &to).into()))
        }
        Func::Substring => {
            let Some(s) = string(f, a0)? else {
                return Ok(Value::Null);
            };
            // SQL positions start at 1.
            let from = int(f, arg(&args, 1))?.unwrap_or(1);
            let len = if args.len() > 2 {
                match int(f, arg(&args, 2))? {
                    Some(l) if l < 0 => return fail("SUBSTRING with a negative length"),
                    Some(l) => Some(l),
                    None => return Ok(Value::Null),
                }
            } else {
                None
            };
            let start = from.max(1) - 1;
            let skip_before = (1 - from).max(0);
            let take = len.map(|l| (l - skip_before).max(0));
            let out: String = s
                .chars()
                .skip(usize::try_from(start).unwrap_or(usize::MAX))
                .take(take.map_or(usize::MAX, |t| usize::try_from(t).unwrap_or(0)))
                .collect();
            Ok(Value::Str(out.into()))
        }
        Func::Abs => match a0 {
            Value::Int(i) => i
                .checked_abs()
                .map(Value::Int)
                .ok_or_else(|| EvalError("integer overflow".into())),
            v => float(num(f, v)?, f64::abs),
        },
        Func::Round => {
            let digits = int(f, arg(&args, 1))?.unwrap_or(0).clamp(-15, 15) as i32;
            match a0 {
                Value::Int(i) if digits >= 0 => Ok(Value::Int(*i)),
                v => Ok(num(f, v)?.map_or(Value::Null, |x| {
                    let m = 10f64.powi(digits);
                    Value::Float((x * m).round() / m)
                })),
            }
        }
        Func::Floor => match a0 {
            Value::Int(i) => Ok(Value::Int(*i)),
            v => float(num(f, v)?, f64::floor),
        },
        Func::Ceil => match a0 {
            Value::Int(i) => Ok(Value::Int(*i)),
            v => float(num(f, v)?, f64::ceil),
        },
        Func::Sqrt => float(num(f, a0)?, f64::sqrt),
        Func::Ln => float(num(f, a0)?, f64::ln),
        Func::Log10 => float(num(f, a0)?, f64::log10),
        Func::Exp => float(num(f, a0)?, f64::exp),
        Func::Power => match (num(f, a0)?, num(f, arg(&args, 1))?) {
            (Some(x), Some(y)) => Ok(Value::Float(x.powf(y))),
            _ => Ok(Value::Null),
        },
        Func::Greatest | Func::Least => {
            let mut best: Option<Value> = None;
            for v in args.into_iter().filter(|v| !v.is_null()) {
                best = Some(match best {
                    None => v,
                    Some(b) => {
                        let op = if f == Func::Greatest {
                            BinOp::Gt
                        } else {
                            BinOp::Lt
                        };
                        if compare(op, &v, &b)? == Value::Bool(true) {
                            v
                        } else {
                            b
                        }
                    }
                });
            }
            Ok(best.unwrap_or_default())
        }
        Func::Coalesce => Ok(args.into_iter().find(|v| !v.is_null()).unwrap_or_default()),
        Func::NullIf => {
            let b = arg(&args, 1);
            if compare(BinOp::Eq, a0, b)? == Value::Bool(true) {
                Ok(Value::Null)
            } else {
                Ok(a0.clone())
            }
        }
        Func::If => match truth(a0)? {
            Some(true) => Ok(arg(&args, 1).clone()),
            _ => Ok(arg(&args, 2).clone()),
        },
        Func::FormatTime => {
            Ok(int(f, a0)?.map_or(Value::Null, |ms| Value::Str(format_time(ms).into())))
        }
        Func::DateTrunc => {
            let Some(unit) = string(f, a0)? else {
                return Ok(Value::Null);
            };
            let Some(part) = TimePart::parse(&unit) else {
                return fail(format!("DATE_TRUNC: unknown unit `{unit}`"));
            };
            Ok(int(f, arg(&args, 1))?.map_or(Value::Null, |ms| Value::Int(truncate(ms, part))))
        }
        Func::Extract(part) => {
            Ok(int(f, a0)?.map_or(Value::Null, |ms| Value::Int(extract(ms, part))))
        }
        Func::ToJson => Ok(if a0.is_null() {
            Value::Null
        } else {
            Value::Str(a0.to_json().to_string().into())
        }),
        Func::ParseJson => match string(f, a0)? {
            None => Ok(Value::Null),
            Some(s) => match serde_json::from_str::<serde_json::Value>(&s) {
                Ok(j) => Ok(Value::from_json(&j)),
                Err(e) => fail(format!("PARSE_JSON: {e}")),
            },
        },
    }
}

const DAY_MS: i64 = 86_400_000;

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Epoch ms as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_time(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(DAY_MS), ms.rem_euclid(DAY_MS));
    let (y, m, d) = civil(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

fn extract(ms: i64, part: TimePart) -> i64 {
    let (days, rem) = (ms.div_euclid(DAY_MS), ms.rem_euclid(DAY_MS));
    let (y, m, d) = civil(days);
    match part {
        TimePart::Year => y,
        TimePart::Month => m,
        TimePart::Day => d,
        TimePart::Hour => rem / 3_600_000,
        TimePart::Minute => rem / 60_000 % 60,
        TimePart::Second => rem / 1000 % 60,
        TimePart::Millisecond => rem % 1000,
        // 1970-01-01 was a Thursday; Sunday is 0.
        TimePart::DayOfWeek => (days + 4).rem_euclid(7),
    }
}

fn truncate(ms: i64, part: TimePart) -> i64 {
    let days = ms.div_euclid(DAY_MS);
    let (y, m, _) = civil(days);
    let floor = |unit: i64| ms.div_euclid(unit) * unit;
    match part {
        TimePart::Year => days_from_civil(y, 1, 1) * DAY_MS,
        TimePart::Month => days_from_civil(y, m, 1) * DAY_MS,
        TimePart::Day | TimePart::DayOfWeek => floor(DAY_MS),
        TimePart::Hour => floor(3_600_000),
        TimePart::Minute => floor(60_000),
        TimePart::Second => floor(1000),
        TimePart::Millisecond => ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns() {
        assert!(like("sensor-12", "sensor-%"));
        assert!(like("abc", "a_c"));
        assert!(like("abc", "%"));
        assert!(!like("abc", "a_"));
        assert!(like("aXbXc", "a%b%c"));
        assert!(!like("ab", "a%c"));
    }

    #[test]
    fn time_functions() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(1_709_251_199_123), "2024-02-29T23:59:59.123Z");
        assert_eq!(extract(1_709_251_199_123, TimePart::Month), 2);
        assert_eq!(extract(1_709_251_199_123, TimePart::DayOfWeek), 4);
        assert_eq!(
            truncate(1_709_251_199_123, TimePart::Month),
            1_706_745_600_000
        );
        assert_eq!(format_time(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn three_valued_logic_and_errors() {
        let s = Scope::default();
        let lit = |v: Value| Box::new(Expr::Lit(v));
        let and = Expr::Bin(BinOp::And, lit(Value::Null), lit(Value::Bool(false)));
        assert_eq!(and.eval(&s), Ok(Value::Bool(false)));
        let or = Expr::Bin(BinOp::Or, lit(Value::Null), lit(Value::Bool(false)));
        assert_eq!(or.eval(&s), Ok(Value::Null));
        let div = Expr::Bin(BinOp::Div, lit(Value::Int(1)), lit(Value::Int(0)));
        assert!(div.eval(&s).is_err());
        let add = Expr::Bin(BinOp::Add, lit(Value::str("a")), lit(Value::Int(1)));
        assert!(add.eval(&s).is_err());
        let cmp = Expr::Bin(BinOp::Lt, lit(Value::Int(1)), lit(Value::Float(1.5)));
        assert_eq!(cmp.eval(&s), Ok(Value::Bool(true)));
        assert_eq!(
            call(
                Func::Substring,
                vec![Value::str("hello"), Value::Int(2), Value::Int(3)]
            ),
            Ok(Value::str("ell"))
        );
        assert!(cast(Value::str("x1"), CastTo::Int).is_err());
        assert_eq!(cast(Value::str(" 42 "), CastTo::Int), Ok(Value::Int(42)));
    }
}
