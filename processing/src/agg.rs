//! Aggregates: COUNT, SUM, AVG, MIN, MAX, FIRST_VALUE, LAST_VALUE, STDDEV
//! (sample and population), VARIANCE and an approximate percentile (a
//! DDSketch with 1% relative accuracy and a bounded number of buckets).
//! Their accumulators are serializable: they are the checkpointed state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::expr::{EvalError, Expr, Scope};
use crate::value::{value_size, Value};

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AggFn {
    /// `COUNT(*)`.
    CountAll,
    /// `COUNT(x)`: non-NULL values.
    Count,
    Sum,
    Avg,
    Min,
    Max,
    FirstValue,
    LastValue,
    /// Sample standard deviation (`STDDEV`, `STDDEV_SAMP`).
    StddevSamp,
    /// `STDDEV_POP`.
    StddevPop,
    /// Sample variance (`VARIANCE`, `VAR_SAMP`).
    VarSamp,
    /// `APPROX_PERCENTILE(x, p)`, `p` in [0, 1].
    Percentile(f64),
}

impl AggFn {
    /// The aggregate a function name gives, if it is one.
    pub fn named(name: &str) -> Option<AggFn> {
        Some(match name {
            "COUNT" => AggFn::Count,
            "SUM" => AggFn::Sum,
            "AVG" => AggFn::Avg,
            "MIN" => AggFn::Min,
            "MAX" => AggFn::Max,
            "FIRST_VALUE" => AggFn::FirstValue,
            "LAST_VALUE" => AggFn::LastValue,
            "STDDEV" | "STDDEV_SAMP" => AggFn::StddevSamp,
            "STDDEV_POP" => AggFn::StddevPop,
            "VARIANCE" | "VAR_SAMP" => AggFn::VarSamp,
            "APPROX_PERCENTILE" | "PERCENTILE_APPROX" => AggFn::Percentile(0.5),
            _ => return None,
        })
    }
}

/// An aggregate of a query: the function and its argument.
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub func: AggFn,
    pub arg: Option<Expr>,
}

impl Aggregate {
    /// A fresh accumulator.
    pub fn start(&self) -> Acc {
        match self.func {
            AggFn::CountAll | AggFn::Count => Acc::Count(0),
            AggFn::Sum => Acc::Sum(Value::Null),
            AggFn::Avg => Acc::Avg { sum: 0.0, n: 0 },
            AggFn::Min | AggFn::Max => Acc::One(Value::Null),
            AggFn::FirstValue | AggFn::LastValue => Acc::Ordered(0, Value::Null),
            AggFn::StddevSamp | AggFn::StddevPop | AggFn::VarSamp => Acc::Var {
                n: 0,
                mean: 0.0,
                m2: 0.0,
            },
            AggFn::Percentile(_) => Acc::Sketch(Sketch::default()),
        }
    }

    /// The argument's value for this row (`None` for `COUNT(*)`).
    pub fn input(&self, s: &Scope) -> Result<Option<Value>, EvalError> {
        match &self.arg {
            None => Ok(None),
            Some(e) => e.eval(s).map(Some),
        }
    }

    /// Folds one row's value into `acc`.
    pub fn add(&self, acc: &mut Acc, v: Option<&Value>) -> Result<(), EvalError> {
        let v = match (self.func, v) {
            (AggFn::CountAll, _) => {
                if let Acc::Count(n) = acc {
                    *n += 1;
                }
                return Ok(());
            }
            (_, None | Some(Value::Null)) => return Ok(()),
            (_, Some(v)) => v,
        };
        let number = |v: &Value| {
            v.as_f64().ok_or_else(|| {
                EvalError(format!(
                    "{:?} needs numbers, not a {}",
                    self.func,
                    v.type_name()
                ))
            })
        };
        match (self.func, acc) {
            (AggFn::Count, Acc::Count(n)) => *n += 1,
            (AggFn::Sum, Acc::Sum(total)) => {
                number(v)?;
                *total = sum(total, v);
            }
            (AggFn::Avg, Acc::Avg { sum, n }) => {
                *sum += number(v)?;
                *n += 1;
            }
            (AggFn::Min | AggFn::Max, Acc::One(cur)) => {
                let replace = cur.is_null() || {
                    let o = v.total_cmp(cur);
                    if self.func == AggFn::Min {
                        o.is_lt()
                    } else {
                        o.is_gt()
                    }
                };
                if replace {
                    *cur = v.clone();
                }
            }
            (AggFn::FirstValue, Acc::Ordered(_, cur)) if cur.is_null() => *cur = v.clone(),
            (AggFn::LastValue, Acc::Ordered(_, cur)) => *cur = v.clone(),
            (AggFn::StddevSamp | AggFn::StddevPop | AggFn::VarSamp, Acc::Var { n, mean, m2 }) => {
                // Welford's update.
                let x = number(v)?;
                *n += 1;
                let d = x - *mean;
                *mean += d / *n as f64;
                *m2 += d * (x - *mean);
            }
            (AggFn::Percentile(_), Acc::Sketch(s)) => s.add(number(v)?),
            _ => {}
        }
        Ok(())
    }

