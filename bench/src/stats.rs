//! Median, min and max over the runs of one measurement, and the ratios the report prints.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Summary {
    /// `None` when there is no value (every run failed).
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
            runs: n,
        })
    }
}

/// `value / base`, or `None` when the base is zero or missing.
pub fn ratio(value: f64, base: Option<f64>) -> Option<f64> {
    match base {
        Some(b) if b != 0.0 && b.is_finite() && value.is_finite() => Some(value / b),
        _ => None,
    }
}

/// Formats a number with a precision that suits its size: 3 significant digits below 1,000,
/// whole numbers with thousands separators above.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let a = x.abs();
    if a >= 1000.0 {
        let whole = x.round() as i64;
        let digits = whole.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if whole < 0 { format!("-{out}") } else { out }
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{x:.3}")
    }
}

/// A count with thousands separators.
pub fn fmt_int(n: usize) -> String {
    // Below 1,000 `fmt_num` gives decimals ("10.0").
    if n < 1000 { n.to_string() } else { fmt_num(n as f64) }
}

/// "median [min–max]".
pub fn fmt_summary(s: &Summary) -> String {
    format!("{} [{}–{}]", fmt_num(s.median), fmt_num(s.min), fmt_num(s.max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max_of_odd_and_even_counts() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 9.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.runs), (3.0, 1.0, 9.0, 5));
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Summary::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn ratios_and_numbers_format_for_the_report() {
        assert_eq!(ratio(50.0, Some(100.0)), Some(0.5));
        assert_eq!(ratio(50.0, Some(0.0)), None);
        assert_eq!(fmt_num(1_234_567.4), "1,234,567");
        assert_eq!(fmt_num(-1234.0), "-1,234");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(0.01234), "0.012");
        assert_eq!(
            (fmt_int(1), fmt_int(10), fmt_int(999), fmt_int(10_000)),
            ("1".into(), "10".into(), "999".into(), "10,000".into())
        );
    }
}
