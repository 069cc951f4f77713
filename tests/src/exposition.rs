//! The proxy's `/metrics` as the tests read it: samples parsed by `prometheus-parse`, looked up by
//! name and labels.

use prometheus_parse::{HistogramCount, Sample, Scrape, Value};

/// A parsed Prometheus/OpenMetrics text exposition, with its text for failure messages.
#[derive(Debug)]
pub struct Exposition {
    pub text: String,
    pub scrape: Scrape,
}

fn scalar(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        Value::Histogram(_) | Value::Summary(_) => None,
    }
}

fn has_labels(sample: &Sample, labels: &[(&str, &str)]) -> bool {
    labels.iter().all(|(k, v)| sample.labels.get(k) == Some(v))
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .unwrap_or_else(|e| panic!("unparsable exposition ({e}):\n{text}"));
        Exposition {
            text: text.to_owned(),
            scrape,
        }
    }

    /// The value of the counter or gauge `name` with these labels, summed over the labels not
    /// given (such as `service`, for a test of one service that names none); `None` when no
    /// sample has them.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut matching = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && has_labels(s, labels))
            .filter_map(|s| scalar(&s.value))
            .peekable();
        matching.peek()?;
        Some(matching.sum())
    }

    /// Like [`Exposition::get`], failing the test (with the whole exposition) when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// Like [`Exposition::get`], 0 when no sample has the labels.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The cumulative buckets of histogram `name` (no labels), lowest bound first.
    pub fn buckets(&self, name: &str) -> Vec<HistogramCount> {
        self.scrape
            .samples
            .iter()
            .find_map(|s| match &s.value {
                Value::Histogram(b) if s.metric == name => Some(b.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name} in:\n{}", self.text))
    }

    /// The declared type of a metric family (`# TYPE name type`). The parser files OpenMetrics
    /// counters (`name_total` under `# TYPE name counter`) as untyped, so the text says it.
    pub fn type_of(&self, family: &str) -> Option<String> {
        self.text.lines().find_map(|l| {
            let (name, ty) = l.strip_prefix("# TYPE ")?.split_once(' ')?;
            (name == family).then(|| ty.to_owned())
        })
    }
}