    /// The result of `acc`.
    pub fn result(&self, acc: &Acc) -> Value {
        match (self.func, acc) {
            (_, Acc::Count(n)) => Value::Int(i64::try_from(*n).unwrap_or(i64::MAX)),
            (_, Acc::Sum(v) | Acc::One(v) | Acc::Ordered(_, v)) => v.clone(),
            (_, Acc::Avg { sum, n }) if *n > 0 => Value::Float(sum / *n as f64),
            (_, Acc::Var { n, m2, .. }) => {
                let n = *n as f64;
                match self.func {
                    AggFn::StddevPop if n >= 1.0 => Value::Float((m2 / n).sqrt()),
                    AggFn::StddevSamp if n >= 2.0 => Value::Float((m2 / (n - 1.0)).sqrt()),
                    AggFn::VarSamp if n >= 2.0 => Value::Float(m2 / (n - 1.0)),
                    _ => Value::Null,
                }
            }
            (AggFn::Percentile(p), Acc::Sketch(s)) => {
                s.quantile(p).map_or(Value::Null, Value::Float)
            }
            _ => Value::Null,
        }
    }
}

/// `a + b` for SUM (both numbers or NULL): whole numbers stay whole until
/// a fraction or an overflow.
pub fn sum(a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Null, x) | (x, Value::Null) => x.clone(),
        (Value::Int(x), Value::Int(y)) => match x.checked_add(*y) {
            Some(s) => Value::Int(s),
            None => Value::Float(*x as f64 + *y as f64),
        },
        (x, y) => Value::Float(x.as_f64().unwrap_or(0.0) + y.as_f64().unwrap_or(0.0)),
    }
}

/// An aggregate's running state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Acc {
    Count(u64),
    Sum(Value),
    Avg {
        sum: f64,
        n: u64,
    },
    One(Value),
    /// FIRST_VALUE / LAST_VALUE: the value and its arrival number.
    Ordered(u64, Value),
    Var {
        n: u64,
        mean: f64,
        m2: f64,
    },
    Sketch(Sketch),
}

impl Acc {
    /// An approximate size in memory.
    pub fn size(&self) -> usize {
        match self {
            Acc::Sum(v) | Acc::One(v) | Acc::Ordered(_, v) => value_size(v),
            Acc::Sketch(s) => 48 + 16 * (s.pos.len() + s.neg.len()),
            _ => 24,
        }
    }
}

/// Relative accuracy of [`Sketch`].
const ALPHA: f64 = 0.01;
/// Buckets per sign before the smallest are merged.
const MAX_BUCKETS: usize = 2048;

/// DDSketch (Masson et al., VLDB 2019): logarithmic buckets, so a quantile
/// is within ALPHA of the true value (relative), in bounded memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sketch {
    pos: BTreeMap<i32, u64>,
    neg: BTreeMap<i32, u64>,
    zeros: u64,
    count: u64,
}

fn gamma() -> f64 {
    (1.0 + ALPHA) / (1.0 - ALPHA)
}

impl Sketch {
    fn index(x: f64) -> i32 {
        (x.ln() / gamma().ln()).ceil() as i32
    }

    fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.count += 1;
        if x.abs() < 1e-300 {
            self.zeros += 1;
            return;
        }
        let store = if x > 0.0 {
            &mut self.pos
        } else {
            &mut self.neg
        };
        *store.entry(Self::index(x.abs())).or_default() += 1;
        if store.len() > MAX_BUCKETS {
            // Merge the two buckets nearest zero (the least significant).
            if let Some((k, n)) = store.pop_first() {
                if let Some((_, m)) = store.iter_mut().next() {
                    *m += n;
                } else {
                    store.insert(k, n);
                }
            }
        }
    }

    /// Adds `other`'s counts (two session windows joined).
    pub fn merge(&mut self, other: Sketch) {
        for (store, theirs) in [(&mut self.pos, other.pos), (&mut self.neg, other.neg)] {
            for (i, n) in theirs {
                *store.entry(i).or_default() += n;
            }
            while store.len() > MAX_BUCKETS {
                if let Some((_, n)) = store.pop_first() {
                    if let Some((_, m)) = store.iter_mut().next() {
                        *m += n;
                    }
                }
            }
        }
        self.zeros += other.zeros;
        self.count += other.count;
    }

    fn value_of(i: i32) -> f64 {
        2.0 * gamma().powi(i) / (gamma() + 1.0)
    }

    /// The `q`-quantile (0 ≤ q ≤ 1), or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        // Most negative first: the negative store from its largest index.
        for (i, n) in self.neg.iter().rev() {
            seen += n;
            if seen > rank {
                return Some(-Self::value_of(*i));
            }
        }
        seen += self.zeros;
        if seen > rank {
            return Some(0.0);
        }
        for (i, n) in &self.pos {
            seen += n;
            if seen > rank {
                return Some(Self::value_of(*i));
            }
        }
        self.pos.keys().next_back().map(|i| Self::value_of(*i))
    }
}

