//! Tracing setup and W3C `traceparent` helpers so a worker's spans join the submitter's trace.

use rand::Rng;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// A layer added next to the log output (e.g. the OTLP span exporter of the binary).
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global tracing subscriber (text or JSON). Safe to call twice (second is a no-op).
pub fn init(json: bool) {
    init_with(json, None)
}

/// [`init`] with one more layer, which sees every span (not only what the log filter keeps
/// is exported: it has its own level, `info`).
pub fn init_with(json: bool, extra: Option<ExtraLayer>) {
    let filter = EnvFilter::try_from_env("SWITCHYARD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
        fmt.json().flatten_event(true).with_filter(filter).boxed()
    } else {
        fmt.compact().with_filter(filter).boxed()
    };
    let mut layers = vec![logs];
    if let Some(l) = extra {
        layers.push(
            l.with_filter(tracing_subscriber::filter::LevelFilter::INFO)
                .boxed(),
        );
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
}

/// A parsed W3C trace context (`00-<trace id>-<parent id>-<flags>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_id: String,
    pub sampled: bool,
}

impl TraceParent {
    pub fn parse(s: &str) -> Option<TraceParent> {
        let parts: Vec<&str> = s.trim().split('-').collect();
        if parts.len() != 4 || parts[0] != "00" {
            return None;
        }
        let hex = |p: &str, n: usize| {
            p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()) && p.bytes().any(|b| b != b'0')
        };
        if !hex(parts[1], 32) || !hex(parts[2], 16) || parts[3].len() != 2 {
            return None;
        }
        Some(TraceParent {
            trace_id: parts[1].to_ascii_lowercase(),
            parent_id: parts[2].to_ascii_lowercase(),
            sampled: u8::from_str_radix(parts[3], 16).ok()? & 1 == 1,
        })
    }

    /// Starts a new trace.
    pub fn generate() -> TraceParent {
        let mut rng = rand::thread_rng();
        TraceParent {
            trace_id: format!("{:032x}", rng.gen::<u128>() | 1),
            parent_id: format!("{:016x}", rng.gen::<u64>() | 1),
            sampled: true,
        }
    }

    /// A child context: same trace, new span id.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id.clone(),
            parent_id: format!("{:016x}", rand::thread_rng().gen::<u64>() | 1),
            sampled: self.sampled,
        }
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{}-{}-{}",
            self.trace_id,
            self.parent_id,
            if self.sampled { "01" } else { "00" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(s).unwrap();
        assert_eq!(t.to_string(), s);
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.parent_id, t.parent_id);
        assert!(TraceParent::parse("garbage").is_none());
        assert!(
            TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        let g = TraceParent::generate();
        assert_eq!(TraceParent::parse(&g.to_string()), Some(g));
    }
}

/// `s` made safe for a log line: ANSI/VT escape sequences removed, other control characters
/// (newlines included, which could forge log lines) replaced by a space. For text that came
/// from outside: provider responses, sandboxes, credentials' visible prefixes.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // ESC [ ... final byte (CSI), ESC ] ... BEL or ESC \ (OSC), ESC + one char
            '\u{1b}' => match chars.next() {
                Some('[') => {
                    for n in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&n) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    while let Some(n) = chars.next() {
                        if n == '\u{7}' || (n == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            // 8-bit CSI
            '\u{9b}' => {
                for n in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&n) {
                        break;
                    }
                }
            }
            '\t' => out.push('\t'),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn escapes_and_controls_are_removed() {
        assert_eq!(printable("plain text"), "plain text");
        assert_eq!(printable("\u{1b}[31mred\u{1b}[0m"), "red");
        assert_eq!(printable("a\u{1b}]0;title\u{7}b"), "ab");
        assert_eq!(printable("a\u{1b}]8;;http://x\u{1b}\\b"), "ab");
        assert_eq!(printable("line1\nFAKE log line\r"), "line1 FAKE log line ");
        assert_eq!(printable("bell\u{7}\u{9b}2Jx"), "bell x");
        assert_eq!(printable("tab\tok"), "tab\tok");
    }
}