impl AggFn {
    /// Whether the accumulator tracks arrival order.
    fn ordered(self) -> bool {
        matches!(self, AggFn::FirstValue | AggFn::LastValue)
    }
}

impl Aggregate {
    /// [`Aggregate::add`] for a row that arrived `seq`-th.
    pub fn add_at(&self, acc: &mut Acc, v: Option<&Value>, seq: u64) -> Result<(), EvalError> {
        if self.func.ordered() {
            if let (Acc::Ordered(at, cur), Some(v)) = (&mut *acc, v) {
                if v.is_null() {
                    return Ok(());
                }
                let take = match self.func {
                    AggFn::FirstValue => cur.is_null() || seq < *at,
                    _ => cur.is_null() || seq > *at,
                };
                if take {
                    *at = seq;
                    *cur = v.clone();
                }
                return Ok(());
            }
        }
        self.add(acc, v)
    }

    /// Merges `other` into `acc` (two session windows joined by an event).
    pub fn merge(&self, acc: &mut Acc, other: Acc) {
        match (acc, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::Sum(a), Acc::Sum(b)) => *a = sum(a, &b),
            (Acc::Avg { sum, n }, Acc::Avg { sum: s2, n: n2 }) => {
                *sum += s2;
                *n += n2;
            }
            (Acc::One(a), Acc::One(b)) => {
                let take = match self.func {
                    AggFn::Min => !b.is_null() && (a.is_null() || b.total_cmp(a).is_lt()),
                    AggFn::Max => !b.is_null() && (a.is_null() || b.total_cmp(a).is_gt()),
                    _ => false,
                };
                if take {
                    *a = b;
                }
            }
            (Acc::Ordered(at, a), Acc::Ordered(bt, b)) => {
                let take = !b.is_null()
                    && (a.is_null()
                        || match self.func {
                            AggFn::FirstValue => bt < *at,
                            _ => bt > *at,
                        });
                if take {
                    *at = bt;
                    *a = b;
                }
            }
            (
                Acc::Var { n, mean, m2 },
                Acc::Var {
                    n: n2,
                    mean: mean2,
                    m2: m22,
                },
            ) => {
                // Chan et al.'s parallel combination.
                if n2 == 0 {
                    return;
                }
                if *n == 0 {
                    (*n, *mean, *m2) = (n2, mean2, m22);
                    return;
                }
                let total = (*n + n2) as f64;
                let d = mean2 - *mean;
                *m2 += m22 + d * d * (*n as f64) * (n2 as f64) / total;
                *mean += d * n2 as f64 / total;
                *n += n2;
            }
            (Acc::Sketch(a), Acc::Sketch(b)) => a.merge(b),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sketch_quantiles_are_within_one_percent() {
        let mut s = Sketch::default();
        let mut xs: Vec<f64> = (1..=10_000).map(|i| f64::from(i) * 0.37).collect();
        for x in &xs {
            s.add(*x);
        }
        xs.sort_by(f64::total_cmp);
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 1.0] {
            let exact = xs[(q * (xs.len() - 1) as f64).floor() as usize];
            let got = s.quantile(q).unwrap_or(f64::NAN);
            assert!(
                ((got - exact) / exact).abs() <= ALPHA + 1e-9,
                "q {q}: {got} vs {exact}"
            );
        }
        let mut n = Sketch::default();
        for x in [-5.0, -1.0, 0.0, 2.0, 10.0] {
            n.add(x);
        }
        assert!((n.quantile(0.0).unwrap_or(0.0) + 5.0).abs() < 0.06);
        assert_eq!(n.quantile(0.5), Some(0.0));
    }

    #[test]
    fn sums_stay_integers_until_a_fraction_or_overflow() {
        let sum = Aggregate {
            func: AggFn::Sum,
            arg: None,
        };
        let mut acc = sum.start();
        for v in [Value::Int(2), Value::Null, Value::Int(3)] {
            assert!(sum.add(&mut acc, Some(&v)).is_ok());
        }
        assert_eq!(sum.result(&acc), Value::Int(5));
        assert!(sum.add(&mut acc, Some(&Value::Float(0.5))).is_ok());
        assert_eq!(sum.result(&acc), Value::Float(5.5));
        assert!(sum.add(&mut acc, Some(&Value::str("x"))).is_err());
    }

    #[test]
    fn stddev_matches_the_two_pass_formula() {
        let sd = Aggregate {
            func: AggFn::StddevSamp,
            arg: None,
        };
        let mut acc = sd.start();
        let xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        for x in xs {
            assert!(sd.add(&mut acc, Some(&Value::Float(x))).is_ok());
        }
        let mean = xs.iter().sum::<f64>() / 8.0;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 7.0;
        let Value::Float(got) = sd.result(&acc) else {
            panic!("not a float")
        };
        assert!((got - var.sqrt()).abs() < 1e-12);
    }
}
